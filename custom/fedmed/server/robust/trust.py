"""Per-site trust, round by round: a scale-free score from each site's distance to the judging reference (the
coordinate median of the sites, fedmed.server.aggregation.aggregate_and_score), smoothed over
rounds, with quarantine below a threshold and re-admission after consistently good rounds."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Mapping

import numpy as np

# The sign rule's thresholds (TrustPolicy.sign_balance_ok / _bad), on |balance - the median site's|.
SIGN_BALANCE_OK = 0.1
SIGN_BALANCE_BAD = 0.2
# The body rule's thresholds (TrustPolicy.body_cosine_ok / _bad), on the cosine of a site's clear move with the
# reference's; calibrated in TrustPolicy's docstring.
BODY_COSINE_OK = 0.0
BODY_COSINE_BAD = -0.3


@dataclass(frozen=True)
class TrustPolicy:
    """All thresholds of the trust rule.

    Args:
        smoothing: weight of the newest round in the running trust (exponential moving average), in (0, 1].
        ok_ratio: distance / median site distance at or below which a round scores 1.
        bad_ratio: ratio at or above which a round scores 0 (linear in between).
        quarantine_below: trust under which a site is quarantined (excluded from aggregation, still evaluated).
        readmit_after: consecutive good rounds a quarantined site needs to be re-admitted.
        good_score: round score that counts as good for re-admission.
        initial_trust: trust of a site never seen before.
        head_cosine_ok / head_cosine_bad: the direction rule. The cosine between a site's move of the classifier
            layers and the judging reference's (fedmed.server.aggregation.head_cosine; the coordinate median of the sites,
            the aggregate until issue 28) scores 1 at or above head_cosine_ok, 0 at or below head_cosine_bad
            (linear in between); a round's score is the lower of the distance and the direction scores. Measured
            on the red team's hospitals (5 sites, 100 images, 64 px, 4 rounds): against the aggregate, honest
            sites' cosines ranged 0.11 to 1.00, a label-flipping site's -0.87 to -0.71, while its distance ratio
            stayed under 1.3, so the distance rule alone let it in every round. Re-measured against the coordinate
            median (docs/redteam_collusion.md): honest sites +0.01 at the lowest (120 site-rounds of 6 honest
            runs, none below 0), the IPM / unit-direction colluders -0.96 to -0.86, so both thresholds stand
            (head_cosine_ok has little slack on the honest side: a non-IID site a little further off would lose
            part of its score, never all of it above -0.5).
        sign_balance_ok / sign_balance_bad: the sign rule (fedmed.server.robust.sign_balance). A site's move's sign
            balance ((#coordinates up - #down) / #moved) that differs from the median site's by at most
            sign_balance_ok scores 1, by sign_balance_bad or more 0 (linear in between); a round's score is the
            lowest of the distance, direction and sign scores. sign_balance_bad > 2 turns it off (a difference of
            two balances is at most 2). Measured on the red team's federation: see docs/redteam_collusion.md.
        body_cosine_ok / body_cosine_bad / body_cosine_always: the body rule, the direction rule on what the
            server reads in clear. The cosine between a site's whole clear trainable move and the judging
            reference's (fedmed.server.aggregation.body_cosine) scores 1 at or above body_cosine_ok, 0 at or below
            body_cosine_bad (linear in between). Scored where the classifier layers are hidden (HE encrypts them,
            so the direction rule above has nothing to read: issue 28's Min-Max unit pair then went through), or
            on every round with body_cosine_always; body_cosine_bad < -1 turns it off. Calibrated on the red
            team's federation (5 sites of 100 images, 64 px, 4 rounds; docs/redteam_collusion.md): honest sites'
            body cosines +0.38 at the lowest in the honest runs (seeds 0-2, 60 site-rounds each way: HE on +0.382,
            HE off +0.381), +0.32 for the honest sites beside the HE-on attackers (392 site-rounds); the attackers
            that move against the honest sites (Min-Max / Min-Sum unit direction, IPM 0.5 and 100; 1 or 2 of 5)
            -0.95 to -0.89; the in-distribution ones (ALIE, the inverse-std rows, the adaptive rows) +0.19 to +0.91,
            left to the sign rule and the geometric median. So a score starts to drop 0.32 below the lowest honest
            cosine and reaches 0 at 0.62 below it, 0.59 above the highest such attacker. Not always on by
            default: with the head in clear the direction rule rejects those attackers already, and the rows with
            HE off were measured without the body rule scoring.
        vote_share_cap: no site (nor a near-copy group counted once, whose members share one site's count) gets
            more than this multiple of its count share of the aggregate's weight; the excess goes to the others in
            proportion to their weights (fedmed.server.aggregation.cap_vote_weights). The geometric median rewards
            a point near the centre: one adaptive ALIE hospital at 0.25x the median site's distance got 0.996 of
            the weight (docs/redteam_collusion.md). For the aggregators whose result is a weighted sum
            (fedmed.server.aggregation.LINEAR_AGGREGATORS). Measured at 1.5x, HE off, seeds 0-2: it never binds
            on the honest runs (largest weight 0.207); the lone adaptive ALIE hospital went from 0.996 to 0.30 of
            the weight (mean paired gap -0.006 -> +0.014), the adaptive pair from 0.42 to 0.375 (no better). Off
            (inf) by default: no job setting exposes it yet and it was not measured with HE on.
        quarantine_on_zero: a round scoring 0 (a rejected update, or one at or beyond bad_ratio) quarantines at
            once, whatever the running trust: with the moving average alone, a site starting at trust 1 needs two
            clearly hostile rounds before it falls below 0.5, and it is aggregated in between.
    """

    smoothing: float = 0.5
    ok_ratio: float = 2.0
    bad_ratio: float = 4.0
    quarantine_below: float = 0.5
    readmit_after: int = 2
    good_score: float = 0.8
    initial_trust: float = 1.0
    quarantine_on_zero: bool = True
    head_cosine_ok: float = 0.0
    head_cosine_bad: float = -0.5
    sign_balance_ok: float = SIGN_BALANCE_OK
    sign_balance_bad: float = SIGN_BALANCE_BAD
    body_cosine_ok: float = BODY_COSINE_OK
    body_cosine_bad: float = BODY_COSINE_BAD
    body_cosine_always: bool = False
    vote_share_cap: float = float("inf")

    def __post_init__(self):
        if not 0 < self.smoothing <= 1:
            raise ValueError(f"smoothing must be in (0, 1], got {self.smoothing}")
        if not 0 < self.ok_ratio < self.bad_ratio:
            raise ValueError(f"need 0 < ok_ratio < bad_ratio, got {self.ok_ratio}, {self.bad_ratio}")
        if not 0 <= self.quarantine_below <= 1:
            raise ValueError(f"quarantine_below must be in [0, 1], got {self.quarantine_below}")
        if self.readmit_after < 1:
            raise ValueError(f"readmit_after must be >= 1, got {self.readmit_after}")
        if not 0 <= self.good_score <= 1:
            raise ValueError(f"good_score must be in [0, 1], got {self.good_score}")
        if not 0 <= self.initial_trust <= 1:
            raise ValueError(f"initial_trust must be in [0, 1], got {self.initial_trust}")
        if not 0 < self.sign_balance_ok < self.sign_balance_bad:
            raise ValueError(
                f"need 0 < sign_balance_ok < sign_balance_bad, got {self.sign_balance_ok}, {self.sign_balance_bad}"
            )
        if not self.vote_share_cap >= 1:
            raise ValueError(f"vote_share_cap must be >= 1 (inf: off), got {self.vote_share_cap}")
        if not (self.body_cosine_bad < -1 or -1 <= self.body_cosine_bad < self.body_cosine_ok <= 1):
            raise ValueError(
                f"need -1 <= body_cosine_bad < body_cosine_ok <= 1 (or body_cosine_bad < -1: off), got "
                f"{self.body_cosine_bad}, {self.body_cosine_ok}"
            )
        if not -1 <= self.head_cosine_bad < self.head_cosine_ok <= 1:
            raise ValueError(
                f"need -1 <= head_cosine_bad < head_cosine_ok <= 1, got {self.head_cosine_bad}, {self.head_cosine_ok}"
            )


@dataclass(frozen=True)
class SiteTrust:
    trust: float
    quarantined: bool = False
    good_streak: int = 0


def round_scores(
    distances: Mapping[str, float],
    policy: TrustPolicy,
    head_cosines: Mapping[str, float] | None = None,
    sign_offsets: Mapping[str, float] | None = None,
    body_cosines: Mapping[str, float] | None = None,
) -> dict[str, tuple[float, float]]:
    """site -> (ratio to the median distance, round score in [0, 1]). Scale-free: multiplying every update's
    distance by the same factor changes nothing. With head_cosines (site -> cosine of its classifier's move with
    the reference's), the score is at most the direction score; with sign_offsets (site -> its sign balance minus
    the median site's, fedmed.server.robust.sign_balance), at most the sign score; with body_cosines (site -> cosine
    of its whole clear move with the reference's, fedmed.server.aggregation.body_cosine), at most the body score."""
    if not distances:
        return {}
    values = np.array(list(distances.values()), dtype=np.float64)
    if np.any(~np.isfinite(values)) or np.any(values < 0):
        raise ValueError(f"distances must be finite and >= 0, got {values.tolist()}")
    med = float(np.median(values))
    out = {}
    for site, d in distances.items():
        ratio = d / med if med > 0 else (1.0 if d == 0 else np.inf)
        score = float(np.clip((policy.bad_ratio - ratio) / (policy.bad_ratio - policy.ok_ratio), 0.0, 1.0))
        if head_cosines and site in head_cosines:
            cos = float(head_cosines[site])
            direction = (cos - policy.head_cosine_bad) / (policy.head_cosine_ok - policy.head_cosine_bad)
            score = min(score, float(np.clip(direction, 0.0, 1.0)))
        if sign_offsets and site in sign_offsets:
            off = abs(float(sign_offsets[site]))
            signs = (policy.sign_balance_bad - off) / (policy.sign_balance_bad - policy.sign_balance_ok)
            score = min(score, float(np.clip(signs, 0.0, 1.0)))
        if body_cosines and site in body_cosines:
            body = (float(body_cosines[site]) - policy.body_cosine_bad) / (
                policy.body_cosine_ok - policy.body_cosine_bad
            )
            score = min(score, float(np.clip(body, 0.0, 1.0)))
        out[site] = (float(ratio), score)
    return out


def update_trust(
    previous: Mapping[str, SiteTrust], scores: Mapping[str, float], policy: TrustPolicy
) -> tuple[dict[str, SiteTrust], list[tuple[str, str, str]]]:
    """Fold one round's scores into the running trust. Sites without a score this round keep their state.
    Returns the new states and events (site, "quarantined" | "readmitted", message)."""
    states, events = dict(previous), []
    for site, score in scores.items():
        if not 0.0 <= score <= 1.0:
            raise ValueError(f"score for {site} must be in [0, 1], got {score}")
        old = states.get(site, SiteTrust(policy.initial_trust))
        trust = (1 - policy.smoothing) * old.trust + policy.smoothing * score
        streak = old.good_streak + 1 if score >= policy.good_score else 0
        new = replace(old, trust=trust, good_streak=streak)
        hostile_round = policy.quarantine_on_zero and score == 0.0
        if not old.quarantined and (trust < policy.quarantine_below or hostile_round):
            new = replace(new, quarantined=True, good_streak=0)
            why = (
                "a round scoring 0"
                if trust >= policy.quarantine_below
                else f"trust {trust:.3f} < {policy.quarantine_below}"
            )
            events.append((site, "quarantined", f"{site} quarantined: {why}"))
        elif old.quarantined and streak >= policy.readmit_after:
            # Re-admitted at the threshold, so one more bad round sends it straight back.
            new = replace(new, quarantined=False, trust=max(trust, policy.quarantine_below))
            events.append((site, "readmitted", f"{site} re-admitted after {streak} good rounds"))
        states[site] = new
    return states, events
