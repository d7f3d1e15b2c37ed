"""What a finished round shows on a live dashboard: (tag, value) scalars for TensorBoard, from the round's record.

Pure: no NVFlare import. fedmed.flare.live_metrics sends them through NVFlare's analytics events to its TensorBoard
receiver. Tags group by their first part in TensorBoard (one section per quantity, one chart per site); the step is
the round, numbered from 1 as in the record and the logs.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from fedmed.job.records import RoundRecord

GLOBAL = "global"  # global/<score name>, global/test_loss, global/mean_auroc, global/sites_aggregated
GLOBAL_TEST = "global_test"  # global_test/<metric>: the server's test-set metrics (e.g. auroc/<finding>)
SITE_VALIDATION = "site_validation"  # site_validation/<site>: the task's score on the site's own validation set
TRUST = "trust"  # trust/<site>: after this round
AGGREGATION_WEIGHT = "aggregation_weight"  # aggregation_weight/<site>: 0 for a site left out
EPSILON = "epsilon"  # epsilon/<site>: cumulative DP spend the site reports


class Scalar(NamedTuple):
    tag: str
    value: float
    step: int


def _finite(value) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def round_scalars(record: RoundRecord) -> list[Scalar]:
    """Every scalar of one recorded round: the global model's score (named by the task's score, e.g.
    global/mean_auroc), its test loss and test metrics where the server has a test set, how many sites were
    aggregated, and per site its validation score, trust, aggregation weight and epsilon. Missing and non-finite
    values are left out (a site that sent nothing has no validation score); nothing else is."""
    step = record.round_num
    out: list[tuple[str, object]] = []
    if record.score is not None:
        out.append((f"{GLOBAL}/{record.score_name or 'score'}", record.score))
    if record.mean_auroc is not None and record.score_name != "mean_auroc":
        out.append((f"{GLOBAL}/mean_auroc", record.mean_auroc))
    out.append((f"{GLOBAL}/test_loss", record.test_loss))
    out.append((f"{GLOBAL}/sites_aggregated", sum(1 for u in record.updates if u.status == "accepted")))
    out += [(f"{GLOBAL_TEST}/{k}", v) for k, v in sorted(record.test_metrics.items()) if k != "loss"]  # = test_loss
    trust_after = {t.site: t.trust for t in record.trust}
    for u in sorted(record.updates, key=lambda u: u.site):
        out.append((f"{SITE_VALIDATION}/{u.site}", u.val_score))
        out.append((f"{TRUST}/{u.site}", trust_after.get(u.site, u.trust)))
        out.append((f"{AGGREGATION_WEIGHT}/{u.site}", u.aggregation_weight))
        out.append((f"{EPSILON}/{u.site}", u.epsilon))
    return [Scalar(tag, v, step) for tag, value in out if (v := _finite(value)) is not None]
