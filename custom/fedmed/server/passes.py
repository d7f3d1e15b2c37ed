"""Single passes over one update, chunk by chunk in cache: its L2 distance to another state, and (update_pass) its
content hash fused with its distance to the global model, its move's signs, its finiteness and its collusion sketch:
the screening's per-site work and what the sign rule and the near-copy test read, in the one pass screening makes
(issue 30: the sign rule's and the sketches' own passes were ~0.5 s of CPU at 50 sites).

Why chunked: the obvious `np.subtract(u, c, dtype=float64)` then a dot allocates a float64 copy of each parameter
(up to 8 MB, fresh pages from the kernel each time), writes it and reads it back: 24 bytes of memory traffic per
value instead of the 8 read here (two float32 inputs). Why float32 differences: the float32 -> float64 cast was
the cost (the cast subtraction + float64 dot of a 32k chunk took 4.5x the float32 subtraction + BLAS sdot); two
float32 values within a factor 2 of each other (an update and the model it started from, or the aggregate) have an
exact float32 difference (Sterbenz), the chunk's sum of squares has only positive terms (relative error ~1e-7
measured, 1e-6 tested), and the chunks' sums are added in float64. A chunk whose float32 sum is not finite (values
near float32's range) is done again in float64, so the result never overflows where the float64 formula would
not. Why one BLAS thread: the dot of a chunk is memory- and latency-bound; with OpenBLAS's pool of threads it took
40x the CPU on a loaded 2-core machine (0.46-0.74 s instead of 12 ms per DenseNet-121 update,
docs/bench_scale.md#passes-over-the-updates-issue-30), and the server's threads (fedmed.server.parallel) already run one update each.
Inside those threads their own limit holds (cores // threads: 1 on 2 cores; fedmed.server.parallel.limited_blas).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import blake3
import numpy as np

from fedmed.models.hashing import KnownDigest, stream_header
from fedmed.server.kernels import KERNEL_DTYPES, add_centred_gram, middle_of_rows, move_stats
from fedmed.server.parallel import limited_blas, thread_map
from fedmed.server.robust.geometric_median import key_groups

CHUNK = 1 << 17  # values per chunk: 512 kB of float32 (in L2 after the hash read it); 1 << 15 cost 1.4 ms more per
# DenseNet-121 update in update_pass (27.3 against 25.9 ms, the per-chunk interpreter overhead; 1 << 16: 26.3)


class _Buffers:
    """One chunk of float32 and one of float64, reused for every chunk of a pass."""

    def __init__(self):
        self.f32 = np.empty(CHUNK, np.float32)
        self.f64 = np.empty(CHUNK, np.float64)

    def sq_diff(self, a: np.ndarray, b: np.ndarray) -> float:
        """sum((a - b)^2) of two flat chunks (at most CHUNK values): in float32 when both are, else (or when that
        is not finite) in float64."""
        n = a.size
        if a.dtype == np.float32 and b.dtype == np.float32:
            d = self.f32[:n]
            np.subtract(a, b, out=d)
            sq = float(np.dot(d, d))
            if math.isfinite(sq):
                return sq
        d = self.f64[:n]
        np.subtract(a, b, out=d, dtype=np.float64)
        return float(np.dot(d, d))

    def sq_diff_kept(self, a: np.ndarray, b: np.ndarray) -> tuple[float, np.ndarray]:
        """sq_diff(a, b) and the difference it summed (a view of a buffer, valid until the next call)."""
        sq = self.sq_diff(a, b)
        n = a.size
        if a.dtype == np.float32 and b.dtype == np.float32 and math.isfinite(sq):
            return sq, self.f32[:n]
        return sq, self.f64[:n]


def squared_distance(update: Mapping[str, np.ndarray], center: Mapping[str, np.ndarray], keys: Sequence[str]) -> float:
    """sum over `keys` of ||update[k] - center[k]||^2, chunk sums added in float64, in one pass over both."""
    bufs = _Buffers()
    sq = 0.0
    with limited_blas(1), np.errstate(over="ignore"):  # a float32 overflow is redone in float64
        for k in keys:
            a, b = np.asarray(update[k]).reshape(-1), np.asarray(center[k]).reshape(-1)
            for start in range(0, a.size, CHUNK):
                sq += bufs.sq_diff(a[start : start + CHUNK], b[start : start + CHUNK])
    return sq


def hash_and_norm(
    params: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray], keys: Sequence[str]
) -> tuple[str, float]:
    """(fedmed.models.hashing.params_blake3(params), fedmed.server.aggregation.update_norm(params, reference, keys)) in one pass
    (update_pass, without its extras)."""
    done = update_pass(params, reference, keys)
    return done.sha, done.norm


@dataclass(frozen=True)
class UpdatePass:
    """What one pass over an update found (update_pass). up / down: coordinates of the distance keys where the
    update is above / below the reference, as fedmed.server.robust.sign_balance.sign_balance counts them;
    non_finite: the floating-point parameters holding a NaN or an Inf (fedmed.server.aggregation.find_update_problem's
    test); sketch: the update's values at a SketchLayout's coordinates (float64), None without one."""

    sha: str
    norm: float
    up: int
    down: int
    non_finite: frozenset
    sketch: Optional[np.ndarray] = None


@dataclass(frozen=True)
class SketchLayout:
    """Sampled coordinates to gather during a pass, split by the pass's chunks once for all the round's updates:
    key -> {chunk start: (first position in the output, offsets within that chunk)}, and the output's length
    (fedmed.server.robust.collusion.UpdateSketch.layout)."""

    chunks: Mapping[str, dict]
    size: int

    @classmethod
    def of(cls, picks: Sequence[tuple]) -> "SketchLayout":
        """picks: (key, sorted offsets within that key), in the output's order."""
        chunks, first = {}, 0
        for key, idx in picks:
            chunk = idx // CHUNK
            cuts = [0, *(np.flatnonzero(np.diff(chunk)) + 1).tolist(), idx.size]
            per = {}
            for lo, hi in zip(cuts[:-1], cuts[1:]):
                if hi > lo:
                    start = int(chunk[lo]) * CHUNK
                    per[start] = (first + lo, idx[lo:hi] - start)
            chunks[key] = per
            first += idx.size
        return cls(chunks, first)


def gradual_underflow() -> bool:
    """Whether float32 subtraction in this thread keeps subnormal results (IEEE's default; a library built with
    flush-to-zero can turn it off per thread). Then the sign of a difference is the comparison's, exactly: x - y
    rounds to 0 only when x == y."""
    a = np.full(16, 2e-38, np.float32)
    return bool(np.all(np.subtract(a, np.float32(1.9e-38)) > 0))


def update_pass(
    params: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray],
    keys: Sequence[str],
    sketch: Optional[SketchLayout] = None,
    digest: Optional[str] = None,
) -> UpdatePass:
    """Everything screening and the round's rules read of one update, in one pass over each parameter:
    - its BLAKE3 (fedmed.models.hashing.params_blake3: params_sha256's stream, name, dtype, shape, the array's
      bytes), or `digest`, that hash of these very arrays taken already (signature verification): not taken twice;
    - its distance to the reference over `keys` (update_norm: squares and sums in float64, one compiled read per
      float32 / float64 key, fedmed.server.kernels.move_stats; float32 chunk sums for other dtypes);
    - the signs of its move on `keys` (the sign rule's counts: the values compared);
    - which floating-point parameters hold a NaN or an Inf: a distance key whose sum of squares was finite has none
      (a NaN or Inf makes the difference, hence the sum, non-finite); any other is looked at;
    - with `sketch`, its values at the collusion sketch's coordinates.
    Call it on an update whose names and shapes are the reference's (fedmed.server.aggregation.find_update_problem)."""
    h = KnownDigest(digest) if digest is not None else blake3.blake3()
    wanted = set(keys)
    sq, up, down, bad = 0.0, 0, 0, set()
    out = np.empty(sketch.size, np.float64) if sketch is not None else None
    with limited_blas(1), np.errstate(over="ignore", invalid="ignore"):  # a float32 overflow is redone in float64
        for k in sorted(params):
            v = np.ascontiguousarray(params[k])
            h.update(k.encode())
            h.update(stream_header(v.dtype, v.shape))
            flat = v.reshape(-1)
            raw = flat.view(np.uint8)
            if k not in wanted:
                h.update(raw)
                if v.dtype.kind == "f" and has_non_finite(v):
                    bad.add(k)
                continue
            ref = np.ascontiguousarray(reference[k]).reshape(-1)
            picks = sketch.chunks.get(k) if sketch is not None else None
            if flat.dtype in KERNEL_DTYPES and ref.dtype in KERNEL_DTYPES:
                h.update(raw)
                key_sq, key_up, key_down = move_stats(flat, ref)  # one compiled read of both (fedmed.server.kernels)
                sq, up, down = sq + key_sq, up + key_up, down + key_down
                finite = math.isfinite(key_sq)
                for start, (first, offsets) in (picks or {}).items():
                    out[first : first + offsets.size] = flat[start + offsets]
            else:  # other dtypes (e.g. float16): numpy, chunk by chunk
                key_sq, key_up, key_down, finite = _chunked_move(flat, ref, h, picks, out)
                sq, up, down = sq + key_sq, up + key_up, down + key_down
            if not finite and v.dtype.kind == "f" and has_non_finite(v):
                bad.add(k)
    return UpdatePass(h.hexdigest(), float(np.sqrt(sq)), up, down, frozenset(bad), out)


def _chunked_move(flat: np.ndarray, ref: np.ndarray, h, picks: Optional[dict], out: Optional[np.ndarray]) -> tuple:
    """update_pass's work on one distance key of a dtype the compiled kernel does not take, chunk by chunk in cache
    with numpy: hashes the key's bytes into h, gathers its sketch picks into out; returns (sum of squared moves,
    coordinates above, below, whether every chunk's sum was finite)."""
    bufs, exact = _Buffers(), gradual_underflow()
    raw, size = flat.view(np.uint8), flat.itemsize
    sq, up, down, finite = 0.0, 0, 0, True
    for start in range(0, flat.size, CHUNK):
        h.update(raw[start * size : (start + CHUNK) * size])
        a, b = flat[start : start + CHUNK], ref[start : start + CHUNK]
        chunk_sq, d = bufs.sq_diff_kept(a, b)
        sq += chunk_sq
        finite = finite and math.isfinite(chunk_sq)
        # the difference's sign, or (flush-to-zero could hide a tiny move) the values compared
        x, y = (d, 0) if exact else (a, b)
        up += int(np.count_nonzero(x > y))
        down += int(np.count_nonzero(x < y))
        if picks and start in picks:
            first, offsets = picks[start]
            out[first : first + offsets.size] = a[offsets]
    return sq, up, down, finite


def has_non_finite(values: np.ndarray) -> bool:
    """Whether a floating-point array holds a NaN or an Inf. One sum in the array's own dtype (any NaN or Inf makes it
    non-finite; a float64 sum of float32 values spent twice the CPU on the cast), and only when that sum is not
    finite, which huge finite values can also cause, the element-wise look."""
    with np.errstate(over="ignore", invalid="ignore"):
        if math.isfinite(values.sum()):  # the method and math.isfinite: no numpy dispatch per layer
            return False
    return not bool(np.all(np.isfinite(values)))


REFERENCE_CHUNK = 1 << 12  # coordinates per block of reference_pass: 4k x K float32, 0.8 MB for K = 50, in L2
# A site farther than this many times the median site's distance from the reference gets its Gram row in float64
# (reference_pass): its float32 products' error, ~1e-7 of its squared norm, then stays below ~1e-6 of the honest
# sites' squared distances at the weighted mean Weiszfeld starts from.
FAR_ROWS = 4.0
# Up to this many sites the Gram part of a block is summed by a compiled float64 loop (fedmed.server.kernels.
# add_centred_gram) over blocks SMALL_GRAM_WIDTH wide: BLAS's sgemm per 4k block cost ~25 us a call at 3 sites,
# ~0.05 s a DenseNet-121 round; its products grow as k^2 and BLAS wins beyond a few sites.
SMALL_GRAM_SITES = 8
SMALL_GRAM_WIDTH = 1 << 15


@dataclass(frozen=True)
class ReferencePass:
    """What reference_pass found: the judging reference (key -> the coordinate median of the votes, in the
    parameter's dtype and shape) and the K x K Gram matrix of the updates centred on it (float64)."""

    reference: dict
    gram: np.ndarray

    @property
    def distances(self) -> np.ndarray:
        """||x_i - reference|| over the keys: the Gram matrix's diagonal (the updates are centred on the reference)."""
        return np.sqrt(np.maximum(np.diag(self.gram), 0.0))


def _votes(k: int, groups: Sequence[Sequence[int]]) -> tuple[list, list]:
    """(the sites that vote alone, the near-copy groups that vote once each: their members' mean)."""
    grouped = {i for g in groups for i in g}
    return [i for i in range(k) if i not in grouped], [list(g) for g in groups]


def _group_mean(flat: list, group: Sequence[int]) -> np.ndarray:
    acc = flat[group[0]].astype(np.float64)
    for i in group[1:]:
        acc += flat[i]
    acc /= len(group)
    return acc


def _key_votes(updates: Sequence[Mapping[str, np.ndarray]], key: str, singles: list, multi: list) -> tuple:
    """One key's (first update's array, every update flat, the votes' rows, the median's dtype, the Gram's dtype).
    The votes: a group's row is its members' mean, added in float64 in member order then divided (np.mean's sum
    over axis 0), cast to the parameter's dtype (coordinate_median_reference's rows). The median's dtype is
    _median_rows'; the Gram's is float32 for float32 updates."""
    ref = np.asarray(updates[0][key])
    flat = [np.asarray(u[key]).reshape(-1) for u in updates]
    rows = [flat[i] for i in singles] + [_group_mean(flat, g).astype(ref.dtype) for g in multi]
    return ref, flat, rows, np.result_type(*rows), np.promote_types(np.result_type(*flat), np.float32)


def _reference_of_keys(updates: Sequence[Mapping[str, np.ndarray]], keys: Sequence[str], groups) -> tuple:
    """reference_pass over some of the keys, one thread: (reference part, Gram part). Per block of coordinates, the
    k updates' values are copied as k rows (one memcpy each, no transpose), the votes' copy of them reordered in
    place by fedmed.server.kernels (the coordinate median), and the rows centred on it give the block's
    Gram part (one syrk). Keys whose votes are not float32 / float64 take _reference_of_keys_sorted."""
    k = len(updates)
    singles, multi = _votes(k, groups)
    gram = np.zeros((k, k), np.float64)
    out = {}
    small = k <= SMALL_GRAM_SITES
    width = SMALL_GRAM_WIDTH if small else REFERENCE_CHUNK  # float32 sums of BLAS's products: 4k values at most
    other = []
    for key in keys:
        ref, flat, rows, dtype, work = _key_votes(updates, key, singles, multi)
        if dtype not in KERNEL_DTYPES:
            other.append(key)
            continue
        n = ref.size
        res = np.empty(n, ref.dtype)
        w = min(n, width)
        block_of, votes_of = np.empty((k, w), work), np.empty((len(rows), w), dtype)
        for start in range(0, n, w):
            stop = min(n, start + w)
            block = block_of if stop - start == w else np.empty((k, stop - start), work)
            votes = votes_of if stop - start == w else np.empty((len(rows), stop - start), dtype)
            for i, f in enumerate(flat):
                block[i] = f[start:stop]
            if not multi and work == dtype:
                np.copyto(votes, block)
            else:
                for j, r in enumerate(rows):
                    votes[j] = r[start:stop]
            med = middle_of_rows(votes)
            res[start:stop] = med
            if small:
                add_centred_gram(block, med.astype(work, copy=False), gram)
            else:
                gram += _centred_rows_gram(block, med.astype(work, copy=False), flat, (start, stop))
        out[key] = res.reshape(ref.shape)
    if other:
        ref_part, gram_part = _reference_of_keys_sorted(updates, other, groups)
        out.update(ref_part)
        gram += gram_part
    return out, gram


def _centred_rows_gram(block: np.ndarray, med: np.ndarray, flat: list, span: tuple) -> np.ndarray:
    """block block^T of the (k, n) rows centred on med (in place), as float64: _centred_block_gram for rows."""
    block -= med
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is redone in float64 below
        g = block @ block.T
    if block.dtype == np.float64 or np.isfinite(g).all():
        return g.astype(np.float64, copy=False)
    start, stop = span
    wide = np.stack([f[start:stop].astype(np.float64) for f in flat])
    wide -= med.astype(np.float64)
    return wide @ wide.T


def _reference_of_keys_sorted(updates: Sequence[Mapping[str, np.ndarray]], keys: Sequence[str], groups) -> tuple:
    """_reference_of_keys for votes of other dtypes (e.g. float16): coordinates x sites blocks, sorted, as before
    the median network."""
    from fedmed.server.robust.collusion import SORT_NETWORK_MAX, _median_rows  # it imports this module

    k = len(updates)
    singles, multi = _votes(k, groups)
    gram = np.zeros((k, k), np.float64)
    out = {}
    for key in keys:
        ref, flat, rows, dtype, work = _key_votes(updates, key, singles, multi)
        res = np.empty(ref.size, ref.dtype)
        few = len(rows) <= SORT_NETWORK_MAX
        # few votes: sites x coordinates (contiguous copies; its transpose is the block), _median_rows' network
        block_of = np.empty((k, REFERENCE_CHUNK) if few else (min(ref.size, REFERENCE_CHUNK), k), work)
        sorted_of = np.empty((min(ref.size, REFERENCE_CHUNK), len(rows)), dtype)
        for start in range(0, ref.size, REFERENCE_CHUNK):
            stop = min(ref.size, start + REFERENCE_CHUNK)
            if few:  # a sort of a few values per coordinate costs more than the network's element-wise passes
                block = block_of[:, : stop - start]
                for i, f in enumerate(flat):
                    block[i] = f[start:stop]
                med = _median_rows([r[start:stop] for r in rows])
                res[start:stop] = med
                gram += _centred_block_gram(block.T, med.astype(work), flat, (start, stop))
                continue
            block, votes = block_of[: stop - start], sorted_of[: stop - start]
            for i, f in enumerate(flat):  # the one transposing gather of this block: coordinates x sites
                block[:, i] = f[start:stop]
            if not multi and work == dtype:
                np.copyto(votes, block)
            else:
                for j, r in enumerate(rows):
                    votes[:, j] = r[start:stop]
            med = _middle(votes)
            res[start:stop] = med
            gram += _centred_block_gram(block, med.astype(work), flat, (start, stop))
        out[key] = res.reshape(ref.shape)
    return out, gram


def _middle(votes: np.ndarray) -> np.ndarray:
    """Each row's median, sorted in place: the middle value, or for an even count the two middle values added then
    halved in the rows' dtype (np.median's and fedmed.server.robust.collusion._median_rows' values exactly)."""
    votes.sort(axis=1)
    m = votes.shape[1] // 2
    if votes.shape[1] % 2:
        return votes[:, m].copy()
    med = np.add(votes[:, m - 1], votes[:, m])
    med /= 2
    return med


def _centred_block_gram(block: np.ndarray, med: np.ndarray, flat: list, span: tuple) -> np.ndarray:
    """block^T block of the block centred on med (in place), as float64. Why float32 for float32 updates: the sgemm
    is 2.2x the dgemm here and needs no float64 copy of the block (docs/bench_scale.md, fourth pass); centred on the
    coordinate median, not the mean, so a far outlier does not shift the honest sites' coordinates and their
    distances keep float32's relative precision. A block whose float32 products are not finite (values near the
    float32 range) is done again in float64 from the updates."""
    block -= med[:, None]
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is redone in float64 below
        g = block.T @ block
    if block.dtype == np.float64 or np.isfinite(g).all():
        return g.astype(np.float64, copy=False)
    start, stop = span
    wide = np.stack([f[start:stop].astype(np.float64) for f in flat], axis=1)
    wide -= med.astype(np.float64)[:, None]
    return wide.T @ wide


def reference_pass(
    updates: Sequence[Mapping[str, np.ndarray]], keys: Sequence[str], groups: Sequence[Sequence[int]] = ()
) -> ReferencePass:
    """The judging reference and the geometric median's Gram matrix in one blocked pass over the updates (issue 30):
    per block of coordinates, the K sites' values copied as K rows; a copy of them put through a selection network
    (fedmed.server.kernels) gives the coordinate median of the votes (fedmed.server.robust.collusion.coordinate_median_reference's values bit for bit:
    each near-copy group, indices into updates, votes once with its members' mean); the gather centred on that
    median gives the block's Gram matrix, whose diagonal is each site's squared distance to the reference. Before,
    the median, the Gram matrix (centred on the weighted mean, float64) and the distances were three passes.

    Every Weiszfeld iterate is a convex combination of the updates, so the geometric median's distances are the
    same from a Gram matrix centred on any point (fedmed.server.robust.geometric_median.weiszfeld_on_gram). The
    keys in key_groups on the server's threads, the groups' Gram parts summed in group order (the same result on
    any machine)."""
    if not updates:
        raise ValueError("cannot take the median of zero updates")
    k = len(updates)
    for g in groups:
        if not g or any(not 0 <= i < k for i in g):
            raise ValueError(f"near-copy group {list(g)} names no update or one outside 0..{k - 1}")
    runs = key_groups(updates[0], list(keys))
    parts = thread_map(lambda part: _reference_of_keys(updates, part, groups), runs)
    gram = np.zeros((k, k), np.float64)
    merged: dict = {}
    for ref, g in parts:
        merged.update(ref)
        gram += g
    reference = {key: merged[key] for key in keys}
    sq = np.diag(gram)
    far = np.flatnonzero(sq > FAR_ROWS**2 * np.median(sq)).tolist()
    if far and any(np.asarray(updates[0][key]).dtype.itemsize < 8 for key in keys):
        # A far site's float32 products carry errors ~1e-7 of its own (large) norm, which swamp the honest sites'
        # distances as soon as Weiszfeld weighs it (its first iterate, the weighted mean, weighs every site): its
        # row and column again in float64, one more pass, only in a round with such a site.
        rows = sum(thread_map(lambda part: _far_rows(updates, part, reference, far), runs))
        gram[:, far] = rows
        gram[far, :] = rows.T
    return ReferencePass(reference, gram)


def _far_rows(updates: Sequence[Mapping[str, np.ndarray]], keys: Sequence[str], reference: dict, far: list):
    """The Gram matrix's columns of the `far` sites over some keys, in float64, the updates centred on reference."""
    cols = np.zeros((len(updates), len(far)), np.float64)
    buf = np.empty((len(updates), REFERENCE_CHUNK), np.float64)
    for key in keys:
        flat = [np.asarray(u[key]).reshape(-1) for u in updates]
        centre = np.asarray(reference[key], np.float64).reshape(-1)
        for start in range(0, centre.size, REFERENCE_CHUNK):
            stop = min(centre.size, start + REFERENCE_CHUNK)
            wide = buf[:, : stop - start]
            for i, f in enumerate(flat):
                wide[i] = f[start:stop]
            wide -= centre[start:stop]
            cols += wide @ wide[far].T
    return cols
