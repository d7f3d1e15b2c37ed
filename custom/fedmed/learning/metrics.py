"""Classification metrics: per-finding AUROC and Youden operating points (multi-label); accuracy, macro-F1 and
one-vs-rest AUROC (multi-class)."""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
from sklearn.metrics import f1_score, roc_auc_score, roc_curve


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


def multiclass_scores(y_onehot: np.ndarray, probs: np.ndarray, classes: Sequence[str]) -> dict[str, float]:
    """accuracy, macro_f1 (over the classes present in y_true or predicted), "auroc/<class>" one-vs-rest (classes
    present and absent in y_true only) and their mean_auroc (NaN if no class has one)."""
    y_onehot, probs = np.asarray(y_onehot), np.asarray(probs)
    if y_onehot.shape != probs.shape or y_onehot.ndim != 2 or y_onehot.shape[1] != len(classes):
        raise ValueError(f"labels {y_onehot.shape} and probabilities {probs.shape} must both be (N, {len(classes)})")
    if len(y_onehot) == 0:
        raise ValueError("multiclass_scores needs at least one sample")
    truth, pred = y_onehot.argmax(axis=1), probs.argmax(axis=1)
    aurocs = per_finding_auroc(y_onehot, probs, classes)  # one-vs-rest: class k against the rest
    out = {
        "accuracy": float(np.mean(truth == pred)),
        "macro_f1": float(f1_score(truth, pred, labels=np.union1d(truth, pred), average="macro", zero_division=0)),
        "mean_auroc": mean_auroc(aurocs),
    }
    out.update({f"auroc/{k}": v for k, v in aurocs.items()})
    return out
