"""Dirichlet label-skew partitioning (Hsu et al. 2019), used to split any labelled data set across sites."""

from __future__ import annotations

import numpy as np


def primary_class(labels: np.ndarray) -> np.ndarray:
    """Reduce multi-hot labels to one class per sample for partitioning: the rarest positive finding, or an extra
    'no finding' class (index K) for all-negative rows. Rare findings thus get spread deliberately."""
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be 2-D (samples, findings), got shape {labels.shape}")
    counts = labels.sum(axis=0)
    order = np.argsort(counts, kind="stable")  # rarest first
    out = np.full(len(labels), labels.shape[1], dtype=np.int64)
    for k in order[::-1]:  # assign commonest first so the rarest positive wins
        out[labels[:, k] > 0] = k
    return out


def dirichlet_partition(classes: np.ndarray, num_sites: int, alpha: float, seed: int, min_size: int = 1) -> list[np.ndarray]:
    """Split sample indices across sites: per class, proportions ~ Dirichlet(alpha). Small alpha = strong skew.

    Returns sorted index arrays, disjoint, covering every sample, each with at least min_size samples.
    """
    classes = np.asarray(classes)
    n = len(classes)
    if num_sites < 1:
        raise ValueError(f"num_sites must be >= 1, got {num_sites}")
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if min_size * num_sites > n:
        raise ValueError(f"cannot give {num_sites} sites {min_size} samples each from {n} samples")
    rng = np.random.default_rng(seed)
    parts = [[] for _ in range(num_sites)]
    for c in np.unique(classes):
        idx = rng.permutation(np.flatnonzero(classes == c))
        props = rng.dirichlet(np.full(num_sites, alpha))
        cuts = (np.cumsum(props)[:-1] * len(idx)).astype(int)
        for site, chunk in enumerate(np.split(idx, cuts)):
            parts[site].extend(chunk.tolist())
    # Strong skew can leave a site (nearly) empty: top it up from the largest site, so the call always succeeds
    # instead of redrawing an unbounded number of times.
    for site in range(num_sites):
        while len(parts[site]) < min_size:
            donor = max(range(num_sites), key=lambda s: len(parts[s]))
            parts[site].append(parts[donor].pop(int(rng.integers(len(parts[donor])))))
    return [np.sort(np.array(p, dtype=np.int64)) for p in parts]


def train_val_split(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random split of range(n); val gets round(n * val_fraction) samples, at least 1 when n >= 2."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if n < 2:
        raise ValueError(f"need at least 2 samples to split, got {n}")
    perm = np.random.default_rng(seed).permutation(n)
    n_val = min(n - 1, max(1, int(round(n * val_fraction))))
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])
