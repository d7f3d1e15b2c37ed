"""The RDP accountant every fedmed privacy figure comes from (Opacus' own, over more orders), and the refusal a site
raises when a round would pass one of its ceilings. Kept apart from dp_sgd so the ledger can use it without torch
training code."""

from __future__ import annotations

import functools
from typing import Iterable, Sequence

import numpy as np
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis import rdp as privacy_analysis

# One RDP entry as Opacus' RDPAccountant.history keeps it: (noise_multiplier, sample_rate, steps).
HistoryEntry = tuple[float, float, int]


class SiteRDPAccountant(RDPAccountant):
    """Opacus' RDP accountant, asked over more Renyi orders. Opacus' default orders stop at 63, and at delta 1e-5
    the conversion term log(1/delta)/(order-1) alone is then 0.19: no amount of noise could certify epsilon below
    about 0.1, so a site asking for 0.1 had to refuse. Orders up to 2048 (as TF Privacy offers) keep the bound
    tight for small epsilons and leave it unchanged where the best order is below 64 (every preset)."""

    ORDERS = RDPAccountant.DEFAULT_ALPHAS + list(range(64, 256, 4)) + list(range(256, 2049, 32))

    def get_privacy_spent(self, *, delta: float, alphas=None):
        return super().get_privacy_spent(delta=delta, alphas=self.ORDERS if alphas is None else alphas)


@functools.lru_cache(maxsize=512)
def _rdp_per_step(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    # Opacus' compute_rdp is linear in steps (it returns rdp x steps); caching one step per (sigma, q) makes a
    # ledger of hundreds of rounds cheap to re-check (each fresh computation costs ~0.5 s over these orders).
    return np.asarray(
        privacy_analysis.compute_rdp(
            q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=SiteRDPAccountant.ORDERS
        ),
        dtype=np.float64,
    )


def epsilon_of(history: Iterable[Sequence], delta: float) -> float:
    """Epsilon at delta of the composition of every (noise_multiplier, sample_rate, steps) entry, as Opacus'
    RDPAccountant computes it over SiteRDPAccountant.ORDERS: RDP adds up per order, so entries from different
    rounds and jobs compose exactly, not as a sum of epsilons."""
    history = [(float(s), float(q), int(n)) for s, q, n in history]
    if not history:
        return 0.0
    rdp = sum(_rdp_per_step(s, q) * n for s, q, n in history)
    eps, _ = privacy_analysis.get_privacy_spent(orders=SiteRDPAccountant.ORDERS, rdp=rdp, delta=delta)
    return float(eps)


class BudgetExceeded(RuntimeError):
    """This round would take the site past an epsilon ceiling (the job's or the dataset's lifetime one); the
    message says which and by how much. Raised before any data is touched."""
