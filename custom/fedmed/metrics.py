"""Classification metrics for multi-label findings, and operating points chosen from them."""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve


def two_class_findings(y_true: np.ndarray, y_score: np.ndarray, findings: Sequence[str]) -> Iterator[tuple]:
    """(name, labels, scores) for each finding whose labels hold both classes (the others have no ROC curve).
    Raises if y_true and y_score are not both (N, len(findings))."""
    y_true, y_score = np.asarray(y_true), np.asarray(y_score)
    if y_true.shape != y_score.shape or y_true.ndim != 2 or y_true.shape[1] != len(findings):
        raise ValueError(f"y_true {y_true.shape} and y_score {y_score.shape} must both be (N, {len(findings)})")
    for k, name in enumerate(findings):
        col = y_true[:, k]
        if 0 < col.sum() < len(col):
            yield name, col, y_score[:, k]


def per_finding_auroc(y_true: np.ndarray, y_score: np.ndarray, findings: Sequence[str]) -> dict[str, float]:
    """AUROC per finding; a finding with only one class present in y_true has no AUROC and is left out."""
    return {name: float(roc_auc_score(y, s)) for name, y, s in two_class_findings(y_true, y_score, findings)}


def youden_thresholds(y_true: np.ndarray, y_score: np.ndarray, findings: Sequence[str]) -> dict[str, float]:
    """Per finding, the score threshold maximising Youden's J = sensitivity + specificity - 1 (score >= threshold
    is positive); a finding with only one class present in y_true gets none and is left out."""
    out = {}
    for name, y, s in two_class_findings(y_true, y_score, findings):
        fpr, tpr, thr = roc_curve(y, s)
        best = int(np.argmax((tpr - fpr)[1:])) + 1  # thr[0] is +inf (nothing positive): never an operating point
        out[name] = float(thr[best])
    return out


def mean_auroc(aurocs: dict[str, float]) -> float:
    """Mean over findings that have an AUROC; NaN if none do."""
    return float(np.mean(list(aurocs.values()))) if aurocs else float("nan")
