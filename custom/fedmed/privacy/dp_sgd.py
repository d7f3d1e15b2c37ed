"""DP-SGD local training with Opacus and one RDP accountant that lives across all rounds of a job at one site.

The accountant is Opacus' own (RDPAccountant); we only keep it alive between rounds and ask it, before training,
what epsilon would be after this round, so the site can refuse a round that would break its ceiling.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from opacus import PrivacyEngine
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.validators import ModuleValidator
from torch.utils.data import DataLoader, Dataset

from fedmed.model import set_trainable
from fedmed.privacy.policy import PrivacyPolicy
from fedmed.tasks import CHEST_XRAY14, TaskSpec
from fedmed.training import run_epoch


class SiteRDPAccountant(RDPAccountant):
    """Opacus' RDP accountant, asked over more Renyi orders. Opacus' default orders stop at 63, and at delta 1e-5
    the conversion term log(1/delta)/(order-1) alone is then 0.19: no amount of noise could certify epsilon below
    about 0.1, so a site asking for 0.1 had to refuse. Orders up to 2048 (as TF Privacy offers) keep the bound
    tight for small epsilons and leave it unchanged where the best order is below 64 (every preset)."""

    ORDERS = RDPAccountant.DEFAULT_ALPHAS + list(range(64, 256, 4)) + list(range(256, 2049, 32))

    def get_privacy_spent(self, *, delta: float, alphas=None):
        return super().get_privacy_spent(delta=delta, alphas=self.ORDERS if alphas is None else alphas)


class BudgetExceeded(RuntimeError):
    """This round would take the site past its epsilon ceiling; the message says by how much."""


@dataclass(frozen=True)
class RoundPrivacy:
    epsilon: float  # cumulative after this round
    delta: float
    noise_multiplier: float
    steps: int
    train_loss: float


def check_dp_compatible(model: torch.nn.Module) -> None:
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise ValueError(f"model cannot be trained with DP-SGD (build it with norm='group'): {errors[0]}")


class SitePrivacy:
    """Per-site DP state for one job: the policy, the calibrated noise, and the accountant."""

    def __init__(self, policy: PrivacyPolicy):
        self.policy = policy
        self.accountant = SiteRDPAccountant()
        self.noise_multiplier: Optional[float] = policy.noise_multiplier

    @property
    def epsilon_spent(self) -> float:
        return self.accountant.get_epsilon(self.policy.delta) if self.accountant.history else 0.0

    def calibrate(self, sample_rate: float, total_steps: int) -> float:
        """Noise so that total_steps of DP-SGD at this sample rate spend exactly the ceiling (once per job)."""
        if self.noise_multiplier is None:
            try:
                self.noise_multiplier = get_noise_multiplier(
                    target_epsilon=self.policy.epsilon, target_delta=self.policy.delta, sample_rate=sample_rate,
                    steps=total_steps, accountant="rdp", alphas=SiteRDPAccountant.ORDERS,
                )
            except ValueError as e:  # Opacus: "The privacy budget is too low."
                raise BudgetExceeded(
                    f"privacy budget: no noise level lets the RDP accountant certify epsilon {self.policy.epsilon} "
                    f"(delta {self.policy.delta}) over {total_steps} steps at sample rate {sample_rate:.3f} ({e}); "
                    "raise the ceiling, or train fewer rounds or epochs"
                ) from e
        return self.noise_multiplier

    def predicted_epsilon(self, sample_rate: float, steps: int) -> float:
        """Epsilon after `steps` more steps, without spending anything."""
        trial = SiteRDPAccountant()
        trial.history = list(self.accountant.history) + [(self.noise_multiplier, sample_rate, steps)]
        return trial.get_epsilon(self.policy.delta)

    def train_round(
        self,
        model: torch.nn.Module,
        dataset: Dataset,
        epochs: int,
        lr: float,
        batch_size: int,
        seed: int,
        total_epochs: int,
        should_abort: Callable[[], bool] = lambda: False,
        task: TaskSpec = CHEST_XRAY14,
        trainable: Optional[Sequence[str]] = None,
    ) -> tuple[torch.nn.Module, RoundPrivacy]:
        """One round of DP-SGD (Poisson sampling, per-sample clipping, Gaussian noise). Raises BudgetExceeded
        before touching the data if the round would exceed the ceiling. Returns the trained plain module.
        trainable: parameter-name prefixes trained with DP-SGD (None = all); the rest stay frozen at the global
        model's values, so the clipped signal is not diluted by noise on coordinates that do not move."""
        model.train()  # Opacus validates (and hooks) a model in training mode
        check_dp_compatible(model)
        set_trainable(model, trainable)
        try:
            return self._train_round(model, dataset, epochs, lr, batch_size, seed, total_epochs, should_abort, task)
        finally:
            set_trainable(model, None)

    def _train_round(self, model, dataset, epochs, lr, batch_size, seed, total_epochs, should_abort, task):
        # Opacus' Poisson loader draws len(loader) = ceil(N / B) batches per epoch at rate 1 / len(loader);
        # calibrate and predict with exactly those numbers, so the ceiling is met at the last round, not overshot.
        steps_per_epoch = math.ceil(len(dataset) / batch_size)
        sample_rate = 1.0 / steps_per_epoch
        self.calibrate(sample_rate, total_epochs * steps_per_epoch)
        engine = PrivacyEngine(accountant="rdp", secure_mode=False)
        engine.accountant = self.accountant  # the site's accountant, across rounds
        generator = torch.Generator().manual_seed(seed)
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=generator)
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Opacus warns about secure RNG: documented, we run without secure_mode
            private_model, private_opt, private_loader = engine.make_private(
                module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=self.noise_multiplier,
                max_grad_norm=self.policy.max_grad_norm, poisson_sampling=True,
            )
        steps = epochs * len(private_loader)
        eps_after = self.predicted_epsilon(sample_rate, steps)
        if eps_after > self.policy.epsilon * (1 + 1e-6):  # checked before any data is touched
            private_model.remove_hooks()
            raise BudgetExceeded(
                f"privacy budget: this round would bring epsilon from {self.epsilon_spent:.3f} to {eps_after:.3f}, "
                f"over the site's ceiling {self.policy.epsilon} (delta {self.policy.delta})"
            )
        private_model.train()
        loss = float("nan")
        for epoch in range(epochs):
            loss = run_epoch(private_model, private_loader, private_opt, should_abort, f"DP epoch {epoch + 1}", task)
        plain = private_model._module
        for p in plain.parameters():  # drop Opacus' per-sample state so the module is a plain one again
            for attr in ("grad_sample", "_forward_counter", "summed_grad"):
                if hasattr(p, attr):
                    delattr(p, attr)
        private_model.remove_hooks()
        spent = self.epsilon_spent
        return plain, RoundPrivacy(spent, self.policy.delta, float(self.noise_multiplier), steps, loss)
