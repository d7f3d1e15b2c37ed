"""Out-of-distribution guard: per image, how unlike the calibration images it is, in the network's pooled feature
space (the 1024 values DenseNet-121 feeds its classifier).

The statistics are fitted on labelled calibration images by whoever runs fedmed-choose-thresholds (the server on its
own global test set, or a hospital on its validation split) and stored in the model file's meta["ood"]: the
feature mean, the top principal directions with a Ledoit-Wolf precision in that subspace, and the variance per
dimension left outside it (probabilistic PCA: the remaining D - K directions share one variance). Score:
sqrt((Mahalanobis^2 in the subspace + residual energy / that variance) / D), a Mahalanobis distance under that
Gaussian per feature dimension: about 1 for images like the calibration ones. (Normalising the residual by its mean
energy instead, as a single term, let it drown in the subspace term: brain MR slices were then flagged 6% of the
time, 100% with this one; docs/bench_ood.md.) Threshold: a quantile of out-of-fold calibration scores (each fold scored by
statistics fitted without it), so it is not set on the very images it was fitted to. docs/THREAT_MODEL.md says what
the statistics reveal about the calibration data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

import numpy as np
import torch

META_OOD = "ood"
FEATURE_LAYER = "class_layers.flatten"  # MONAI DenseNet121: relu -> pool -> flatten -> out
DEFAULT_QUANTILE = 0.99
DEFAULT_COMPONENTS = 32
DEFAULT_FOLDS = 5
MIN_CALIBRATION_IMAGES = 4


class FeatureTap:
    """Collects the pooled features of every forward pass while active (a forward hook on FEATURE_LAYER)."""

    def __init__(self, model: torch.nn.Module):
        self.layer = dict(model.named_modules())[FEATURE_LAYER]
        self.batches: list = []
        self.hook = None

    def __enter__(self) -> "FeatureTap":
        def record(_module, _inputs, output) -> None:  # returns None: the output is not replaced
            self.batches.append(output.detach().reshape(len(output), -1).cpu().numpy().astype(np.float64))

        self.hook = self.layer.register_forward_hook(record)
        return self

    def __exit__(self, *exc) -> None:
        self.hook.remove()

    def features(self) -> np.ndarray:
        return np.concatenate(self.batches) if self.batches else np.zeros((0, 0))


@torch.no_grad()
def pooled_features(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 32) -> np.ndarray:
    """(N, 1024) pooled features of preprocessed images (N, 1, S, S)."""
    model.eval()
    with FeatureTap(model) as tap:
        for i in range(0, len(images), batch_size):
            model(images[i : i + batch_size])
    return tap.features()


@dataclass(frozen=True)
class OodStatistics:
    """Args:
    mean: (D,) calibration feature mean.
    components: (K, D) orthonormal principal directions.
    precision: (K, K) inverse of the Ledoit-Wolf covariance of the projected features.
    residual: variance per dimension of the calibration features outside the K directions (> 0).
    threshold: scores above it are flagged.
    calibration: where the statistics came from (images, data, quantile), for the outputs.
    """

    mean: np.ndarray
    components: np.ndarray
    precision: np.ndarray
    residual: float
    threshold: float
    calibration: Mapping

    def score(self, features: np.ndarray) -> np.ndarray:
        f = np.asarray(features, dtype=np.float64) - self.mean
        z = f @ self.components.T
        maha = np.einsum("nk,kl,nl->n", z, self.precision, z)
        resid = np.sum((f - z @ self.components) ** 2, axis=1)
        return np.sqrt((np.maximum(maha, 0) + resid / self.residual) / len(self.mean))

    def to_meta(self) -> dict:
        return {
            "mean": torch.as_tensor(self.mean, dtype=torch.float32),
            "components": torch.as_tensor(self.components, dtype=torch.float32),
            "precision": torch.as_tensor(self.precision, dtype=torch.float32),
            "residual": float(self.residual),
            "threshold": float(self.threshold),
            "calibration": dict(self.calibration),
            "feature_layer": FEATURE_LAYER,
        }

    @classmethod
    def from_meta(cls, raw: Mapping, source: str = "model file") -> "OodStatistics":
        """Raises ValueError naming what is wrong (a model file is untrusted input)."""
        try:
            mean = np.asarray(raw["mean"], dtype=np.float64)
            components = np.asarray(raw["components"], dtype=np.float64)
            precision = np.asarray(raw["precision"], dtype=np.float64)
            residual, threshold = float(raw["residual"]), float(raw["threshold"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{source}: ood statistics are incomplete or malformed ({type(e).__name__}: {e})") from e
        k = len(components)
        if mean.ndim != 1 or components.shape != (k, len(mean)) or precision.shape != (k, k):
            raise ValueError(
                f"{source}: ood statistics have inconsistent shapes mean {mean.shape}, components "
                f"{components.shape}, precision {precision.shape}"
            )
        if not (residual > 0 and np.isfinite(threshold) and np.all(np.isfinite(precision))):
            raise ValueError(f"{source}: ood statistics must be finite with residual > 0")
        return cls(mean, components, precision, residual, threshold, dict(raw.get("calibration") or {}))

    def note(self) -> str:
        n = self.calibration.get("images", "?")
        return (
            f"out-of-distribution score: feature distance to {n} calibration images "
            f"({self.calibration.get('data', 'unknown data')}); flagged above {self.threshold:.2f}"
        )


def _fit(features: np.ndarray, n_components: int) -> tuple:
    from sklearn.covariance import LedoitWolf

    mean = features.mean(axis=0)
    centred = features - mean
    # at most half as many directions as images: with n - 1 the calibration features would lie entirely inside the
    # subspace and the residual term (normalised by their residual) would explode on any new image
    k = max(1, min(n_components, len(features) // 2, features.shape[1]))
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    components = vt[:k]
    z = centred @ components.T
    precision = LedoitWolf().fit(z).precision_
    residual = float(np.mean(np.sum((centred - z @ components) ** 2, axis=1))) / max(1, features.shape[1] - k)
    return mean, components, precision, max(residual, 1e-12)


def fit_ood(
    features: np.ndarray,
    data: str,
    quantile: float = DEFAULT_QUANTILE,
    n_components: int = DEFAULT_COMPONENTS,
    folds: Optional[int] = None,
    seed: int = 0,
) -> OodStatistics:
    """Statistics from calibration features (N, D), N >= 4, and a threshold at `quantile` of the out-of-fold
    scores (folds: default DEFAULT_FOLDS, fewer when N is small, at least 2 images per fold).

    Args:
        data: what the calibration images are, shown in outputs (e.g. "server global test set, 120 images").
    """
    features = np.asarray(features, dtype=np.float64)
    if not 0.5 <= quantile < 1:
        raise ValueError(f"quantile must be in [0.5, 1), got {quantile}")
    if features.ndim != 2 or len(features) < MIN_CALIBRATION_IMAGES:
        raise ValueError(
            f"need at least {MIN_CALIBRATION_IMAGES} calibration images for the OOD guard, got {len(features)}"
        )
    folds = folds or min(DEFAULT_FOLDS, len(features) // 2)
    if not 2 <= folds <= len(features) // 2:
        raise ValueError(f"folds must be in [2, {len(features) // 2}] for {len(features)} images, got {folds}")
    order = np.random.default_rng(seed).permutation(len(features))
    out_of_fold = np.empty(len(features))
    for fold in np.array_split(order, folds):
        rest = np.setdiff1d(order, fold)
        held = OodStatistics(*_fit(features[rest], n_components), threshold=np.inf, calibration={})
        out_of_fold[fold] = held.score(features[fold])
    mean, components, precision, residual = _fit(features, n_components)
    threshold = float(np.quantile(out_of_fold, quantile))
    return OodStatistics(
        mean,
        components,
        precision,
        residual,
        threshold,
        {"images": len(features), "data": data, "quantile": quantile, "folds": folds, "components": len(components)},
    )


def ood_from_meta(meta: Mapping, source: str = "model file") -> Optional[OodStatistics]:
    raw = meta.get(META_OOD)
    return None if raw is None else OodStatistics.from_meta(raw, source)
