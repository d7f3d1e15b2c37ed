"""In-process federation for benchmarks and the red-team script: each site's round is fedmed.site.site_round.run_round,
the very function the NVFlare Executor calls (training, DP-SGD, seeds, LR schedule, global-head and freshness
checks, encryption), and the server's side is the same fedmed.server.rounds.RoundEngine the NVFlare Controller calls. It
measures the algorithms, not NVFlare's transport; the simulator tests cover that."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Mapping, Optional, Sequence

import numpy as np
import torch

from fedmed.job.tasks import TaskSpec
from fedmed.learning.algorithms import FedAlgorithm
from fedmed.learning.training import evaluate
from fedmed.models.model_card import ModelCardBuilder
from fedmed.models.network import build_densenet121, load_numpy_state, state_to_numpy
from fedmed.privacy.dp_sgd import SitePrivacy
from fedmed.privacy.policy import PrivacyPolicy
from fedmed.server.heap import release_round_memory
from fedmed.server.robust.trust import TrustPolicy
from fedmed.server.rounds import EncryptionSpec, RoundEngine, RoundReport, RoundRules, SiteResult
from fedmed.sim.attacks import Attack, craft_colluding
from fedmed.site import site_round
from fedmed.site.site_round import GlobalModel, Site, Training, as_received, site_seed

# Aggregation alone: nothing is excluded or quarantined (every valid update is aggregated), for benchmarks that
# compare aggregators without the trust rule. Screening still runs.
NO_TRUST = TrustPolicy(
    ok_ratio=1e12,
    bad_ratio=1e13,
    quarantine_below=0.0,
    quarantine_on_zero=False,
    sign_balance_ok=2.5,
    sign_balance_bad=3.0,
)  # the sign rule off too (a balance difference is at most 2)


@dataclass
class Federation:
    """Outcome of federate(): the final global model's scores and every round's report."""

    auroc: float
    score: float
    epsilon: dict
    reports: list = field(default_factory=list)  # RoundReport per round that ran
    stopped: Optional[str] = None  # why the run stopped early (a round that could not aggregate)
    params: Optional[dict] = None
    card: Optional[dict] = None  # the model card of `params` (fedmed.models.model_card), for whoever saves them

    def __getitem__(self, key):  # old callers read a dict
        return getattr(self, key)


def apply_wire_attack(
    result: SiteResult,
    attack: Attack,
    round_num: int,
    history: Mapping[str, list],
    others: Sequence[SiteResult],
    he=None,
) -> SiteResult:
    """What a hostile site can do to its message besides its weights (fedmed.sim.attacks.WIRE_ATTACKS)."""
    kind, factor = attack.kind, attack.factor
    if kind == "inflate_count":
        return replace(result, claimed_samples=int(result.claimed_samples * factor))
    if kind == "bn_poison":
        params = {k: (np.full_like(v, -factor) if k.endswith("running_var") else v) for k, v in result.params.items()}
        return replace(result, params=params)
    if kind == "long_metric":
        return replace(result, metrics={**result.metrics, "x" * int(factor): 0.5})
    if kind == "replay":
        earlier = history.get(result.site, [])
        return earlier[-1] if earlier else result  # round 1 has nothing to replay yet
    if kind == "copy_site":
        honest = [o for o in others if o.site != result.site and o.refused is None]
        return replace(honest[0], site=result.site) if honest else result
    if kind in ("he_scale", "he_other_scale"):
        from fedmed.security import ckks

        if he is None or result.encrypted is None:
            raise ValueError(f"attack {kind} needs HE on")
        block = ckks.EncryptedLayers.from_wire(result.encrypted)
        clear = ckks.decrypt_layers(block, he)  # the site's own head: it holds the key
        if kind == "he_scale":
            enc = ckks.encrypt_layers({k: v * factor for k, v in clear.items()}, he)
        else:  # same values, encrypted at another scale: a ciphertext the server's sum cannot take
            other = ckks.LoadedContext(he.context.copy(), he.key_id, he.path)
            other.context.global_scale = 2**30
            enc = ckks.encrypt_layers(clear, other)
        return replace(result, encrypted=enc.to_wire())
    raise ValueError(f"not a wire attack: {kind}")


@dataclass(frozen=True)
class FederationPlan:
    """The federation's shape and rules for federate(): what every site trains and how the server combines.

    use_trust: the deployed trust rule (exclusion of far outliers, quarantine); False aggregates every valid
    update (NO_TRUST). he_layers: encrypt those layers with a fresh key set, as hospitals do. data_synthetic:
    whether the site datasets are synthetic, for the model card (None: not said). centred_clipping:
    RoundRules.centred_clipping (combine around the server's momentum). algorithm: FedOpt at the server, FedProx /
    SCAFFOLD at the sites (fedmed.learning.algorithms.FedAlgorithm)."""

    task: TaskSpec
    rounds: int
    aggregation: str = "fedavg"
    use_trust: bool = True
    centred_clipping: bool = False
    min_clients: int = 2
    privacy: Optional[PrivacyPolicy] = None
    norm: str = "batch"
    lr: float = 1e-3
    batch_size: int = 16
    seed: int = 0
    trainable: Optional[Sequence[str]] = None
    local_epochs: int = 1
    rounds_per_epoch: int = 1  # k > 1: one epoch over k rounds, a 1/k share each (the job setting)
    he_layers: Optional[Sequence[str]] = None
    data_synthetic: Optional[bool] = None
    algorithm: FedAlgorithm = FedAlgorithm()
    trust: Optional[TrustPolicy] = None  # with use_trust: these thresholds (None: the default TrustPolicy())


@dataclass(frozen=True)
class Adversary:
    """The hostile sites of a federate() run: site -> Attack, attacking from round index from_round (honest
    before it: a site that turns hostile)."""

    attacks: Mapping[str, Attack] = field(default_factory=dict)
    from_round: int = 0


def federate(
    train_sets: Mapping[str, torch.utils.data.Dataset],
    test_set,
    plan: FederationPlan,
    adversary: Optional[Adversary] = None,
    *,
    absent: Optional[Mapping[str, int]] = None,
    initial_params: Optional[dict] = None,
    server_validation=None,
    on_round=None,
) -> Federation:
    """Run plan.rounds of FL over the given site datasets through the round engine.

    initial_params: the global model of round 1 (None = a fresh DenseNet-121 from plan.seed). on_round(report):
    called after each round. server_validation: a labelled dataset the server scores each update on (the
    Controller's validation screening). absent: site -> round index from which it sends nothing (recorded
    missing): a hospital that leaves. A round that cannot aggregate stops the run (as the Controller does);
    `stopped` says why."""
    adversary = adversary or Adversary()
    hostile, attack_from = adversary.attacks, adversary.from_round
    task, rounds, aggregation, norm, seed = plan.task, plan.rounds, plan.aggregation, plan.norm, plan.seed
    privacy, he_layers, trainable = plan.privacy, plan.he_layers, plan.trainable
    algorithm = plan.algorithm
    torch.manual_seed(seed)
    model = build_densenet121(task.num_outputs, norm=norm)
    global_params = (
        state_to_numpy(model)
        if initial_params is None
        else {k: np.array(v, copy=True) for k, v in initial_params.items()}
    )
    he_ctx, encryption, he_names = None, None, ()
    if he_layers:
        from fedmed.security import ckks

        keys = ckks.generate_key_set()
        he_ctx = ckks.LoadedContext(ckks.ts.context_from(keys.client_context), keys.key_id, None)
        server = ckks.LoadedContext(ckks.ts.context_from(keys.server_context), keys.key_id, None)
        he_names = ckks.resolve_encrypted_names(list(global_params), list(he_layers))
        encryption = EncryptionSpec(server, he_names, {n: tuple(np.shape(global_params[n])) for n in he_names})
    rules = RoundRules(
        aggregation=aggregation,
        min_clients=plan.min_clients,
        trust=(plan.trust or TrustPolicy()) if plan.use_trust else NO_TRUST,
        centred_clipping=plan.centred_clipping,
        server_optimizer=algorithm.server_optimizer,
        scaffold=algorithm.scaffold,
    )
    validate = None
    if server_validation is not None and not he_names:  # the server cannot read an encrypted head
        val_model = build_densenet121(task.num_outputs, norm=norm)

        def validate(params):
            load_numpy_state(val_model, params)
            return evaluate(val_model, server_validation, task).score

    engine = RoundEngine(rules, encryption, validate=validate)
    training = Training(
        plan.lr,
        plan.batch_size,
        plan.local_epochs,
        seed,
        None if trainable is None else tuple(trainable),
        algorithm.proximal_mu,
        algorithm.scaffold,
        plan.rounds_per_epoch,
    )
    # Each hospital as the Executor builds it (no validation set: the benchmarks score the global model instead).
    sites = {
        name: Site(
            name,
            task,
            train,
            model,  # one module for every site: each round starts by loading the global model into it
            training,
            privacy=SitePrivacy(privacy) if privacy else None,
            he=he_ctx,
            he_names=tuple(he_names),
            hostile=hostile.get(name),
        )
        for name, train in train_sets.items()
    }
    global_block = None
    history: dict = {}
    out = Federation(float("nan"), float("nan"), {})
    card = ModelCardBuilder(task.name, aggregation, "in-process federation (fedmed.sim.inprocess)", tuple(he_names))
    for r in range(rounds):
        results = []
        attacks = hostile if r >= attack_from else {}
        control = engine.control({k: v for k, v in global_params.items() if k not in he_names})
        for name in train_sets:
            if absent and name in absent and r >= absent[name]:
                continue
            site = sites[name]
            site.hostile = attacks.get(name)  # before attack_from the hostile sites are honest
            offer = GlobalModel(global_params, r, rounds, encrypted=global_block, control=control)
            update = site_round.run_round(site, offer)  # through the module: what the Executor calls
            results.append(as_received(name, update.params, update.metrics, update.meta))
        results = _collude(results, attacks, global_params, len([s for s in hostile if s in train_sets]))
        for i, res in enumerate(results):
            attack = attacks.get(res.site)
            if attack is not None and attack.on_wire and res.refused is None:
                results[i] = apply_wire_attack(res, attack, r, history, results, he_ctx)
        for res in results:  # a replay sends the last one: keeping every round's held ~140 MB a round of 5 sites
            history[res.site] = [res]
        clear_global = {k: v for k, v in global_params.items() if k not in he_names}
        report = engine.step(r, clear_global, results, list(train_sets))
        out.reports.append(report)
        if on_round is not None:
            on_round(report)
        release_round_memory()  # as the Controller and the sites do after each round (fedmed.server.heap)
        if not report.aggregated:
            if report.probation:
                continue  # as the Controller: the global model stands, trust was updated
            out.stopped = report.problem
            break
        global_params = dict(report.params)
        global_block = report.encrypted
        card.add_round(report.aggregated_sites, [replace(res, data_synthetic=plan.data_synthetic) for res in results])
    # Evaluate as a hospital would: with the encrypted layers decrypted.
    final = dict(global_params)
    if global_block is not None:
        from fedmed.security import ckks

        final = ckks.merge_decrypted(final, global_block, he_ctx)
    load_numpy_state(model, final)
    result = evaluate(model, test_set, task)
    out.auroc, out.score, out.params = result.mean_auroc, result.score, final
    out.epsilon = {n: s.privacy.epsilon_spent for n, s in sites.items() if s.privacy is not None}
    out.card = card.card().to_meta()
    return out


def _collude(results: list, attacks: Mapping[str, Attack], global_params, n_hostile: int) -> list:
    """Omniscient colluding attacks (fedmed.sim.attacks.COLLUDING_ATTACKS): after the honest sites trained, each
    colluder replaces its clear trainable parameters with the common crafted point, keeping its own BatchNorm
    statistics (and its encrypted block: HE hides the honest heads from it too)."""
    crafted = {}
    honest = [r.params for r in results if r.site not in attacks and r.refused is None and r.params is not None]
    out = list(results)
    for i, res in enumerate(results):
        attack = attacks.get(res.site)
        if attack is None or not attack.omniscient or res.refused is not None or len(honest) < 2:
            continue
        if attack not in crafted:
            clear = {k: v for k, v in global_params.items() if k in res.params}
            crafted[attack] = craft_colluding(honest, clear, attack, n_hostile)
        out[i] = replace(res, params={**res.params, **crafted[attack]})
    return out


__all__ = [
    "NO_TRUST",
    "Adversary",
    "Federation",
    "FederationPlan",
    "RoundReport",
    "apply_wire_attack",
    "federate",
    "site_seed",
]
