"""Smoothed Weiszfeld geometric median over whole flattened updates (Pillutla et al., "Robust Aggregation for
Federated Learning", 2022), computed through a K x K Gram matrix.

Why by hand: the `geom-median` reference implementation iterates on the D-dimensional vectors (D = 7M for
DenseNet-121), touching all of them every iteration. Every Weiszfeld iterate is a convex combination
z = sum_i beta_i x_i of the inputs, so the distances it needs are
    ||x_i - z||^2 = C_ii - 2 (C beta)_i + beta^T C beta,      C = Gram matrix of the (centred) inputs.
We build C in one chunked float64 pass (centring each chunk on the weighted mean first, so large common offsets
do not cancel catastrophically), iterate on K x K numbers, and form the median in a second pass. Memory beyond the
inputs is one chunk of K x B float64 per thread (fedmed.server.parallel) plus the output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from fedmed.server.parallel import thread_map

CHUNK = 1 << 14  # coordinates per pass chunk: K x 16k float64 = 2 MB for K = 16, cache-sized (measured fastest)
KEY_GROUPS = 8  # the parameters are split into this many groups for the threads (fedmed.server.parallel.MAX_THREADS)


@dataclass(frozen=True)
class MedianResult:
    median: dict  # name -> array, same dtypes/shapes as the inputs
    site_weights: np.ndarray  # final Weiszfeld weights beta (sum to 1): how much each site shaped the median
    distances: np.ndarray  # ||x_i - median|| over the trainable parameters
    iterations: int
    converged: bool


# Buffers that are statistics of local data, not learned weights (PyTorch BatchNorm names).
NON_TRAINABLE_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


def distance_keys(update: Mapping[str, np.ndarray]) -> list[str]:
    """Parameters that define an update's position: floating-point and not a BatchNorm statistic."""
    # dtype.kind "f" is np.issubdtype(dtype, np.floating) without its ~10 us (a round asks ~10 times x ~700 layers)
    return [
        k for k in sorted(update) if np.asarray(update[k]).dtype.kind == "f" and not k.endswith(NON_TRAINABLE_SUFFIXES)
    ]


def _blocks(updates: Sequence[Mapping[str, np.ndarray]], keys: list[str]):
    """Yield (key, slice, K x B float64 block) over the given parameters in fixed order. The block is one reused
    buffer filled by converting copies (no per-chunk allocation); callers may modify it in place."""
    buf = np.empty((len(updates), CHUNK), np.float64)
    for k in keys:
        flat = [np.asarray(u[k]).reshape(-1) for u in updates]
        n = flat[0].size
        for start in range(0, n, CHUNK):
            sl = slice(start, min(n, start + CHUNK))
            block = buf[:, : sl.stop - sl.start]
            for row, f in zip(block, flat):
                row[:] = f[sl]
            yield k, sl, block


def key_groups(reference: Mapping[str, np.ndarray], keys: Sequence[str], groups: int = KEY_GROUPS) -> list[list[str]]:
    """The keys in `groups` runs of about equal size (in order), one per thread. The grouping depends only on the
    model, never on the thread count, so the Gram matrix (summed group by group) is the same on any machine."""
    sizes = [np.asarray(reference[k]).size for k in keys]
    total = max(1, sum(sizes))
    out: list[list[str]] = [[] for _ in range(groups)]
    seen = 0
    for k, n in zip(keys, sizes):
        out[min(groups - 1, seen * groups // total)].append(k)
        seen += n
    return [g for g in out if g]


def _gram_of(updates: Sequence[Mapping[str, np.ndarray]], w: np.ndarray, keys: list[str]) -> np.ndarray:
    k = len(updates)
    gram = np.zeros((k, k), np.float64)
    for _, _, block in _blocks(updates, keys):
        block -= w @ block
        gram += block @ block.T
    return gram


def centred_gram(
    updates: Sequence[Mapping[str, np.ndarray]], w: np.ndarray, keys: list[str], threads: int | None = None
) -> np.ndarray:
    """C = (X - 1 mu^T)(X - 1 mu^T)^T with mu the w-weighted mean, accumulated in float64, chunk by chunk; the
    parameters in key_groups, each group's part on its own thread (fedmed.server.parallel), summed in group order."""
    parts = thread_map(lambda g: _gram_of(updates, w, g), key_groups(updates[0], keys), threads)
    gram = parts[0]
    for part in parts[1:]:
        gram = gram + part
    return gram


def weiszfeld_on_gram(
    gram: np.ndarray, w: np.ndarray, eps: float = 1e-6, maxiter: int = 100, ftol: float = 1e-10
) -> tuple[np.ndarray, np.ndarray, int, bool]:
    """Smoothed Weiszfeld in coefficient space. Starts from the weighted mean (beta = w), uses the original weights
    every iteration: beta_i ∝ w_i / max(eps, d_i). Stops when the objective sum_i w_i d_i changes by less than
    ftol relative. Returns (beta, distances, iterations, converged)."""
    diag = np.diag(gram)

    def distances(beta):
        sq = diag - 2.0 * (gram @ beta) + beta @ gram @ beta
        return np.sqrt(np.maximum(sq, 0.0))

    beta = w.copy()
    d = distances(beta)
    obj = float(w @ d)
    for it in range(1, maxiter + 1):
        coef = w / np.maximum(eps, d)
        beta = coef / coef.sum()
        d = distances(beta)
        new_obj = float(w @ d)
        if abs(obj - new_obj) <= ftol * max(new_obj, 1e-30):
            return beta, d, it, True
        obj = new_obj
    return beta, d, maxiter, False


def _normalised(weights: Sequence[float], k: int) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (k,):
        raise ValueError(f"need one weight per update: {k} updates, weights shape {w.shape}")
    if np.any(~np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"weights must be finite, >= 0 and not all zero, got {w.tolist()}")
    return w / w.sum()


def _combine_keys(updates: Sequence[Mapping[str, np.ndarray]], beta: np.ndarray, keys: list[str]) -> dict:
    # Floating-point parameters: each chunk's float64 sum cast straight into the result (the values a float64 copy
    # of the whole parameter cast afterwards gives, without its allocation and second pass); integers rounded.
    # float32 / float64 parameters: the K rows copied as they are and summed by a compiled loop (no float64 copy of
    # the block, ~2x less CPU: fedmed.server.kernels.weighted_rows); other dtypes through float64 blocks and BLAS.
    # imported here: the admin commands reach this module (fedmed.sim) and must not load numba (and scipy) to start
    from fedmed.server.kernels import KERNEL_DTYPES

    acc, other = {}, []
    for k in keys:
        ref = np.asarray(updates[0][k])
        acc[k] = np.empty(ref.size, ref.dtype if ref.dtype.kind == "f" else np.float64)
        if ref.dtype in KERNEL_DTYPES and all(np.asarray(u[k]).dtype == ref.dtype for u in updates):
            _combine_rows(updates, beta, k, acc[k])
        else:
            other.append(k)
    for key, sl, block in _blocks(updates, other):
        acc[key][sl] = beta @ block
    out = {}
    for key in keys:
        ref = np.asarray(updates[0][key])
        a = acc.pop(key).reshape(ref.shape)
        out[key] = a if ref.dtype.kind == "f" else np.rint(a).astype(ref.dtype)
    return out


def _combine_rows(updates: Sequence[Mapping[str, np.ndarray]], beta: np.ndarray, key: str, out: np.ndarray) -> None:
    from fedmed.server.kernels import weighted_rows  # see _combine_keys

    flat = [np.asarray(u[key]).reshape(-1) for u in updates]
    n = out.size
    buf = np.empty((len(flat), min(n, CHUNK)), flat[0].dtype)
    for start in range(0, n, CHUNK):
        stop = min(n, start + CHUNK)
        block = buf[:, : stop - start]
        for row, f in zip(block, flat):
            row[:] = f[start:stop]
        weighted_rows(block, beta, out[start:stop])


def combine(updates: Sequence[Mapping[str, np.ndarray]], beta: np.ndarray, threads: int | None = None) -> dict:
    """sum_i beta_i x_i per parameter, accumulated in float64 chunk by chunk, cast back to each parameter's dtype
    (integers rounded); groups of parameters on their own threads (each parameter computed whole by one)."""
    beta = np.asarray(beta, dtype=np.float64)
    parts = thread_map(lambda g: _combine_keys(updates, beta, g), key_groups(updates[0], list(updates[0])), threads)
    merged = {k: v for part in parts for k, v in part.items()}
    return {key: merged[key] for key in updates[0]}


def geometric_median(
    updates: Sequence[Mapping[str, np.ndarray]],
    weights: Sequence[float],
    eps: float = 1e-6,
    maxiter: int = 100,
    ftol: float = 1e-10,
    gram: np.ndarray | None = None,
) -> MedianResult:
    """Weighted geometric median of whole updates (all floating-point parameters flattened into one vector).

    Non-trainable state (BatchNorm running mean/var, num_batches_tracked) is not part of the distance; it is
    combined with the same final Weiszfeld weights, so a site the median discounts does not steer the statistics
    either.

    gram: the K x K Gram matrix of the updates' distance_keys centred on any one point, when a pass over the
    updates already formed it (fedmed.server.passes.reference_pass: the round engine's); None forms it here
    (centred_gram). Distances between convex combinations do not depend on the centre.
    """
    if not updates:
        raise ValueError("cannot aggregate zero updates")
    if eps <= 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if maxiter < 1:
        raise ValueError(f"maxiter must be >= 1, got {maxiter}")
    if ftol <= 0:
        raise ValueError(f"ftol must be > 0, got {ftol}")
    w = _normalised(weights, len(updates))
    keys = distance_keys(updates[0])
    if gram is None:
        gram = centred_gram(updates, w, keys)
    else:
        gram = np.asarray(gram, np.float64)
        if gram.shape != (len(updates), len(updates)) or not np.isfinite(gram).all():
            raise ValueError(f"gram must be a finite {len(updates)} x {len(updates)} matrix, got shape {gram.shape}")
    beta, d, iterations, converged = weiszfeld_on_gram(gram, w, eps, maxiter, ftol)
    return MedianResult(combine(updates, beta), beta, d, iterations, converged)
