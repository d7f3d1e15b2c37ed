"""In-process federation for benchmarks: the same core functions the NVFlare Executor and Controller call
(training, DP-SGD, attacks, aggregation, trust/quarantine), looped in one process so many configurations can be
compared quickly. It measures the algorithms, not NVFlare's transport; the simulator tests cover that."""

from __future__ import annotations

import copy
from typing import Mapping, Optional, Sequence

import numpy as np
import torch

from fedmed.aggregation import aggregate_and_score, get_aggregator
from fedmed.model import build_densenet121, load_numpy_state, state_to_numpy
from fedmed.privacy.dp_sgd import BudgetExceeded, SitePrivacy
from fedmed.privacy.policy import PrivacyPolicy
from fedmed.robust.attacks import Attack, apply_attack
from fedmed.robust.trust import TrustPolicy, update_trust
from fedmed.tasks import CHEST_XRAY14, TaskSpec
from fedmed.training import evaluate, round_lr, train_epochs


def _finite(params: dict) -> bool:
    return all(np.all(np.isfinite(v)) for v in params.values() if v.dtype.kind == "f")


def federate(
    train_sets: Mapping[str, torch.utils.data.Dataset],
    test_set,
    rounds: int,
    aggregation: str = "fedavg",
    hostile: Optional[Mapping[str, Attack]] = None,
    privacy: Optional[PrivacyPolicy] = None,
    norm: str = "batch",
    use_trust: bool = False,
    lr: float = 1e-3,
    batch_size: int = 16,
    seed: int = 0,
    task: TaskSpec = CHEST_XRAY14,
    trainable: Optional[Sequence[str]] = None,
    initial_params: Optional[dict] = None,
) -> dict:
    """Run `rounds` of FL over the given site datasets; returns the final test mean AUROC ("auroc"), the task's
    score ("score") and per-site epsilon. trainable: parameter-name prefixes the sites train (None = all);
    initial_params: the global model of round 1 (None = a fresh DenseNet-121 from `seed`)."""
    hostile = hostile or {}
    torch.manual_seed(seed)
    global_params = state_to_numpy(build_densenet121(task.num_outputs, norm=norm))
    if initial_params is not None:
        global_params = {k: np.array(v, copy=True) for k, v in initial_params.items()}
    model = build_densenet121(task.num_outputs, norm=norm)
    aggregate = get_aggregator(aggregation)
    dp = {name: SitePrivacy(privacy) for name in train_sets} if privacy else {}
    policy, trust = TrustPolicy(), {}
    for r in range(rounds):
        updates, counts, names = [], [], []
        for name, train in train_sets.items():
            load_numpy_state(model, global_params)
            # Datasets are shared between benchmark runs: restart their augmentation so every run of the same
            # site and round sees the same images, and runs differ only by what they compare.
            train.reseed(seed + 100 * r + sorted(train_sets).index(name))
            ds = train
            if name in hostile and hostile[name].poisons_labels:
                ds = copy.copy(train)
                ds.labels = task.poisoned_labels(train.labels)
            lr_r = round_lr(lr, r, rounds)
            if dp:
                try:
                    model, _ = dp[name].train_round(model, ds, 1, lr_r, batch_size, seed + 100 * r, total_epochs=rounds,
                                                    task=task, trainable=trainable)
                except BudgetExceeded:
                    continue
            else:
                train_epochs(model, ds, 1, lr_r, batch_size, seed + 100 * r, task=task, trainable=trainable)
            params = state_to_numpy(model)
            if name in hostile:
                params = apply_attack(params, global_params, hostile[name], r)
            updates.append(params)
            counts.append(len(train))
            names.append(name)
        valid = {n: u for n, u in zip(names, updates) if _finite(u)}
        active = [n for n in valid if not (use_trust and n in trust and trust[n].quarantined)]
        if not active:
            raise RuntimeError(f"round {r}: no update to aggregate (every site refused or was unusable)")
        if use_trust:
            outcome = aggregate_and_score(valid, dict(zip(names, counts)), aggregate, policy, active, min_keep=2)
            trust, _ = update_trust(trust, {s: sc for s, (_, sc) in outcome.scored.items()}, policy)
            agg = outcome.result
        else:
            agg = aggregate([valid[n] for n in active], [counts[names.index(n)] for n in active])
        global_params = agg.params
    load_numpy_state(model, global_params)
    result = evaluate(model, test_set, task)
    return {"auroc": result.mean_auroc, "score": result.score, "epsilon": {n: s.epsilon_spent for n, s in dp.items()}}
