"""Aggregation of site updates (pure numpy). The Controller picks a function from AGGREGATORS by name: FedAvg here,
the robust ones (geometric median and baselines) from fedmed.robust behind the same interface."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np

from fedmed.robust.baselines import coordinate_median, krum, trimmed_mean
from fedmed.robust.geometric_median import combine, distance_keys, geometric_median


@dataclass(frozen=True)
class AggregationResult:
    params: dict  # name -> np.ndarray, the new global parameters
    site_weights: np.ndarray  # normalised weight each site got, in input order
    diagnostics: dict = field(default_factory=dict)  # e.g. Weiszfeld iterations and convergence


def check_same_keys_and_shapes(updates: Sequence[Mapping[str, np.ndarray]]) -> None:
    if not updates:
        raise ValueError("cannot aggregate zero updates")
    ref = updates[0]
    for i, u in enumerate(updates[1:], start=1):
        if set(u) != set(ref):
            diff = sorted(set(u) ^ set(ref))[:5]
            raise ValueError(f"update {i} has different parameter names than update 0: {diff}")
        for k, v in u.items():
            if np.shape(v) != np.shape(ref[k]):
                raise ValueError(f"update {i}: parameter {k} has shape {np.shape(v)}, update 0 has {np.shape(ref[k])}")


def weighted_mean(updates: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]) -> AggregationResult:
    """FedAvg: sample-weighted mean of each parameter. Integer buffers (BatchNorm's num_batches_tracked) are
    averaged too and rounded back to their dtype, so the result loads into the model unchanged."""
    check_same_keys_and_shapes(updates)
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (len(updates),):
        raise ValueError(f"need one weight per update: {len(updates)} updates, weights shape {w.shape}")
    if np.any(~np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"weights must be finite, >= 0 and not all zero, got {w.tolist()}")
    w = w / w.sum()
    return AggregationResult(combine(updates, w), w)


def geometric_median_aggregation(updates, weights) -> AggregationResult:
    """Geometric median for K >= 3. With one or two updates there is no majority to be robust with, and for two
    points with unequal weights the weighted geometric median is the heavier point itself, which would silently
    drop the other hospital; the weighted mean is used instead (and said so in the diagnostics)."""
    if len(updates) < 3:
        res = weighted_mean(updates, weights)
        return AggregationResult(res.params, res.site_weights, {"fallback": "weighted_mean (fewer than 3 updates)"})
    r = geometric_median(updates, weights)
    return AggregationResult(r.median, r.site_weights, {"iterations": r.iterations, "converged": r.converged})


def _baseline(fn):
    def aggregate(updates, weights) -> AggregationResult:
        params, site_weights = fn(updates, weights)
        return AggregationResult(params, site_weights)

    aggregate.__name__ = fn.__name__
    return aggregate


Aggregator = Callable[[Sequence[Mapping[str, np.ndarray]], Sequence[float]], AggregationResult]
AGGREGATORS: dict[str, Aggregator] = {
    "fedavg": weighted_mean,
    "geometric_median": geometric_median_aggregation,
    "coordinate_median": _baseline(coordinate_median),
    "trimmed_mean": _baseline(trimmed_mean),
    "krum": _baseline(krum),
}


def get_aggregator(name: str) -> Aggregator:
    if name not in AGGREGATORS:
        raise ValueError(f"unknown aggregation {name!r}; choose one of {sorted(AGGREGATORS)}")
    return AGGREGATORS[name]


def distance(update: Mapping[str, np.ndarray], center: Mapping[str, np.ndarray]) -> float:
    """L2 distance over the trainable parameters (BatchNorm statistics excluded), accumulated in float64."""
    sq = 0.0
    for k in distance_keys(center):
        sq += float(np.sum((np.asarray(update[k], np.float64) - np.asarray(center[k], np.float64)) ** 2))
    return float(np.sqrt(sq))


def update_norm(update: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> float:
    """How far a site moved the model: its distance to the global model it started from."""
    return distance(update, reference)


def find_update_problem(update: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> str | None:
    """Why an update cannot be aggregated against the current global model, or None if it can."""
    missing = sorted(set(reference) - set(update))
    extra = sorted(set(update) - set(reference))
    if missing:
        return f"missing parameters: {missing[:3]}{' ...' if len(missing) > 3 else ''}"
    if extra:
        return f"unexpected parameters: {extra[:3]}{' ...' if len(extra) > 3 else ''}"
    for k, ref in reference.items():
        v = np.asarray(update[k])
        if v.shape != np.shape(ref):
            return f"parameter {k}: shape {v.shape}, expected {np.shape(ref)}"
        if np.issubdtype(v.dtype, np.floating) and not np.all(np.isfinite(v)):
            return f"parameter {k}: contains NaN or Inf"
    return None


@dataclass(frozen=True)
class RoundOutcome:
    result: AggregationResult
    weights: dict  # site -> weight in the final aggregate (0 for sites left out)
    distances: dict  # site -> distance to the final aggregate
    scored: dict  # site -> (ratio to the median distance, round score in [0, 1])
    excluded: tuple  # active sites dropped this round as far outliers


def aggregate_and_score(
    updates: Mapping[str, Mapping[str, np.ndarray]],
    counts: Mapping[str, int],
    aggregate: Aggregator,
    policy,
    active: Sequence[str],
    min_keep: int,
) -> RoundOutcome:
    """Choose, then aggregate (as Flower's Multi-Krum separates selection from averaging): aggregate the active
    sites, score every site (quarantined ones too) by its distance to that aggregate, and if some active sites are
    far outliers (ratio >= policy.bad_ratio, round score 0), aggregate again without them, provided min_keep remain.
    A hostile site is thus kept out of the very round it turns hostile, not only from the next one."""
    from fedmed.robust.trust import round_scores  # trust imports nothing from here; keep module load order simple

    def run(names):
        res = aggregate([updates[n] for n in names], [counts[n] for n in names])
        dist = {n: distance(u, res.params) for n, u in updates.items()}
        return res, dist, round_scores(dist, policy)

    active = list(active)
    if not active:
        raise ValueError("no active site to aggregate")
    res, dist, scored = run(active)
    far = [n for n in active if scored[n][0] >= policy.bad_ratio]
    keep = [n for n in active if n not in far]
    excluded: tuple = ()
    if far and len(keep) >= min_keep:
        res, dist, scored = run(keep)
        excluded, active = tuple(far), keep
    weights = {n: 0.0 for n in updates}
    weights.update({n: float(w) for n, w in zip(active, res.site_weights)})
    return RoundOutcome(res, weights, dist, scored, excluded)
