"""Baseline robust aggregators behind the same interface as the geometric median, for comparison and for users who
want them: coordinate-wise median, coordinate-wise trimmed mean, and Krum (Blanchard et al. 2017).
Each returns (params, site_weights); site_weights say how much each input counted (uniform where every site
contributes coordinate by coordinate)."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from fedmed.server.robust.geometric_median import CHUNK, centred_gram, combine, distance_keys


def _per_coordinate(updates: Sequence[Mapping[str, np.ndarray]], reduce) -> dict:
    out = {}
    for key, ref in updates[0].items():
        ref = np.asarray(ref)
        flat = [np.asarray(u[key]).reshape(-1) for u in updates]
        res = np.empty(ref.size, np.float64)
        for start in range(0, ref.size, CHUNK):
            sl = slice(start, min(ref.size, start + CHUNK))
            res[sl] = reduce(np.stack([f[sl] for f in flat]).astype(np.float64))
        res = res.reshape(ref.shape)
        out[key] = np.rint(res).astype(ref.dtype) if np.issubdtype(ref.dtype, np.integer) else res.astype(ref.dtype)
    return out


def coordinate_median(updates: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]):
    """Unweighted median of each coordinate across sites (sample counts are ignored by design: weighting would let
    a site claiming many samples move every coordinate)."""
    if not updates:
        raise ValueError("cannot aggregate zero updates")
    k = len(updates)
    return _per_coordinate(updates, lambda block: np.median(block, axis=0)), np.full(k, 1.0 / k)


def trimmed_mean(updates: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float], trim: float = 0.2):
    """Per coordinate, drop the floor(trim*K) largest and smallest values and average the rest."""
    if not 0.0 <= trim < 0.5:
        raise ValueError(f"trim must be in [0, 0.5), got {trim}")
    if not updates:
        raise ValueError("cannot aggregate zero updates")
    k = len(updates)
    cut = int(np.floor(trim * k))

    def reduce(block):
        return np.sort(block, axis=0)[cut : k - cut].mean(axis=0)

    return _per_coordinate(updates, reduce), np.full(k, 1.0 / k)


def krum(updates: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float], num_byzantine: int | None = None):
    """Pick the one update whose summed squared distance to its K - f - 2 nearest neighbours is smallest."""
    k = len(updates)
    if k < 3:
        raise ValueError(f"krum needs at least 3 updates, got {k}")
    f = (k - 3) // 2 if num_byzantine is None else num_byzantine
    if f < 0 or k - f - 2 < 1:
        raise ValueError(f"krum needs K - f - 2 >= 1; got K={k}, f={f}")
    gram = centred_gram(updates, np.full(k, 1.0 / k), distance_keys(updates[0]))
    diag = np.diag(gram)
    sq = np.maximum(diag[:, None] + diag[None, :] - 2 * gram, 0.0)
    scores = [np.sort(np.delete(sq[i], i))[: k - f - 2].sum() for i in range(k)]
    chosen = int(np.argmin(scores))
    beta = np.zeros(k)
    beta[chosen] = 1.0
    return combine(updates, beta), beta
