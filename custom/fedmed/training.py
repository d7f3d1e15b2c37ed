"""Local training and evaluation loops (plain PyTorch; the Executor and the Controller call these)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from fedmed.model import set_trainable
from fedmed.tasks import TaskSpec


class TrainingAborted(RuntimeError):
    """Raised when the caller's abort check fires between batches."""


@dataclass
class EvalResult:
    loss: float
    score: float  # the task's round score (mean AUROC for multilabel, accuracy for multiclass by default)
    mean_auroc: float
    metrics: dict = field(default_factory=dict)  # "auroc/<class>", plus "accuracy", "macro_f1" for multiclass
    num_samples: int = 0

    @property
    def aurocs(self) -> dict:
        return {k.split("/", 1)[1]: v for k, v in self.metrics.items() if k.startswith("auroc/")}


def train_epochs(
    model: torch.nn.Module,
    dataset: Dataset,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    should_abort: Callable[[], bool] = lambda: False,
    on_epoch_end: Optional[Callable[[int, float], None]] = None,
    *,
    task: TaskSpec,
    trainable: Optional[Sequence[str]] = None,
) -> float:
    """Train with Adam and the task's loss; returns the last epoch's mean loss. The optimizer is fresh each call
    (each FL round starts from the new global model). trainable: parameter-name prefixes to train (None = all);
    the others stay frozen for this call."""
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=True, generator=generator, drop_last=len(dataset) > batch_size
    )
    set_trainable(model, trainable)
    try:
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
        model.train()
        epoch_loss = float("nan")
        for epoch in range(epochs):
            epoch_loss = run_epoch(model, loader, opt, should_abort, f"epoch {epoch + 1}", task)
            if on_epoch_end:
                on_epoch_end(epoch + 1, epoch_loss)
    finally:
        set_trainable(model, None)
    return epoch_loss


def run_epoch(model, loader, optimizer, should_abort: Callable[[], bool], label: str, task: TaskSpec) -> float:
    """One pass of training with the task's loss over loader (plain or Opacus-private alike); mean loss per sample."""
    total, count = 0.0, 0
    for images, labels in loader:
        if should_abort():
            raise TrainingAborted(f"aborted during {label}")
        if len(labels) == 0:
            # Opacus' Poisson sampling drew no image. It is still one step of the DP-SGD mechanism: the accountant
            # counted it and the update must be the noise alone. Skipping it would report fewer steps than the
            # calibration assumed and show anyone watching the weights that the batch was empty.
            optimizer.zero_grad(set_to_none=True)
            model(images).sum().backward()  # no samples: zero per-sample gradients, Opacus adds the noise
            optimizer.step()
            continue
        optimizer.zero_grad(set_to_none=True)
        loss = task.loss(model(images), labels)
        loss.backward()
        optimizer.step()
        total += loss.item() * len(labels)
        count += len(labels)
    return total / max(count, 1)


@torch.no_grad()
def predict(
    model: torch.nn.Module, dataset: Dataset, batch_size: int = 64, *, task: TaskSpec
) -> tuple[np.ndarray, np.ndarray]:
    """Return (labels, probabilities: sigmoid or softmax, as the task says) over the dataset in order."""
    model.eval()
    ys, ps = [], []
    for images, labels in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        ps.append(task.probabilities(model(images)).numpy())
        ys.append(labels.numpy())
    return np.concatenate(ys), np.concatenate(ps)


class NonFinitePredictions(ValueError):
    """The model's outputs are NaN or infinite: it cannot be scored (e.g. a model whose weights blew up)."""


def evaluate(model: torch.nn.Module, dataset: Dataset, task: TaskSpec, batch_size: int = 64) -> EvalResult:
    """Loss and the task's scores of the model on a labelled dataset. Raises NonFinitePredictions, naming how many
    images, when the model's outputs are not finite (a score of such a model would mean nothing)."""
    y, p = predict(model, dataset, batch_size, task=task)
    bad = int((~np.isfinite(p)).reshape(len(p), -1).any(axis=1).sum()) if len(p) else 0
    if bad:
        raise NonFinitePredictions(
            f"the model's outputs are not finite (NaN or infinite) on {bad} of {len(p)} images: it cannot be scored"
        )
    s = task.scores(y, p)
    return EvalResult(
        loss=task.nll(y, p), score=s.score, mean_auroc=s.mean_auroc, metrics=s.metrics, num_samples=len(y)
    )


def round_lr(base_lr: float, round_num: int, total_rounds: int, floor: float = 0.1) -> float:
    """Cosine decay of the local learning rate over FL rounds, from base_lr to floor*base_lr at the last round:
    late rounds refine instead of re-perturbing the shared model."""
    if total_rounds <= 1:
        return base_lr
    if not 0 <= round_num < total_rounds:
        raise ValueError(f"round_num must be in [0, {total_rounds}), got {round_num}")
    cos = 0.5 * (1 + math.cos(math.pi * round_num / (total_rounds - 1)))
    return base_lr * (floor + (1 - floor) * cos)
