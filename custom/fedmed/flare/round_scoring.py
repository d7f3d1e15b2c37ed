"""How the server scores and records a round, a part of the Controller: the aggregate's health check, its score (on
the server's test set, else the sites' validation scores), the optional validation screening of each update, and the
round's record and log line. NVFlare-free apart from what it is handed."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Optional

import numpy as np

from fedmed.job import constants as C
from fedmed.learning.training import evaluate
from fedmed.models.model_health import check_outputs, probe_images
from fedmed.models.network import load_numpy_state
from fedmed.server.rounds import RoundEngine, RoundReport, finite_or_none
from fedmed.store.repository import RoundRecord, TrustRecord

# Two probe images tell a collapsed model (the same outputs for both) and a non-finite one (NaN/inf weights reach every
# output whatever the input) as four did, for half the forward pass (issue 30: the check was ~0.06 s of server CPU a
# round at 64 px; a forward pass is the only way to see outputs overflow from large finite weights).
USABILITY_PROBES = 2


def _tensors_of(model, params: dict) -> dict:
    """params as {name: tensor} for check_outputs(params=...): views of the arrays, not copies (loading them into the
    model cost ~0.02 s a round). Raises naming missing or unexpected parameters and mismatched shapes, as
    load_numpy_state does: a parameter left out would be silently taken from the model's own."""
    import torch

    own = model.state_dict()
    if set(own) != set(params):
        missing, extra = sorted(set(own) - set(params)), sorted(set(params) - set(own))
        raise ValueError(f"model parameters do not match: missing {missing[:5]}, unexpected {extra[:5]}")
    state = {}
    for k, v in params.items():
        a = np.asarray(v)
        t = torch.from_numpy(a if a.flags.writeable else a.copy())  # torch warns on read-only memory
        if tuple(t.shape) != tuple(own[k].shape):
            raise ValueError(f"parameter {k}: shape {tuple(t.shape)} != model's {tuple(own[k].shape)}")
        state[k] = t.to(own[k].dtype)  # no copy when the dtype is already the model's
    return state


@dataclass(frozen=True)
class RoundScore:
    """score: the round's score (NaN: unscored); source: "global_test" or "site_validation"; metrics: for the DB."""

    score: float = math.nan
    source: Optional[str] = None
    mean_auroc: Optional[float] = None
    test_loss: Optional[float] = None
    metrics: dict = field(default_factory=dict)


class RoundScorer:
    """Scores aggregates with `eval_model` (a DenseNet-121 of the job) on `test_ds` (None: the sites' validation)."""

    def __init__(self, task, image_size: int, eval_model, test_ds=None):
        self.task, self.image_size, self.eval_model, self.test_ds = task, image_size, eval_model, test_ds

    def unusable(self, report: RoundReport) -> Optional[str]:
        """Why the round's aggregate is not a usable model (NaN/infinite or input-independent outputs on fixed
        probe images, fedmed.models.model_health), or None. HE rounds: the server cannot read the encrypted layers."""
        if report.encrypted is not None:
            return None
        images = probe_images(self.image_size, n=USABILITY_PROBES)
        return check_outputs(self.eval_model, images, _tensors_of(self.eval_model, report.params)).problem

    def score(self, report: RoundReport, site_results: list) -> RoundScore:
        """On the global test set ("global_test"), else the mean of the aggregated sites' validation scores weighted
        by their capped sample counts ("site_validation")."""
        if self.test_ds is not None:
            load_numpy_state(self.eval_model, report.params)
            ev = evaluate(self.eval_model, self.test_ds, self.task)
            return RoundScore(
                ev.score, "global_test", finite_or_none(ev.mean_auroc), ev.loss, {**ev.metrics, "loss": ev.loss}
            )
        score = report.weighted_site_metric(site_results, C.META_VAL_PREFIX + self.task.score_name)
        mean_auroc = report.weighted_site_metric(site_results, C.META_VAL_MEAN_AUROC)
        return RoundScore(score, "site_validation", finite_or_none(mean_auroc))

    def validator(self, validation_images: int):
        """RoundEngine's `validate`: an update's score on the first validation_images test images; None when off."""
        if self.test_ds is None or validation_images == 0:
            return None
        import torch

        subset = torch.utils.data.Subset(self.test_ds, range(min(len(self.test_ds), validation_images)))

        def validate(params) -> float:
            load_numpy_state(self.eval_model, params)
            return evaluate(self.eval_model, subset, self.task).score

        return validate

    def record(self, report: RoundReport, engine: RoundEngine, started, scored=None, sha=None, alerts=()):
        """The round's RoundRecord. scored: the RoundScore of an aggregated round; alerts: the server's own, beside
        the round engine's."""
        trust = tuple(
            TrustRecord(site, t.trust, t.quarantined, t.good_streak) for site, t in sorted(engine.trust.items())
        )
        val_name = C.META_VAL_PREFIX + self.task.score_name
        updates = tuple(replace(u, val_score=finite_or_none(u.metrics.get(val_name))) for u in report.updates)
        s = scored if scored is not None else RoundScore(None)
        return RoundRecord(
            report.round_num + 1,
            updates,
            s.test_loss,
            finite_or_none(s.score),
            self.task.score_name if scored is not None else None,
            s.source,
            s.mean_auroc,
            s.metrics or {},
            sha,
            started,
            (*report.alerts, *alerts),
            trust,
        )


def report_lines(report: RoundReport, aggregation: str) -> list:
    """(level, message) of the round engine's report, for the server's log."""
    n = report.round_num + 1
    lines = [(level, f"round {n}: {msg}") for level, msg in report.log]
    if "fallback" in report.diagnostics:
        lines.append(("info", f"round {n}: {aggregation} used {report.diagnostics['fallback']}"))
    if not report.diagnostics.get("converged", True):
        lines.append(
            (
                "warning",
                f"round {n}: geometric median did not converge in {report.diagnostics.get('iterations')} iterations; "
                "using the last iterate",
            )
        )
    return lines


def round_line(report: RoundReport, config, num_targets: int, scored: RoundScore, best, seconds: float) -> str:
    """The server's one line for an aggregated round (config: the JobConfig; best: the BestModelKeeper)."""
    iters = report.diagnostics.get("iterations")
    return (
        f"round {report.round_num + 1}/{config.num_rounds} done in {seconds:.0f}s: "
        f"{len(report.aggregated_sites)}/{num_targets} sites aggregated ({config.aggregation}"
        + (f", {iters} Weiszfeld iterations" if iters else "")
        + (", encrypted layers combined homomorphically" if report.encrypted is not None else "")
        + f"), {'val' if scored.test_loss is None else 'test'} {best.score_name} {scored.score:.4f}"
        + (f", test loss {scored.test_loss:.4f}" if scored.test_loss is not None else "")
        + f"; best {best.score:.4f} (round {best.round})"
    )
