"""What a federated job learns: its classes, how labels are read, the loss, the probabilities and the scores.

One Executor, Controller, aggregation, DP and record serve every task; a job names its task and the code paths
ask the task. Two kinds:
- "multilabel": any number of findings per image (sigmoid + binary cross-entropy; per-finding AUROC, their mean).
- "multiclass": exactly one class per image (softmax + cross-entropy; accuracy, macro-F1, one-vs-rest AUROC).
Labels travel as float32 vectors in both: multi-hot for multilabel, one-hot for multiclass.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fedmed.data.dicom import PROJECTION_MODALITIES
from fedmed.job.constants import CXR14_FINDINGS
from fedmed.learning.metrics import mean_auroc, multiclass_scores, per_finding_auroc

KINDS = ("multilabel", "multiclass")
BRAIN_CLASSES = ("glioma", "meningioma", "pituitary", "no_tumour")
COL_CLASS_LABEL = "label"  # a multiclass label CSV names the class in this one column


@dataclass(frozen=True)
class TaskScores:
    """A model's scores on one labelled set. `score` is the task's round score (best-model choice, logs)."""

    score: float
    mean_auroc: float  # mean AUROC over findings (multilabel) or over one-vs-rest classes (multiclass)
    metrics: dict  # every metric by name: "auroc/<class>", and for multiclass "accuracy" and "macro_f1"


@dataclass(frozen=True)
class TaskSpec:
    """Args:
    name: registry name, what jobs pass as `task`.
    classes: output order of the classifier (findings for multilabel, classes for multiclass).
    kind: "multilabel" or "multiclass".
    modalities: DICOM Modality values a site's images may have (anything else is rejected with the reason).
    score_name: the metric that scores a round ("mean_auroc" or "accuracy").
    """

    name: str
    classes: tuple
    kind: str
    modalities: frozenset
    score_name: str

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"task {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")
        if len(self.classes) < 2 or len(set(self.classes)) != len(self.classes):
            raise ValueError(f"task {self.name!r}: needs >= 2 distinct classes, got {self.classes}")
        allowed = ("mean_auroc",) if self.kind == "multilabel" else ("accuracy", "macro_f1", "mean_auroc")
        if self.score_name not in allowed:
            raise ValueError(f"task {self.name!r}: score_name must be one of {allowed}, got {self.score_name!r}")

    @property
    def num_outputs(self) -> int:
        return len(self.classes)

    @property
    def is_multiclass(self) -> bool:
        return self.kind == "multiclass"

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean training loss of a batch; multiclass takes one-hot (or soft) label vectors as targets."""
        if self.is_multiclass:
            return torch.nn.functional.cross_entropy(logits, labels)
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits, dim=1) if self.is_multiclass else torch.sigmoid(logits)

    def nll(self, labels: np.ndarray, probs: np.ndarray) -> float:
        """The same loss as `loss`, from probabilities (evaluation)."""
        eps = 1e-7
        if self.is_multiclass:
            return float(-np.mean(np.sum(labels * np.log(probs + eps), axis=1)))
        return float(-np.mean(labels * np.log(probs + eps) + (1 - labels) * np.log(1 - probs + eps)))

    def scores(self, labels: np.ndarray, probs: np.ndarray) -> TaskScores:
        if self.is_multiclass:
            m = multiclass_scores(labels, probs, self.classes)
            return TaskScores(m[self.score_name], m["mean_auroc"], m)
        aurocs = per_finding_auroc(labels, probs, self.classes)
        mean = mean_auroc(aurocs)
        return TaskScores(mean, mean, {f"auroc/{k}": v for k, v in aurocs.items()})

    def poisoned_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """Labels of a label-flipping attacker: every finding negated (multilabel); every image moved to the
        next class (multiclass), so targets stay one-hot."""
        return torch.roll(labels, 1, dims=1) if self.is_multiclass else 1.0 - labels

    def encode_class(self, value: str, where: str) -> np.ndarray:
        """One-hot vector of a class name (multiclass label files); `where` names the file and line for errors."""
        name = (value or "").strip()
        if name not in self.classes:
            raise ValueError(f"{where}: unknown {self.name} class {name!r}; expected one of {list(self.classes)}")
        out = np.zeros(len(self.classes), np.float32)
        out[self.classes.index(name)] = 1.0
        return out


CHEST_XRAY14 = TaskSpec("chest_xray14", CXR14_FINDINGS, "multilabel", frozenset(PROJECTION_MODALITIES), "mean_auroc")
BRAIN_MRI = TaskSpec("brain_mri", BRAIN_CLASSES, "multiclass", frozenset({"MR"}), "accuracy")
TASKS = {t.name: t for t in (CHEST_XRAY14, BRAIN_MRI)}


def get_task(name) -> TaskSpec:
    """The registered task of that name (or the TaskSpec itself); raises naming the valid choices. No default: a
    caller that forgets the task must fail, not silently get the chest task."""
    if isinstance(name, TaskSpec):
        return name
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {sorted(TASKS)}")
    return TASKS[name]
