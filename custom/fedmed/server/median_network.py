"""The coordinate median of K rows by a selection network, compiled (numba): the judging reference's median at 50-100
sites without transposing the updates or sorting each coordinate's K values (issue 30, item 1).

Why a network: the median is the same comparisons for every coordinate, so a fixed list of compare-exchanges
(Batcher's odd-even merge sort, pruned to the comparators the middle output(s) depend on) runs as min / max over
whole rows, which the compiler vectorises across coordinates. numpy's vectorised sort needs each coordinate's K
values contiguous: a transposing copy of every block (~0.45 core-s at 50 DenseNet-121 updates) then a sort (~0.6);
the network reads the rows where they are (~0.3 core-s at K = 50, measured against that sort in bench_passes).
Why by hand: no well-kept library computes a per-coordinate median of a few rows without the transpose
(np.median / np.partition along axis 0, torch.median and torch.kthvalue were each slower, docs/bench_scale.md).
Why numba: an interpreted compare-exchange per (pair, block) costs ~1.5 us of numpy dispatch, ~4 s a round at K = 50.

The values are np.median's exactly for finite rows (the middle value, or the two middle values added then halved
in the rows' dtype); the round's screening has refused every update holding a NaN or an Inf before this runs."""

from __future__ import annotations

from functools import lru_cache

import numba
import numpy as np

# dtypes the compiled kernel takes; any other falls back to the caller's numpy path
NETWORK_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


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


@numba.njit(cache=True, nogil=True)
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
    if rows.ndim != 2 or rows.dtype not in NETWORK_DTYPES or not rows.flags.c_contiguous:
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
