"""Classification metrics for multi-label findings."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from sklearn.metrics import roc_auc_score


def per_finding_auroc(y_true: np.ndarray, y_score: np.ndarray, findings: Sequence[str]) -> dict[str, float]:
    """AUROC per finding; a finding with only one class present in y_true has no AUROC and is left out."""
    y_true, y_score = np.asarray(y_true), np.asarray(y_score)
    if y_true.shape != y_score.shape or y_true.ndim != 2 or y_true.shape[1] != len(findings):
        raise ValueError(f"y_true {y_true.shape} and y_score {y_score.shape} must both be (N, {len(findings)})")
    out = {}
    for k, name in enumerate(findings):
        col = y_true[:, k]
        if 0 < col.sum() < len(col):
            out[name] = float(roc_auc_score(col, y_score[:, k]))
    return out


def mean_auroc(aurocs: dict[str, float]) -> float:
    """Mean over findings that have an AUROC; NaN if none do."""
    return float(np.mean(list(aurocs.values()))) if aurocs else float("nan")
