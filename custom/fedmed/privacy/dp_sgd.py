"""DP-SGD local training with Opacus and one RDP accountant that lives across all rounds of a job at one site.

The accountant is Opacus' own (RDPAccountant); we only keep it alive between rounds and ask it, before training,
what epsilon would be after this round, so the site can refuse a round that would break its ceiling. With a
lifetime ledger (fedmed.privacy.ledger) the round is also checked against, and charged to, the dataset's lifetime
budget before any data is touched.

Randomness: Poisson sampling and the Gaussian noise each use a torch.Generator seeded with 63 bits from the
operating system (secrets, i.e. os.urandom) at every round, never from the job's configuration, so the server cannot
replay which images were sampled or what noise was added. torch's CPU generator is a Mersenne Twister, not a
cryptographic generator: Opacus' secure_mode needs torchcsprng, whose last release (0.2.1, 2021) is built against
torch 1.8 and does not install beside this torch. What that leaves open is written in docs/THREAT_MODEL.md.
"""

from __future__ import annotations

import itertools
import math
import secrets
import warnings
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from opacus import PrivacyEngine
from opacus.accountants.utils import get_noise_multiplier
from opacus.validators import ModuleValidator
from torch.utils.data import DataLoader, Dataset

from fedmed.job.tasks import TaskSpec
from fedmed.learning.training import LocalTraining, run_epoch
from fedmed.models.network import set_trainable
from fedmed.privacy.accounting import BudgetExceeded, HistoryEntry, SiteRDPAccountant  # noqa: F401 (re-exported)
from fedmed.privacy.ledger import LedgerBinding
from fedmed.privacy.policy import PrivacyPolicy


def os_seeded_generator() -> torch.Generator:
    """A torch generator seeded from the OS entropy pool: nothing the job or the server knows determines it."""
    return torch.Generator().manual_seed(secrets.randbits(63))


@dataclass(frozen=True)
class RoundPrivacy:
    epsilon: float  # cumulative after this round (this job)
    delta: float
    noise_multiplier: float
    steps: int
    train_loss: float
    lifetime_epsilon: Optional[float] = None  # the dataset's, across jobs, when the site keeps a ledger


def check_dp_compatible(model: torch.nn.Module) -> None:
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise ValueError(f"model cannot be trained with DP-SGD (build it with norm='group'): {errors[0]}")


class SitePrivacy:
    """Per-site DP state for one job: the policy, the calibrated noise, the job's accountant, and (at a deployed
    site) the ledger binding that charges each round to the dataset's lifetime budget."""

    def __init__(self, policy: PrivacyPolicy, ledger: Optional[LedgerBinding] = None):
        self.policy = policy
        self.ledger = ledger
        self.accountant = SiteRDPAccountant()
        self.noise_multiplier: Optional[float] = policy.noise_multiplier

    def continue_run(self, earlier: Sequence[HistoryEntry]) -> None:
        """A job that resumes a run: what the run's earlier jobs spent counts toward this job's ceiling (once, before
        this job's first round), so the run's rounds together stay within it."""
        if self.accountant.history:
            raise RuntimeError("continue_run must come before this job's first round")
        self.accountant.history = [(float(s), float(q), int(n)) for s, q, n in earlier]

    @property
    def epsilon_spent(self) -> float:
        return self.accountant.get_epsilon(self.policy.delta) if self.accountant.history else 0.0

    def calibrate(self, sample_rate: float, total_steps: int) -> float:
        """Noise so that total_steps of DP-SGD at this sample rate spend exactly the ceiling (once per job)."""
        if self.noise_multiplier is None:
            try:
                self.noise_multiplier = get_noise_multiplier(
                    target_epsilon=self.policy.epsilon,
                    target_delta=self.policy.delta,
                    sample_rate=sample_rate,
                    steps=total_steps,
                    accountant="rdp",
                    alphas=SiteRDPAccountant.ORDERS,
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
        settings: LocalTraining,
        *,
        task: TaskSpec,
        should_abort: Callable[[], bool] = lambda: False,
        round_num: int = 0,
        also_released: Sequence[HistoryEntry] = (),
        correction=None,
    ) -> tuple[torch.nn.Module, RoundPrivacy]:
        """One round of DP-SGD (Poisson sampling, per-sample clipping, Gaussian noise). Raises BudgetExceeded
        before touching the data if the round would exceed the job's ceiling or (with a ledger) the dataset's
        lifetime ceiling; with a ledger the round is charged, fsynced, before training. Returns the trained module.

        settings: epochs, lr, batch_size, trainable (parameter-name prefixes trained with DP-SGD, None = all; the
            rest stay frozen at the global model's values, so the clipped signal is not diluted by noise on
            coordinates that do not move) and total_epochs (the noise is calibrated once for the job's total). Its
            seed is deliberately ignored: sampling and noise come from the OS (module docstring).
        round_num: the federation round, recorded in the ledger.
        also_released: RDP entries of what else this round will release from the same data (the site's user-level
            filter), counted in the lifetime check so a round is refused before training rather than trained and
            then blocked at release; charged by whoever releases them.
        correction: a fedmed.learning.algorithms.LocalCorrection (FedProx, SCAFFOLD). Its proximal gradient is added after
            Opacus clipped and noised the per-sample gradients (from the DP optimizer's step hook), and SCAFFOLD's
            correction after each step: both depend on no example, so the round's privacy charge is unchanged.
        """
        model.train()  # Opacus validates (and hooks) a model in training mode
        check_dp_compatible(model)
        set_trainable(model, settings.trainable)
        try:
            return self._train_round(model, dataset, settings, task, round_num, should_abort, also_released, correction)
        finally:
            set_trainable(model, None)

    def _train_round(
        self, model, dataset, settings: LocalTraining, task, round_num, should_abort, also_released, correction
    ):
        epochs, batch_size = settings.epochs, settings.batch_size
        # Opacus' Poisson loader draws len(loader) = ceil(N / B) batches per epoch at rate 1 / len(loader);
        # calibrate and predict with exactly those numbers, so the ceiling is met at the last round, not overshot.
        # With rounds_per_epoch k > 1 a round takes a 1/k share of an epoch's steps: still Poisson draws from the
        # whole dataset at the same rate, so the accountant composes exactly the steps that run (no image is
        # assumed out of a round it might be drawn in).
        steps_per_epoch = math.ceil(len(dataset) / batch_size)
        sample_rate = 1.0 / steps_per_epoch
        self.calibrate(sample_rate, settings.total_steps(steps_per_epoch))
        steps = settings.steps_per_round(steps_per_epoch)
        this_round = [(float(self.noise_multiplier), sample_rate, steps)]
        # Every check, and the ledger charge, before Opacus or the loader reads a single image.
        eps_after = self.predicted_epsilon(sample_rate, steps)
        if eps_after > self.policy.epsilon * (1 + 1e-6):
            raise BudgetExceeded(
                f"privacy budget: this round would bring epsilon from {self.epsilon_spent:.3f} to "
                f"{eps_after:.3f}, over the site's ceiling {self.policy.epsilon} (delta {self.policy.delta})"
            )
        lifetime = None
        if self.ledger is not None:
            # the whole round, the filter's part included (less what a resumed run's round replays free)
            self.ledger.check_round(round_num, {"dp_sgd": this_round, "user_level": list(also_released)})
            lifetime = self.ledger.charge(
                round_num,
                "dp_sgd",
                this_round,
                details={
                    "max_grad_norm": self.policy.max_grad_norm,
                    "epochs": epochs,
                    "rounds_per_epoch": settings.rounds_per_epoch,
                    "steps": steps,
                    "batch_size": batch_size,
                    "dataset_size": len(dataset),
                    "job_epsilon_after": eps_after,
                    "job_epsilon_ceiling": self.policy.epsilon,
                },
            ).epsilon_after
        engine = PrivacyEngine(accountant="rdp", secure_mode=False)
        engine.accountant = self.accountant  # the site's accountant, across rounds
        # Opacus' Poisson sampler draws from the loader's generator, the noise from noise_generator: both fresh
        # from the OS every round (module docstring).
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=os_seeded_generator())
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=settings.lr)
        with warnings.catch_warnings():
            # Opacus warns that secure_mode is off: torchcsprng does not install here; the OS-seeded generators and
            # what they imply are documented (module docstring, docs/THREAT_MODEL.md).
            warnings.simplefilter("ignore")
            private_model, private_opt, private_loader = engine.make_private(
                module=model,
                optimizer=optimizer,
                data_loader=loader,
                noise_multiplier=self.noise_multiplier,
                max_grad_norm=self.policy.max_grad_norm,
                poisson_sampling=True,
                noise_generator=os_seeded_generator(),
            )
        if len(private_loader) != steps_per_epoch:  # what was charged must be what runs
            private_model.remove_hooks()
            raise RuntimeError(
                f"Opacus' loader runs {len(private_loader)} steps per epoch, {steps_per_epoch} were "
                "accounted; not training"
            )
        if correction is not None:
            correction.dp_sgd_hook(private_opt)  # chained after the accountant's hook: after clipping and noise
        private_model.train()
        loss = float("nan")
        if settings.rounds_per_epoch > 1:  # the round's share of an epoch: its first `steps` Poisson draws
            share = itertools.islice(private_loader, steps)
            loss = run_epoch(private_model, share, private_opt, should_abort, "DP share of an epoch", task, correction)
        else:
            for epoch in range(epochs):
                loss = run_epoch(
                    private_model, private_loader, private_opt, should_abort, f"DP epoch {epoch + 1}", task, correction
                )
        plain = private_model._module
        for p in plain.parameters():  # drop Opacus' per-sample state so the module is a plain one again
            for attr in ("grad_sample", "_forward_counter", "summed_grad"):
                if hasattr(p, attr):
                    delattr(p, attr)
        private_model.remove_hooks()
        spent = self.epsilon_spent
        return plain, RoundPrivacy(spent, self.policy.delta, float(self.noise_multiplier), steps, loss, lifetime)
