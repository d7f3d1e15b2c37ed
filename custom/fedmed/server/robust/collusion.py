"""Colluding and near-copied updates, and a reference a minority cannot capture.

Why this exists (issue 28): hospitals' updates are nearly orthogonal (norm ~5.4 each, pairwise distances up to 7.6
on the red team's federation), so two sites sending one common point hold the weighted geometric median of five
(Weiszfeld weight 1.0), and every rule measured against that captured aggregate then rejects the honest three.

Two answers, both pure numpy:

* near_copy_clusters / CollusionTracker: sites whose moves are far closer to each other than any site is to its
  nearest honest neighbour are counted once together (their weights shared), this round or, as FoolsGold
  (Fung, Yoon and Beschastnikh, "The Limitations of Federated Learning in Sybil Settings", RAID 2020) measures,
  on their moves summed over the rounds so far, where per-round noise added to dodge the first test averages out
  while the shared direction adds up. Counted once, not rejected: a copy cannot be told from its original, so
  rejecting both would let a hostile site knock out the honest site it copies.
* coordinate_median_reference: the coordinate-wise median (Yin et al., "Byzantine-Robust Distributed Learning:
  Towards Optimal Statistical Rates", ICML 2018) of the sites' parameters with each near-copy cluster one vote.
  With fewer than half the votes hostile, every coordinate lies between the smallest and the largest honest value,
  whatever the hostile votes are, so 2 colluders of 5 cannot move it outside the honest box; the geometric median
  has no such per-point guarantee once a cluster sits inside the honest cloud. It is the reference the distance and
  direction rules judge every site against (fedmed.server.aggregation.aggregate_and_score); the model itself stays the
  weighted geometric median, whose whole-vector view keeps it better than the coordinate median at aggregation
  (docs/bench_robustness.md).

Both compare moves on a fixed random subset of coordinates (UpdateSketch), so the history costs SKETCH_SIZE floats
per site, not a model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from fedmed.server.parallel import thread_map
from fedmed.server.passes import SketchLayout
from fedmed.server.robust.geometric_median import distance_keys, key_groups

SKETCH_SIZE = 1 << 16  # sampled coordinates: distances on 65k of DenseNet-121's 7M agree with the full ones to ~1%
SKETCH_SEED = 20200  # fixed: every round and every restart samples the same coordinates
# A pair closer than this fraction of the median nearest-neighbour distance is a near-copy. Honest hospitals' moves
# are nearly orthogonal, so a site's nearest neighbour is about as far as any other (ratio ~1; 0.5 would already be
# an unusually close honest pair); identical trainable parameters with their own BatchNorm statistics give 0, and
# noise small enough not to change what the copy does stays far below 0.1.
NEAR_COPY_RATIO = 0.1
MEDIAN_CHUNK = 1 << 18  # coordinates per median block: K x 256k float32, 5 MB for K = 5
SORT_NETWORK_MAX = 16
HISTORY_MIN_ROUNDS = 2  # the summed-moves test needs two rounds: one round is the per-round test


class UpdateSketch:
    """A fixed random subset of the trainable coordinates of a model (all of them for a model with fewer than
    SKETCH_SIZE). of(update, reference) is the update's move (update - reference) on those coordinates, float64."""

    def __init__(self, reference: Mapping[str, np.ndarray], size: int = SKETCH_SIZE, seed: int = SKETCH_SEED):
        if size < 1:
            raise ValueError(f"sketch size must be >= 1, got {size}")
        self.keys = distance_keys(reference)
        sizes = np.array([np.asarray(reference[k]).size for k in self.keys], np.int64)
        total = int(sizes.sum())
        flat = (
            np.arange(total)
            if total <= size
            else np.sort(np.random.default_rng(seed).choice(total, size=size, replace=False))
        )
        starts = np.concatenate([[0], np.cumsum(sizes)])
        self._picks = []  # (key, offsets within that key) for keys with sampled coordinates
        for i, k in enumerate(self.keys):
            lo, hi = np.searchsorted(flat, [starts[i], starts[i + 1]])
            if hi > lo:
                self._picks.append((k, flat[lo:hi] - starts[i]))
        self.signature = tuple((k, np.shape(reference[k])) for k in self.keys)

    def fits(self, reference: Mapping[str, np.ndarray]) -> bool:
        return tuple((k, np.shape(reference[k])) for k in distance_keys(reference)) == self.signature

    def of(self, update: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray] | np.ndarray) -> np.ndarray:
        """reference: a state, or its own sampled values (values(reference)), taken once for many updates."""
        base = reference if isinstance(reference, np.ndarray) else self.values(reference)
        return self.values(update) - base if self._picks else np.zeros(0)

    def layout(self) -> SketchLayout:
        """The sampled coordinates as fedmed.server.passes.update_pass gathers them during screening's pass (its
        sketch equals values(update), without a second pass over the update)."""
        return SketchLayout.of(self._picks)

    def values(self, state: Mapping[str, np.ndarray]) -> np.ndarray:
        """The state's values at the sampled coordinates, float64 (each layer gathered, then one cast: the same
        values as a cast per layer)."""
        if not self._picks:
            return np.zeros(0)
        parts = [np.asarray(state[k]).reshape(-1)[idx] for k, idx in self._picks]
        return np.concatenate(parts).astype(np.float64)


@dataclass(frozen=True)
class Clusters:
    groups: tuple  # tuples of sites (2 or more) counted once together, sorted
    ratios: dict  # (site, site) -> pair distance / median nearest-neighbour distance, for pairs in a group


def near_copy_clusters(vectors: Mapping[str, np.ndarray], ratio: float = NEAR_COPY_RATIO) -> Clusters:
    """Groups of sites linked by pairs at distance <= ratio x the median over sites of the nearest-neighbour
    distance. Scale-free. Why the nearest neighbour's median and not all pairs': with one far outlier among tight
    honest sites, the median pair distance is an honest-to-outlier one, and every honest pair would look close; a
    site's nearest neighbour is an honest one either way, and colluders (fewer than half the sites) cannot set the
    median of it."""
    sites = sorted(vectors)
    if len(sites) < 2:
        return Clusters((), {})
    x = np.stack([vectors[s] for s in sites])
    sq = np.sum(x * x, axis=1)
    d = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2.0 * (x @ x.T), 0.0))
    np.fill_diagonal(d, np.inf)
    nearest = float(np.median(d.min(axis=1)))
    parent = list(range(len(sites)))

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    ratios = {}
    for i in range(len(sites)):
        for j in range(i + 1, len(sites)):
            if d[i, j] <= ratio * nearest or d[i, j] == 0.0:
                ratios[(sites[i], sites[j])] = float(d[i, j] / nearest) if nearest > 0 else 0.0
                parent[root(i)] = root(j)
    groups: dict = {}
    for i, s in enumerate(sites):
        groups.setdefault(root(i), []).append(s)
    return Clusters(tuple(sorted(tuple(g) for g in groups.values() if len(g) > 1)), ratios)


@dataclass
class CollusionFinding:
    """One round's verdict: site -> weight factor (1/m in a cluster of m), site -> reason, the groups."""

    factors: dict = field(default_factory=dict)
    reasons: dict = field(default_factory=dict)
    groups: tuple = ()


class CollusionTracker:
    """Per-site moves summed over the job's rounds (on an UpdateSketch), and each round's near-copy clusters, from
    this round's moves or the summed ones."""

    def __init__(self, ratio: float = NEAR_COPY_RATIO, sketch_size: int = SKETCH_SIZE):
        if not 0 < ratio < 1:
            raise ValueError(f"near_copy_ratio must be in (0, 1), got {ratio}")
        self.ratio = ratio
        self.sketch_size = sketch_size
        self.sketch: UpdateSketch | None = None
        self.history: dict[str, np.ndarray] = {}  # site -> summed moves
        self.rounds: dict[str, int] = {}  # site -> rounds in that sum

    def sketch_for(self, reference: Mapping[str, np.ndarray]) -> UpdateSketch:
        """This job's sketch for models shaped as `reference` (a new one, and a new history, when the model's
        shape changed)."""
        if self.sketch is None or not self.sketch.fits(reference):
            self.sketch, self.history, self.rounds = UpdateSketch(reference, self.sketch_size), {}, {}
        return self.sketch

    def observe(
        self,
        updates: Mapping[str, Mapping[str, np.ndarray]],
        reference: Mapping[str, np.ndarray],
        sampled: Mapping[str, np.ndarray] | None = None,
    ):
        """Fold this round's valid updates into the history and return the CollusionFinding. sampled: site -> its
        update's values at the sketch's coordinates (sketch_for(reference).values(update)), when screening's pass
        already gathered them (fedmed.server.passes.update_pass); the other sites' are gathered here."""
        sketch = self.sketch_for(reference)
        base = sketch.values(reference)  # once, not once per site
        sampled = sampled or {}

        def move(s):
            return sampled[s] - base if s in sampled else sketch.of(updates[s], base)

        sites = list(updates)  # the sketches not yet taken on the server's threads (fedmed.server.parallel)
        moves = dict(zip(sites, thread_map(move, sites) if len(sampled) < len(sites) else map(move, sites)))
        for s, m in moves.items():
            self.history[s] = self.history.get(s, 0.0) + m
            self.rounds[s] = self.rounds.get(s, 0) + 1
        long_run = {s: self.history[s] for s in moves if self.rounds[s] >= HISTORY_MIN_ROUNDS}
        # the two tests side by side on the server's threads: they were the round's longest serial stretch (issue 30)
        tests = [moves, long_run] if len(long_run) >= 3 else [moves]
        now, summed = [*thread_map(lambda v: near_copy_clusters(v, self.ratio), tests), Clusters((), {})][:2]
        return _finding(now, summed, self.ratio)


def _finding(now: Clusters, summed: Clusters, ratio: float) -> CollusionFinding:
    parent: dict = {}

    def root(s):
        parent.setdefault(s, s)
        while parent[s] != s:
            s = parent[s]
        return s

    for g in now.groups + summed.groups:
        for s in g[1:]:
            parent[root(s)] = root(g[0])
    groups: dict = {}
    for s in list(parent):
        groups.setdefault(root(s), []).append(s)
    out = CollusionFinding(groups=tuple(sorted(tuple(sorted(g)) for g in groups.values())))
    for g in out.groups:
        for s in g:
            out.factors[s] = 1.0 / len(g)
            why = []
            for label, found in (("this round", now.ratios), ("summed over the rounds so far", summed.ratios)):
                pairs = [(p, r) for p, r in found.items() if s in p]
                if pairs:
                    (a, b), r = min(pairs, key=lambda pr: pr[1])
                    why.append(f"{label} {r:.3f}x the median nearest-neighbour distance from {b if a == s else a}")
            out.reasons[s] = (
                f"near-copy of {', '.join(x for x in g if x != s)} ({'; '.join(why)}; at most {ratio} is a copy): "
                f"counted once with {'it' if len(g) == 2 else 'them'}"
            )
    return out


def _median_rows(rows: list) -> np.ndarray:
    """Element-wise median of equal-length rows, as np.median(axis=0) gives it (the mean of the two middle values,
    in the rows' dtype, for an even count). Up to SORT_NETWORK_MAX rows, an odd-even transposition sort of whole
    rows (element-wise min / max: K^2 / 2 vectorised passes), ~25x faster than np.median(axis=0) for K = 5
    (measured: 5 ms against 130-290 ms per 256k-coordinate block); beyond, _median_by_sorting."""
    k = len(rows)
    if k > SORT_NETWORK_MAX:
        return _median_by_sorting(rows)
    r = [np.array(x, copy=True) for x in rows]
    for p in range(k):
        for i in range(p % 2, k - 1, 2):
            lo = np.minimum(r[i], r[i + 1])
            np.maximum(r[i], r[i + 1], out=r[i + 1])
            r[i] = lo
    return r[k // 2] if k % 2 else (r[k // 2 - 1] + r[k // 2]) / 2


SORT_CHUNK = 1 << 13  # coordinates per sorted block: 8k x K values, 1.6 MB for K = 50, in L2 (fastest of 512-32k)


def _median_by_sorting(rows: list) -> np.ndarray:
    """_median_rows for many rows: each block of SORT_CHUNK coordinates copied into one (coordinates x K) buffer,
    each coordinate's K values sorted in place (numpy's vectorised sort of short contiguous rows) and the middle
    read. Why not np.median(axis=0): it partitions along the strided axis, 7.5 s of CPU for 50 rows of
    DenseNet-121's 7M coordinates against ~1 s this way (issue 30); the values picked are the same."""
    k, n = len(rows), rows[0].size
    dtype = np.result_type(*rows)
    out = np.empty(n, dtype)
    buf = np.empty((min(n, SORT_CHUNK), k), dtype)
    m = k // 2
    for start in range(0, n, SORT_CHUNK):
        stop = min(n, start + SORT_CHUNK)
        block = buf[: stop - start]
        for i, row in enumerate(rows):
            block[:, i] = row[start:stop]
        block.sort(axis=1)
        if k % 2:
            out[start:stop] = block[:, m]
        else:  # as np.median: the two middle values added, then halved, in the rows' dtype
            np.add(block[:, m - 1], block[:, m], out=out[start:stop])
            out[start:stop] /= 2
    return out


def coordinate_median_reference(
    updates: Sequence[Mapping[str, np.ndarray]], keys: Sequence[str], groups: Sequence[Sequence[int]] = ()
) -> dict:
    """Coordinate-wise median of the given parameters across the updates, each group (indices of a near-copy
    cluster) one vote (its members' mean), in the parameters' own dtype (a reference, not a model: float32 is
    enough). The parameters in key_groups on the server's threads (fedmed.server.parallel), each in chunks of
    MEDIAN_CHUNK coordinates."""
    if not updates:
        raise ValueError("cannot take the median of zero updates")
    grouped = {i for g in groups for i in g}
    votes = [[i] for i in range(len(updates)) if i not in grouped] + [list(g) for g in groups]

    def of_keys(part):
        out = {}
        for key in part:
            ref = np.asarray(updates[0][key])
            flat = [np.asarray(u[key]).reshape(-1) for u in updates]
            rows = [
                flat[v[0]] if len(v) == 1 else np.mean([flat[i] for i in v], axis=0, dtype=np.float64).astype(ref.dtype)
                for v in votes
            ]
            res = np.empty(ref.size, ref.dtype)
            for start in range(0, ref.size, MEDIAN_CHUNK):
                sl = slice(start, min(ref.size, start + MEDIAN_CHUNK))
                res[sl] = _median_rows([r[sl] for r in rows])
            out[key] = res.reshape(ref.shape)
        return out

    parts = thread_map(of_keys, key_groups(updates[0], list(keys)))
    merged = {k: v for part in parts for k, v in part.items()}
    return {k: merged[k] for k in keys}
