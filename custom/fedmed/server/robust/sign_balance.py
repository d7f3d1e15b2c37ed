"""The sign balance of a site's move: the in-distribution attacks' signature (issue 28).

Why this rule: "a little is enough" (Baruch et al., NeurIPS 2019) and Min-Max / Min-Sum with the inverse-std
perturbation (Shejwalkar and Houmansadr, NDSS 2021) send mean - gamma * std of the honest moves. The point sits
inside the honest cloud (near its centre for ALIE, where the geometric median's Weiszfeld weights reward it), so no
distance rule sees it, and the coordinate median it is judged against moves with it. But std >= 0 in every
coordinate, so the shift lowers every coordinate at once: the crafted move is negative in most coordinates (the
attack's harm is exactly that coherent push, round after round), while an honest hospital's move, a step of SGD
over millions of weights, is positive and negative about equally often. SignGuard (Xu et al., "Byzantine-robust
Federated Learning through Collaborative Malicious Gradient Filtering", ICDCS 2022) filters on the same statistic.

balance = (#coordinates moved up - #moved down) / #moved, over the clear trainable parameters. A site is judged by
how far its balance lies from the median site's (colluders fewer than half cannot set that median, and a bias every
honest hospital shares, such as weight decay's, cancels). Measured on the red team's federation (5 hospitals of 100
images, DenseNet-121, docs/redteam_collusion.md): honest sites within 0.018 of the median site's in every round of
every run, the attackers of the eight in-distribution rows (1 and 2 colluders) -0.32 (ALIE at the paper's z for 1
of 5, the smallest shift) to -0.88; hence TrustPolicy.sign_balance_ok 0.1 (nothing honest comes near) and
sign_balance_bad 0.2.

Chosen by measurement over the alternatives the issue lists: centred clipping (RoundRules.centred_clipping) cost the
honest run -0.009 AUROC and held one of the two rows it was measured on; a cap on one site's weight leaves a Min-Max
inverse-std site its count share, which already cost -0.03 (the 1-site row accepted at weight 0.20). This rule does
not change an honest round at all (no honest site is scored down, so the aggregate is the geometric median's).

What it does not hold: an attacker who knows the rule balances its shift's signs (fedmed.sim.attacks.
sign_balanced_move: each coordinate pushed against the honest mean, the signs then matched to the median honest
site's); the rule then sees nothing (offset 0.000). Such a point is bounded only by the other rules: the copy test
counts the pair once, the geometric median weighs it (0.42 together for two colluders on the red team's federation:
its central point earns the 1/distance reward back) and the cancelled push limits its harm. Measured
(docs/redteam_collusion.md), two colluders of five: accepted every round, mean paired gap -0.006 (ALIE) and -0.003
(Min-Max) over seeds 0-2, within the red team's 0.02 on the mean, but two of three seeds at -0.020 to -0.029; one
adaptive ALIE hospital (z 0.25) sits at 0.25x the median site's distance and becomes the geometric median (weight
0.996), -0.006 on the mean: bounded by its small shift, not by a rule. See docs/THREAT_MODEL.md.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

CHUNK = 1 << 18  # values compared per step: bounds the temporary boolean arrays to 256 kB
# The rule needs this many moved coordinates at the median site: an honest move's balance over n coordinates whose
# signs are a fair coin has standard deviation 1 / sqrt(n), 0.01 here, a tenth of TrustPolicy.sign_balance_ok.
# Below it (a toy model, a job training a handful of weights) the balance says nothing and the rule is off.
MIN_MOVED = 10_000


def sign_balance(
    update: Mapping[str, np.ndarray], start: Mapping[str, np.ndarray], keys: Sequence[str]
) -> tuple[float, int]:
    """((#coordinates of `keys` where update > start - #where update < start) / #where they differ, #where they
    differ); balance 0.0 when the update did not move. Comparisons are exact in the parameters' own dtype."""
    up = down = 0
    for k in keys:
        a, b = np.asarray(update[k]).reshape(-1), np.asarray(start[k]).reshape(-1)
        for lo in range(0, a.size, CHUNK):
            x, y = a[lo : lo + CHUNK], b[lo : lo + CHUNK]
            up += int(np.count_nonzero(x > y))
            down += int(np.count_nonzero(x < y))
    return balance_of(up, down)


def balance_of(up: int, down: int) -> tuple[float, int]:
    """(balance, #moved) from the counts of coordinates moved up and down (sign_balance's result; also what
    fedmed.server.passes.update_pass's counts give during screening)."""
    moved = up + down
    return ((up - down) / moved if moved else 0.0), moved


def balance_offsets(balances: Mapping[str, tuple[float, int]], min_moved: int = MIN_MOVED) -> dict[str, float]:
    """site -> its balance minus the median site's (what the rule scores: a minority cannot set the median), from
    site -> sign_balance(...); {} when the median site moved fewer than min_moved coordinates (see MIN_MOVED)."""
    if not balances or float(np.median([n for _, n in balances.values()])) < min_moved:
        return {}
    med = float(np.median([b for b, _ in balances.values()]))
    return {s: float(b) - med for s, (b, _) in balances.items()}
