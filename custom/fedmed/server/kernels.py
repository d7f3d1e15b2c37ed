"""Compiled (numba) kernels of the round's passes over the updates (issue 30, item 1): where numpy needs a temporary
array, a transposing copy or an interpreted call per small block, one loop the compiler vectorises does the work.

- move_stats: an update's squared distance to the reference and the signs of its move, in one read of both
  (fedmed.server.passes.update_pass; numpy took a float32 difference buffer, a BLAS dot and two boolean
  temporaries per 128k-value chunk: ~10-18 ms per DenseNet-121 update against ~2-3 ms).
- middle_of_rows: the coordinate median of K rows by a selection network (fedmed.server.passes.reference_pass).
  The median is the same comparisons for every coordinate, so a fixed list of compare-exchanges (Batcher's odd-even
  merge sort, pruned to the comparators the middle output(s) depend on) runs as min / max over whole rows, which
  the compiler vectorises across coordinates. numpy's vectorised sort needs each coordinate's K values contiguous:
  a transposing copy of every block (~0.45 core-s at 50 DenseNet-121 updates) then a sort (~0.6); the network reads
  the rows where they are (~0.35 core-s at K = 50).
Why by hand: no well-kept library computes either without those temporaries (np.median / np.partition along axis 0,
torch.median and torch.kthvalue were each slower for the median, docs/bench_scale.md). Why numba: an interpreted
compare-exchange per (pair, block) costs ~1.5 us of numpy dispatch, ~4 s a round at K = 50.

Both release the GIL (the server's threads run their key groups side by side) and are compiled once per process
for float32 and float64 (cache=True keeps the machine code beside this file: ~0.5 s the first time)."""

from __future__ import annotations

import functools
import threading
from functools import lru_cache

import numpy as np


class _Compiled:
    """fn compiled by numba at its first call. Why not at import: the hospitals' processes import this module (the
    site round shares the server's result types) and never run a kernel; numba would cost each ~0.25 s and ~55 MB
    there. numba.njit with its on-disk cache where one can be written (beside this file, else the user's cache
    folder); without it where neither can (a read-only install with no writable home: numba refuses cache=True
    there, and the kernels then compile once per process, ~0.5 s, instead of failing)."""

    _lock = threading.Lock()

    def __init__(self, fn, options: dict):
        self.fn, self.options, self._dispatcher = fn, options, None
        functools.update_wrapper(self, fn)

    def dispatcher(self):
        if self._dispatcher is None:
            with self._lock:
                if self._dispatcher is None:
                    import numba

                    try:
                        self._dispatcher = numba.njit(cache=True, nogil=True, **self.options)(self.fn)
                    except RuntimeError:  # "cannot cache function ...: no locator available for file ..."
                        self._dispatcher = numba.njit(cache=False, nogil=True, **self.options)(self.fn)
        return self._dispatcher

    def __call__(self, *args):
        return self.dispatcher()(*args)

    @property
    def signatures(self) -> list:
        return self.dispatcher().signatures


def _compiled(**options):
    return lambda fn: _Compiled(fn, options)


# dtypes the compiled kernels take; any other takes the caller's numpy path
KERNEL_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def batcher_comparators(k: int) -> list[tuple[int, int]]:
    """Batcher's odd-even merge sort network for k inputs (any k >= 1): compare-exchange pairs (lo, hi), in order;
    after them row lo <= row hi at every pair, and the rows are sorted. Knuth, TAOCP vol. 3, 5.3.4, exercise 32's
    form for arbitrary k (Batcher, "Sorting networks and their applications", AFIPS 1968)."""
    pairs, p = [], 1
    while p < k:
        step = p
        while step >= 1:
            for j in range(step % p, k - step, 2 * step):
                for i in range(min(step, k - j - step)):
                    if (i + j) // (2 * p) == (i + j + step) // (2 * p):
                        pairs.append((i + j, i + j + step))
            step //= 2
        p *= 2
    return pairs


@_compiled(fastmath={"reassoc", "contract"})
def _move_stats(update, reference):  # pragma: no cover - compiled; tested through move_stats
    sq = 0.0
    up = 0
    down = 0
    for j in range(update.size):
        x = update[j]
        y = reference[j]
        d = np.float64(x) - np.float64(y)
        sq += d * d  # reassociated (vectorised): float64 partial sums of exact-ish float64 squares
        up += x > y
        down += x < y
    return sq, up, down


def move_stats(update: np.ndarray, reference: np.ndarray) -> tuple[float, int, int]:
    """(sum((update - reference)^2), #coordinates above, #coordinates below) of two flat float32 / float64 arrays of
    one size. The differences and squares in float64 (two float32 values' difference is exact there to ~1e-16, a
    float32 square cannot overflow it), added in float64: a NaN or an Inf in either array, and nothing else, makes
    the sum non-finite. The signs are the values compared, exactly."""
    if update.ndim != 1 or reference.shape != update.shape:
        raise ValueError(f"move_stats takes two flat arrays of one size, got {update.shape} and {reference.shape}")
    if update.dtype not in KERNEL_DTYPES or reference.dtype not in KERNEL_DTYPES:
        raise ValueError(f"move_stats takes float32/float64 arrays, got {update.dtype} and {reference.dtype}")
    sq, up, down = _move_stats(update, reference)
    return float(sq), int(up), int(down)


@_compiled()
def _weighted_rows(rows, beta, acc, out):  # pragma: no cover - compiled; tested through weighted_rows
    n = rows.shape[1]
    for j in range(n):
        acc[j] = 0.0
    for i in range(rows.shape[0]):
        w = beta[i]
        row = rows[i]
        for j in range(n):
            acc[j] += w * np.float64(row[j])
    for j in range(n):
        out[j] = acc[j]


def weighted_rows(rows: np.ndarray, beta: np.ndarray, out: np.ndarray) -> None:
    """out[:] = sum_i beta[i] * rows[i], each coordinate's terms added in float64 in row order, then cast to out's
    dtype (the geometric median's combine: fedmed.server.robust.geometric_median.combine). rows: (k, n) float32 /
    float64 with contiguous rows; beta: k float64 weights; out: n values of a float dtype."""
    k, n = rows.shape
    if rows.dtype not in KERNEL_DTYPES or out.dtype not in KERNEL_DTYPES or rows.strides[1] != rows.itemsize:
        raise ValueError(f"weighted_rows takes float32/float64 rows, got {rows.dtype} rows into {out.dtype}")
    if beta.shape != (k,) or out.shape != (n,):
        raise ValueError(f"weighted_rows: {beta.shape} weights and {out.shape} out for {rows.shape} rows")
    _weighted_rows(rows, np.asarray(beta, np.float64), np.empty(n, np.float64), out)


@_compiled(fastmath={"reassoc", "contract"})
def _add_centred_gram(rows, centre, gram):  # pragma: no cover - compiled; tested through add_centred_gram
    k, n = rows.shape
    for i in range(k):
        row = rows[i]
        for j in range(n):
            row[j] -= centre[j]
    for a in range(k):
        ra = rows[a]
        for b in range(a, k):
            rb = rows[b]
            s = 0.0
            for j in range(n):
                s += np.float64(ra[j]) * np.float64(rb[j])  # reassociated: float64 lanes
            gram[a, b] += s
            if b != a:
                gram[b, a] += s


def add_centred_gram(rows: np.ndarray, centre: np.ndarray, gram: np.ndarray) -> None:
    """rows -= centre (in place, in the rows' dtype), then gram += rows rows^T with float64 products and sums: the
    reference pass's Gram part for a few sites (fedmed.server.passes.SMALL_GRAM_SITES), where BLAS's per-call cost
    outweighs its speed and float64 sums let a block be as wide as wanted. rows: (k, n) float32 / float64 with
    contiguous rows; centre: n values of the rows' dtype; gram: (k, k) float64."""
    k, n = rows.shape
    if rows.dtype not in KERNEL_DTYPES or centre.dtype != rows.dtype or rows.strides[1] != rows.itemsize:
        raise ValueError(f"add_centred_gram takes float32/float64 rows and centre, got {rows.dtype}, {centre.dtype}")
    if centre.shape != (n,) or gram.shape != (k, k) or gram.dtype != np.float64:
        raise ValueError(f"add_centred_gram: {centre.shape} centre, {gram.dtype} {gram.shape} gram for {rows.shape}")
    _add_centred_gram(rows, centre, gram)


@lru_cache(maxsize=256)
def median_comparators(k: int) -> np.ndarray:
    """batcher_comparators(k) less the comparators the middle row(s) do not depend on (walked backwards from the
    middle output(s)): (m, 2) int64. 330 of 403 for k = 50, 898 of 1,104 for k = 100."""
    if k < 1:
        raise ValueError(f"cannot take the median of {k} rows")
    need = {k // 2} if k % 2 else {k // 2 - 1, k // 2}
    kept = []
    for lo, hi in reversed(batcher_comparators(k)):
        if lo in need or hi in need:
            kept.append((lo, hi))
            need.update((lo, hi))
    return np.array(kept[::-1], np.int64).reshape(-1, 2)


@_compiled()
def _compare_exchange(rows, pairs):  # pragma: no cover - compiled; tested through middle_of_rows
    n = rows.shape[1]
    for c in range(pairs.shape[0]):
        lo = rows[pairs[c, 0]]
        hi = rows[pairs[c, 1]]
        for j in range(n):
            x = lo[j]
            y = hi[j]
            lo[j] = min(x, y)  # branch-free: vectorised across the coordinates
            hi[j] = max(x, y)


def middle_of_rows(rows: np.ndarray) -> np.ndarray:
    """The element-wise median of the rows of a C-contiguous (k, n) float32 / float64 array, which it reorders in
    place (each column's middle value(s) end in the middle row(s)). Releases the GIL: the server's threads run
    their key groups side by side."""
    if rows.ndim != 2 or rows.dtype not in KERNEL_DTYPES or not rows.flags.c_contiguous:
        raise ValueError(
            f"middle_of_rows takes a C-contiguous 2-D float32/float64 array, got {rows.dtype} {rows.shape}"
        )
    k = rows.shape[0]
    _compare_exchange(rows, median_comparators(k))
    m = k // 2
    if k % 2:
        return rows[m].copy()
    med = np.add(rows[m - 1], rows[m])
    med /= 2
    return med


_warm = False


def warm_up() -> None:
    """Load (or compile) every kernel for float32 and float64 now, once per process: the round engine calls it when
    it is made (the job's start), so the first round does not carry numba's start-up (~0.3 s loading the cached
    code, ~2 s compiling it where no cache is)."""
    global _warm
    if _warm:
        return
    for dtype in KERNEL_DTYPES:
        rows = np.zeros((3, 8), dtype)
        middle_of_rows(rows.copy())
        move_stats(rows[0], rows[1])
        for block in (rows, np.zeros((3, 16), dtype)[:, :8]):  # whole buffers and blocks of wider ones
            weighted_rows(block, np.ones(3), np.empty(8, dtype))
        add_centred_gram(rows.copy(), rows[0].copy(), np.zeros((3, 3)))
    _warm = True
