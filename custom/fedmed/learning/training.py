"""Local training and evaluation loops (plain PyTorch; the Executor and the Controller call these)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from fedmed.job.tasks import TaskSpec
from fedmed.models.network import set_trainable


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


@dataclass(frozen=True)
class LocalTraining:
    """One round's local training at a site. epochs: passes over the data; lr: Adam's learning rate this round;
    batch_size; seed: shuffling (plain training only: DP-SGD draws its randomness from the OS); trainable:
    parameter-name prefixes trained (None = all; the others stay frozen for the round); total_epochs: the job's local
    epochs over all its rounds (DP-SGD calibrates its noise once, for all of them); rounds_per_epoch: k > 1 trains
    one epoch over k rounds, a 1/k share of it each round (shorter local work between aggregations: less client
    drift on non-IID hospitals, docs/bench_learning.md), epochs then 1."""

    epochs: int = 1
    lr: float = 1e-3
    batch_size: int = 16
    seed: int = 0
    trainable: Optional[tuple] = None
    total_epochs: int = 1
    rounds_per_epoch: int = 1

    def __post_init__(self):
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 1:
            raise ValueError(f"epochs must be an integer >= 1, got {self.epochs!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {self.batch_size!r}")
        if self.trainable is not None:
            object.__setattr__(self, "trainable", tuple(self.trainable))
        k = self.rounds_per_epoch
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"rounds_per_epoch must be an integer >= 1, got {k!r}")
        if k > 1 and self.epochs != 1:
            raise ValueError(
                f"rounds_per_epoch {k} splits one epoch over {k} rounds: epochs must be 1, got {self.epochs}"
            )

    def steps_per_round(self, steps_per_epoch: int) -> int:
        """Optimizer steps one round takes: its epochs, or its 1/rounds_per_epoch share of one epoch."""
        if self.rounds_per_epoch == 1:
            return self.epochs * steps_per_epoch
        return math.ceil(steps_per_epoch / self.rounds_per_epoch)

    def total_steps(self, steps_per_epoch: int) -> int:
        """Optimizer steps over the job's rounds (what DP-SGD calibrates its noise for)."""
        return (self.total_epochs // self.epochs) * self.steps_per_round(steps_per_epoch)


def round_share(n: int, round_num: int, rounds_per_epoch: int, seed: int) -> np.ndarray:
    """The indices a site trains on in round round_num when one epoch spans rounds_per_epoch rounds: every cycle of
    k rounds permutes its n images afresh (seeded by seed and the cycle) and cuts them into k near-equal shares, so
    each cycle is one epoch over every image."""
    k = rounds_per_epoch
    if not 1 <= k <= n:
        raise ValueError(f"rounds_per_epoch must be in [1, {n}] (the site's training images), got {k}")
    rng = np.random.default_rng([seed, n, round_num // k])
    return np.array_split(rng.permutation(n), k)[round_num % k]


def train_epochs(
    model: torch.nn.Module,
    dataset: Dataset,
    settings: LocalTraining,
    *,
    task: TaskSpec,
    should_abort: Callable[[], bool] = lambda: False,
    on_epoch_end: Optional[Callable[[int, float], None]] = None,
    correction=None,
) -> float:
    """Train with Adam and the task's loss; returns the last epoch's mean loss. The optimizer is fresh each call
    (each FL round starts from the new global model). correction: a fedmed.learning.algorithms.LocalCorrection (FedProx,
    SCAFFOLD) applied around each step, or None."""
    generator = torch.Generator().manual_seed(settings.seed)
    loader = DataLoader(
        dataset,
        batch_size=settings.batch_size,
        shuffle=True,
        generator=generator,
        drop_last=len(dataset) > settings.batch_size,
    )
    set_trainable(model, settings.trainable)
    try:
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=settings.lr)
        model.train()
        epoch_loss = float("nan")
        for epoch in range(settings.epochs):
            epoch_loss = run_epoch(model, loader, opt, should_abort, f"epoch {epoch + 1}", task, correction)
            if on_epoch_end:
                on_epoch_end(epoch + 1, epoch_loss)
    finally:
        set_trainable(model, None)
    return epoch_loss


def run_epoch(
    model, loader, optimizer, should_abort: Callable[[], bool], label: str, task: TaskSpec, correction=None
) -> float:
    """One pass of training with the task's loss over loader (plain or Opacus-private alike); mean loss per sample.
    correction: a fedmed.learning.algorithms.LocalCorrection, its before_step after the backward pass and after_step after
    the optimizer's step (under DP-SGD its proximal gradient comes from the DP optimizer's hook instead)."""
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
            if correction is not None:
                correction.after_step()
            continue
        optimizer.zero_grad(set_to_none=True)
        loss = task.loss(model(images), labels)
        loss.backward()
        if correction is not None:
            correction.before_step()
        optimizer.step()
        if correction is not None:
            correction.after_step()
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
