"""Aggregation of site updates (pure numpy). The round engine (fedmed.server.rounds) picks a function from AGGREGATORS by
name: FedAvg here, the robust ones (geometric median and baselines) from fedmed.server.robust behind the same interface.

Every aggregator in AGGREGATORS caps the sites' self-reported sample counts (capped_counts) before using them, so no
caller can forget to: a site's count is a claim, and uncapped it buys the weighted median outright. The robust ones
also take BatchNorm running statistics as a coordinate-wise median (median_of_statistics) instead of a weighted
combination, so one site cannot steer the statistics the global model evaluates with."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np

from fedmed.server.parallel import thread_map
from fedmed.server.passes import has_non_finite, reference_pass, squared_distance
from fedmed.server.robust.baselines import coordinate_median, krum, trimmed_mean
from fedmed.server.robust.geometric_median import NON_TRAINABLE_SUFFIXES, combine, distance_keys, geometric_median


@dataclass(frozen=True)
class AggregationResult:
    params: dict  # name -> np.ndarray, the new global parameters
    site_weights: np.ndarray  # normalised weight each site got, in input order
    diagnostics: dict = field(default_factory=dict)  # e.g. Weiszfeld iterations and convergence
    used_counts: np.ndarray | None = None  # the sample counts after the cap, in input order (what weighted them)


# Default cap: no site's count weighs more than the (lower) median site's. See capped_counts.
DEFAULT_COUNT_CAP = 1.0


def capped_counts(claimed: Sequence[float], cap_multiple: float = DEFAULT_COUNT_CAP) -> np.ndarray:
    """Self-reported sample counts capped at cap_multiple x their lower median.

    Why the lower median: it is the smallest value that at least half of the sites reach, so only a majority of
    sites can raise it, and the geometric median's guarantee already assumes an honest majority. Why a multiple of
    1 by default: with it, a site claiming 100x the data (or any count) weighs at most what the median site weighs,
    so the weight mass of f hostile sites is at most f/K of the prior; the price is that an honestly larger
    hospital counts as the median one (its extra data still improves its own update). Smaller claims are kept as
    they are: under-claiming only lowers the claimer's own weight."""
    c = np.asarray(claimed, dtype=np.float64)
    if c.ndim != 1 or c.size == 0:
        raise ValueError(f"need a non-empty list of counts, got shape {c.shape}")
    if np.any(~np.isfinite(c)) or np.any(c < 0) or c.sum() <= 0:
        raise ValueError(f"counts must be finite, >= 0 and not all zero, got {c.tolist()}")
    if not np.isfinite(cap_multiple) or cap_multiple <= 0:
        raise ValueError(f"cap_multiple must be > 0, got {cap_multiple}")
    lower_median = float(np.sort(c)[(c.size - 1) // 2])
    if lower_median <= 0:  # fewer than half the sites claim anything: cap at the smallest positive claim
        lower_median = float(c[c > 0].min())
    return np.minimum(c, cap_multiple * lower_median)


def is_statistic(name: str) -> bool:
    """A BatchNorm buffer (running mean / variance / batch counter): local data statistics, not learned weights."""
    return name.endswith(NON_TRAINABLE_SUFFIXES)


def median_of_statistics(updates: Sequence[Mapping[str, np.ndarray]]) -> dict:
    """Coordinate-wise median of every BatchNorm statistic across the updates (integers rounded back). With two
    updates this is their mean; from three on, one site cannot move any coordinate beyond the honest range.

    All ~360 statistics layers of an update joined into one float64 row, and one median of those K rows by
    fedmed.server.robust.collusion's vectorised median (the values np.median(axis=0) gives): a median per layer
    was ~1,000 small numpy calls, bound by the interpreter (the GIL), not the cores (issue 30)."""
    from fedmed.server.robust.collusion import _median_rows

    keys = [k for k in updates[0] if is_statistic(k)]
    if not keys:
        return {}
    refs = [np.asarray(updates[0][k]) for k in keys]
    # np.concatenate's cast to float64 is the per-layer cast's (exact for float32, the same rounding for integers)
    rows = thread_map(lambda u: np.concatenate([np.asarray(u[k]).reshape(-1) for k in keys], dtype=np.float64), updates)
    med = _median_rows(rows)
    out, start = {}, 0
    for key, ref in zip(keys, refs):
        m = med[start : start + ref.size].reshape(ref.shape)
        start += ref.size
        out[key] = np.rint(m).astype(ref.dtype) if np.issubdtype(ref.dtype, np.integer) else m.astype(ref.dtype)
    return out


def check_same_keys_and_shapes(updates: Sequence[Mapping[str, np.ndarray]]) -> None:
    if not updates:
        raise ValueError("cannot aggregate zero updates")
    ref = updates[0]
    shapes = {k: np.shape(v) for k, v in ref.items()}
    array = np.ndarray
    for i, u in enumerate(updates[1:], start=1):
        if u.keys() != ref.keys():
            diff = sorted(set(u) ^ set(ref))[:5]
            raise ValueError(f"update {i} has different parameter names than update 0: {diff}")
        for k, v in u.items():
            # an array's own attribute: np.shape's dispatch cost ~3 us a call, 0.25 s of CPU at 50 x 700 layers
            if (v.shape if type(v) is array else np.shape(v)) != shapes[k]:
                raise ValueError(f"update {i}: parameter {k} has shape {np.shape(v)}, update 0 has {shapes[k]}")


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


def geometric_median_aggregation(updates, weights, gram=None) -> AggregationResult:
    """Geometric median for K >= 3. With one or two updates there is no majority to be robust with, and for two
    points with unequal weights the weighted geometric median is the heavier point itself, which would silently
    drop the other hospital; the weighted mean is used instead (and said so in the diagnostics)."""
    if len(updates) < 3:
        res = weighted_mean(updates, weights)
        return AggregationResult(res.params, res.site_weights, {"fallback": "weighted_mean (fewer than 3 updates)"})
    r = geometric_median(updates, weights, gram=gram)  # gram: fedmed.server.passes.reference_pass's, or None
    return AggregationResult(r.median, r.site_weights, {"iterations": r.iterations, "converged": r.converged})


def _baseline(fn):
    def aggregate(updates, weights) -> AggregationResult:
        params, site_weights = fn(updates, weights)
        return AggregationResult(params, site_weights)

    aggregate.__name__ = fn.__name__
    return aggregate


def _capped(fn, robust_statistics: bool, takes_gram: bool = False):
    """The aggregator as callers get it: counts capped first; BatchNorm statistics by coordinate median if robust.
    takes_gram: fn accepts the updates' Gram matrix a pass already formed (aggregate(..., gram=)), and uses it."""

    def aggregate(updates, counts, gram=None) -> AggregationResult:
        check_same_keys_and_shapes(updates)
        used = capped_counts(counts)
        res = fn(updates, used, gram) if takes_gram and gram is not None else fn(updates, used)
        params = {**res.params, **median_of_statistics(updates)} if robust_statistics else res.params
        return AggregationResult(params, res.site_weights, res.diagnostics, used)

    aggregate.__name__ = fn.__name__
    aggregate.robust_statistics = robust_statistics
    aggregate.takes_gram = takes_gram
    return aggregate


Aggregator = Callable[[Sequence[Mapping[str, np.ndarray]], Sequence[float]], AggregationResult]
AGGREGATORS: dict[str, Aggregator] = {
    # FedAvg keeps the plain weighted mean of the statistics too (it is the non-robust reference); screening still
    # bounds what any one site may send.
    "fedavg": _capped(weighted_mean, robust_statistics=False),
    "geometric_median": _capped(geometric_median_aggregation, robust_statistics=True, takes_gram=True),
    "coordinate_median": _capped(_baseline(coordinate_median), robust_statistics=True),
    "trimmed_mean": _capped(_baseline(trimmed_mean), robust_statistics=True),
    "krum": _capped(_baseline(krum), robust_statistics=True),
}
# Aggregators whose result is a weighted sum of the updates (the weights say how much each site counted), so the
# same weights can combine CKKS-encrypted layers homomorphically. Coordinate-wise median and trimmed mean are not
# linear in the sites, so they cannot be computed on ciphertexts.
LINEAR_AGGREGATORS = ("fedavg", "geometric_median", "krum")


def cap_vote_weights(weights: Sequence[float], shares: Sequence[float], multiple: float) -> np.ndarray:
    """Weights (normalised) with none above multiple x its count share (shares normalised), the excess handed to the
    others in proportion to their weights, repeated until no weight exceeds its cap (water-filling: a weight capped
    once stays at its cap). multiple >= 1, so the caps sum to at least 1 and the result always sums to 1."""
    w, sh = np.asarray(weights, np.float64), np.asarray(shares, np.float64)
    if w.shape != sh.shape or w.ndim != 1 or w.size == 0:
        raise ValueError(f"need one share per weight, got shapes {w.shape} and {sh.shape}")
    if np.any(~np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0 or np.any(~np.isfinite(sh)) or np.any(sh < 0):
        raise ValueError(f"weights and shares must be finite and >= 0 (weights not all 0): {w.tolist()}, {sh.tolist()}")
    if not multiple >= 1:
        raise ValueError(f"the vote cap multiple must be >= 1, got {multiple}")
    w, cap = w / w.sum(), multiple * sh / sh.sum()
    held = np.zeros(w.size, bool)
    while np.any(~held & (w > cap * (1 + 1e-12))):
        held |= w > cap * (1 + 1e-12)
        w[held] = cap[held]
        free, rest = ~held, 1.0 - float(cap[held].sum())
        base = w[free] if w[free].sum() > 0 else sh[free]  # others all at 0: hand the rest out by count
        w[free] = rest * base / base.sum() if base.sum() > 0 else 0.0
    return w


def cap_votes(
    res: AggregationResult, updates: Sequence[Mapping[str, np.ndarray]], multiple: float
) -> AggregationResult:
    """res with no site above multiple x its count share of the weight (TrustPolicy.vote_share_cap): the trainable
    parameters recombined with the capped weights (fedmed.server.robust.geometric_median.combine), the statistics as
    the aggregator took them. Unchanged when no weight is over its cap."""
    shares = res.used_counts if res.used_counts is not None else np.ones(len(updates))
    w = cap_vote_weights(res.site_weights, shares, multiple)
    if np.allclose(w, res.site_weights, rtol=0, atol=1e-12):
        return res
    mixed = combine(updates, w)
    params = {**res.params, **{k: mixed[k] for k in distance_keys(res.params)}}
    diagnostics = {**res.diagnostics, "vote_cap": f"weights capped at {multiple}x each site's count share"}
    return AggregationResult(params, w, diagnostics, res.used_counts)


def get_aggregator(name: str) -> Aggregator:
    if name not in AGGREGATORS:
        raise ValueError(f"unknown aggregation {name!r}; choose one of {sorted(AGGREGATORS)}")
    return AGGREGATORS[name]


def distance(
    update: Mapping[str, np.ndarray], center: Mapping[str, np.ndarray], keys: Sequence[str] | None = None
) -> float:
    """L2 distance over the trainable parameters (BatchNorm statistics excluded; `keys`: distance_keys(center),
    when the caller has them), accumulated in float64."""
    # One pass over both, the float64 difference squared and summed chunk by chunk in cache (fedmed.server.passes).
    return float(np.sqrt(squared_distance(update, center, distance_keys(center) if keys is None else keys)))


def head_cosine(
    update: Mapping[str, np.ndarray],
    aggregate: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray],
    keys: Sequence[str],
) -> float:
    """Cosine between a site's move of the given layers (update - reference) and the aggregate's move. 1.0 when
    either move is zero (no evidence either way). On the classifier layers, honest sites move roughly with the
    aggregate even under non-IID priors; a site trained on flipped labels moves them against it."""
    dot = nu = na = 0.0
    for k in keys:
        ref = np.asarray(reference[k], np.float64)
        u = np.asarray(update[k], np.float64) - ref
        a = np.asarray(aggregate[k], np.float64) - ref
        dot, nu, na = dot + float(np.sum(u * a)), nu + float(np.sum(u * u)), na + float(np.sum(a * a))
    if nu <= 0 or na <= 0:
        return 1.0
    return float(np.clip(dot / np.sqrt(nu * na), -1.0, 1.0))


def body_cosine(norm: float, judge_norm: float, dist: float) -> float:
    """Cosine between a site's clear move (update - start) and the judging reference's (judge - start), from the
    three lengths the round already has: the site's move (screening's update_norm), the reference's, and the site's
    distance to the reference; by the law of cosines, dot = (|u|^2 + |j|^2 - |u - j|^2) / 2. So the rule reads
    no update again (a direct dot product would be one more pass over every site's whole model); the lengths are
    float64 sums, so the subtraction loses precision only when one move is orders of magnitude shorter than the
    other. 1.0 when either move is zero (no evidence either way), as head_cosine."""
    if norm <= 0 or judge_norm <= 0:
        return 1.0
    dot = (norm * norm + judge_norm * judge_norm - dist * dist) / 2.0
    return float(np.clip(dot / (norm * judge_norm), -1.0, 1.0))


def update_norm(
    update: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray], keys: Sequence[str] | None = None
) -> float:
    """How far a site moved the model: its distance to the global model it started from."""
    return distance(update, reference, keys)


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
        if v.dtype.kind not in "biuf":  # complex, text, objects: no model holds them and no pass can read them
            expected = np.asarray(ref).dtype
            return f"parameter {k}: dtype {v.dtype} is not a real number type (the global model's is {expected})"
        # dtype.kind "f" is np.issubdtype(dtype, np.floating) without its ~2 us a call (x 600 layers x K sites)
        if v.dtype.kind == "f" and has_non_finite(v):  # one sum, not a boolean array (fedmed.server.passes)
            return f"parameter {k}: contains NaN or Inf"
    return None


@dataclass(frozen=True)
class RoundOutcome:
    result: AggregationResult
    weights: dict  # site -> weight in the final aggregate (0 for sites left out)
    distances: dict  # site -> distance to the judging reference (coordinate_median_reference of the kept sites)
    scored: dict  # site -> (ratio to the median distance, round score in [0, 1])
    excluded: tuple  # active sites dropped this round (round score 0: far outliers or heads moved against)
    used_counts: dict = field(default_factory=dict)  # aggregated site -> sample count after the cap
    # site -> fedmed.server.aggregation.head_cosine (empty: not checked)
    head_cosines: dict = field(default_factory=dict)
    sign_offsets: dict = field(default_factory=dict)  # site -> sign balance minus the median site's (empty: off)
    # site -> body_cosine of its clear move with the reference's (empty: no start); scored when body_scored
    body_cosines: dict = field(default_factory=dict)
    body_scored: bool = False


@dataclass(frozen=True)
class DirectionCheck:
    """The direction rule's inputs: the global model the round started from (start) and the classifier layers'
    names (head_keys); a site whose classifier moved against the judging reference's scores 0. Given start, the
    sign rule (fedmed.server.robust.sign_balance) also judges each site's whole clear move, head or no head (so with HE
    too), unless the trust policy turns it off; and the body rule (body_cosine, TrustPolicy.body_cosine_ok / _bad)
    judges the direction of that whole clear move against the reference's where the classifier cannot be read (no
    head_keys: HE encrypts it), or always with TrustPolicy.body_cosine_always."""

    start: Mapping[str, np.ndarray] | None
    head_keys: Sequence[str] = ()
    # site -> (sign balance, coordinates moved) of its move from start, when a pass over the updates already
    # counted them (fedmed.server.passes.update_pass during screening); the sites missing here are counted again
    balances: Mapping[str, tuple] | None = None
    # site -> update_norm of its move from start, when screening measured it (the body rule's lengths); the sites
    # missing here are measured again
    norms: Mapping[str, float] | None = None


def aggregate_and_score(
    updates: Mapping[str, Mapping[str, np.ndarray]],
    counts: Mapping[str, int],
    aggregate: Aggregator,
    policy,
    active: Sequence[str],
    min_keep: int,
    direction: DirectionCheck | None = None,
    copies=None,
) -> RoundOutcome:
    """Choose, then aggregate (as Flower's Multi-Krum separates selection from averaging): aggregate the active
    sites, score every site (quarantined ones too) by its distance to the judging reference and, given the global
    model the round started from and the classifier layers (direction), by the direction its classifier
    moved relative to the judging reference's; if some active sites score 0 (far outliers, or classifiers moved
    against the reference's), aggregate again without them, provided min_keep remain. A hostile site is thus kept
    out of the very round it turns hostile, not only from the next one.

    The judging reference is the coordinate-wise median of the active sites, each near-copy group (groups, from
    fedmed.server.robust.collusion) one vote, not the aggregate itself: two colluders of five at one point can hold the
    weighted geometric median (issue 28), and every rule measured against a captured aggregate then turns on the
    honest sites; the coordinate median stays inside the honest sites' range in every coordinate while hostile
    votes are fewer than half (fedmed.server.robust.collusion.coordinate_median_reference). copies: the round's
    fedmed.server.robust.collusion.CollusionFinding (None = no near-copies): its factors multiply each site's sample count
    (a near-copy group of m shares one site's weight: 1/m each), its groups vote once.

    The sign rule (fedmed.server.robust.sign_balance: the omniscient in-distribution attacks, ALIE and Min-Max / Min-Sum
    inverse-std, lower nearly every coordinate at once) scores every site's move from direction.start by its sign
    balance's distance to the median site's, once per round (it does not depend on the reference)."""
    from fedmed.server.robust.trust import (
        round_scores,  # trust imports nothing from here; keep module load order simple
    )

    check_heads = direction is not None and direction.start is not None and bool(direction.head_keys)
    reference, head_keys = (direction.start, direction.head_keys) if check_heads else (None, ())
    factors = dict(copies.factors) if copies is not None else {}
    groups = copies.groups if copies is not None else ()
    signs = sign_offsets_of(updates, direction.start if direction is not None else None, policy, direction)

    start = direction.start if direction is not None else None
    norms = body_norms(updates, start, direction)
    # The body rule scores where the classifier is hidden (or always, by policy); its cosines are kept either way
    # (the red team's calibration reads them with HE off too).
    body_scored = (
        start is not None
        and policy_body_rule(policy)
        and (getattr(policy, "body_cosine_always", False) or not check_heads)
    )

    # The cap re-weights a weighted sum: only for the aggregators whose result is one (LINEAR_AGGREGATORS).
    linear = any(aggregate is AGGREGATORS[n] for n in LINEAR_AGGREGATORS)
    vote_cap = float(getattr(policy, "vote_share_cap", np.inf)) if linear else np.inf

    def run(names):
        chosen = [updates[n] for n in names]
        keys = distance_keys(chosen[0])
        index = {n: i for i, n in enumerate(names)}
        votes = [[index[s] for s in g if s in index] for g in groups]
        # One blocked pass: the judging reference, the chosen sites' distances to it and the Gram matrix the
        # geometric median iterates on (fedmed.server.passes.reference_pass; issue 30: three passes before).
        found = reference_pass(chosen, keys, [v for v in votes if len(v) > 1])
        judge, gram = found.reference, (found.gram if getattr(aggregate, "takes_gram", False) else None)
        counted = [counts[n] * factors.get(n, 1.0) for n in names]
        res = aggregate(chosen, counted, gram=gram) if gram is not None else aggregate(chosen, counted)
        if np.isfinite(vote_cap) and len(names) >= 3:  # with two sites the weighted mean is used already
            res = cap_votes(res, chosen, vote_cap)
        known = dict(zip(names, found.distances.tolist()))
        others = [n for n in updates if n not in known]  # quarantined sites: scored, not in the pass
        known.update(zip(others, thread_map(lambda n: distance(updates[n], judge, keys), others)))
        dist = {n: known[n] for n in updates}
        cos = {n: head_cosine(u, judge, reference, head_keys) for n, u in updates.items()} if check_heads else {}
        body = {}
        if norms:
            judge_norm = distance(judge, start, keys)
            body = {n: body_cosine(norms[n], judge_norm, dist[n]) for n in updates}
        scored = round_scores(dist, policy, cos, signs, body if body_scored else None)
        return res, dist, scored, cos, body

    active = list(active)
    if not active:
        raise ValueError("no active site to aggregate")
    res, dist, scored, cos, body = run(active)
    # Every active site's count as the cap left it in the first pass; sites kept after exclusion get the final one.
    used = {n: float(c) for n, c in zip(active, res.used_counts)} if res.used_counts is not None else {}
    far = [n for n in active if scored[n][1] == 0.0]
    keep = [n for n in active if n not in far]
    excluded: tuple = ()
    if far and len(keep) >= min_keep:
        res, dist, scored, cos, body = run(keep)
        excluded, active = tuple(far), keep
    weights = {n: 0.0 for n in updates}
    weights.update({n: float(w) for n, w in zip(active, res.site_weights)})
    if res.used_counts is not None:
        used.update({n: float(c) for n, c in zip(active, res.used_counts)})
    return RoundOutcome(res, weights, dist, scored, excluded, used, cos, signs, body, body_scored)


def policy_body_rule(policy) -> bool:
    """Whether the policy has the body rule on (TrustPolicy.body_cosine_bad >= -1; a cosine is never below -1)."""
    return getattr(policy, "body_cosine_bad", -2.0) >= -1.0


def body_norms(updates: Mapping[str, Mapping[str, np.ndarray]], start, direction=None) -> dict:
    """site -> update_norm of its clear move from start, for the body rule ({} without a start). The norms screening
    measured (direction.norms) are used as they are; the others measured here."""
    if start is None:
        return {}
    known = dict(getattr(direction, "norms", None) or {})
    keys = distance_keys(start)
    todo = [n for n in updates if n not in known]
    known.update(zip(todo, thread_map(lambda n: update_norm(updates[n], start, keys), todo)))
    return {n: float(known[n]) for n in updates}


def sign_offsets_of(updates: Mapping[str, Mapping[str, np.ndarray]], start, policy, direction=None) -> dict:
    """site -> sign balance of its clear move from start minus the median site's ({} without a start, with fewer
    than 3 sites, where a median of two is their mean, or with the rule off: TrustPolicy.sign_balance_bad > 2).
    The balances screening's pass counted (direction.balances) are used as they are; the others counted here."""
    from fedmed.server.robust.sign_balance import balance_offsets, sign_balance

    if start is None or len(updates) < 3 or getattr(policy, "sign_balance_bad", 3.0) > 2:
        return {}
    known = dict(getattr(direction, "balances", None) or {})
    keys = distance_keys(start)
    todo = [n for n in updates if n not in known]
    known.update(zip(todo, thread_map(lambda n: sign_balance(updates[n], start, keys), todo)))
    return balance_offsets({n: known[n] for n in updates})
