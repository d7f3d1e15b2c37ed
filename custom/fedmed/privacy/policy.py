"""A hospital's privacy policy: its (epsilon, delta) ceiling and the DP-SGD clipping norm, from fedmed_site.json."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

from fedmed.job.config_keys import check_keys

# Presets a privacy officer can sign off by name. epsilon 0.1 was measured and is deliberately not a preset
# (see README, Measured): at our data sizes it trains no better than the presets, which already keep little of
# what the federation learns without DP.
PRESETS = {"strong": 1.0, "moderate": 3.0, "weak": 8.0}
DEFAULT_DELTA = 1e-5


@dataclass(frozen=True)
class PrivacyPolicy:
    """Args:
    epsilon: the site's total epsilon ceiling for one job (all rounds together).
    lifetime_epsilon: the ceiling for everything ever released from one dataset at this site, all jobs together,
        composed exactly from the site's privacy ledger (fedmed.privacy.ledger); None = the job ceiling, i.e. one
        job's worth per dataset unless the site allows more.
    delta: the site's delta (1e-5 unless the site sets less).
    max_grad_norm: per-sample gradient clipping norm C.
    noise_multiplier: sigma; None = calibrated so the ceiling is reached exactly at the job's last round.
    preset: name of the preset used, if any (for reports).
    release_metrics: whether the site returns its training loss and validation loss/AUROCs with each update. They
        are computed on the site's data outside DP-SGD, so the epsilon above does not cover them; a site that wants
        nothing but the DP-trained weights (and its epsilon) to leave sets this false.
    """

    epsilon: float
    delta: float = DEFAULT_DELTA
    max_grad_norm: float = 1.0
    noise_multiplier: Optional[float] = None
    preset: str = "custom"
    release_metrics: bool = True
    lifetime_epsilon: Optional[float] = None

    @property
    def lifetime_ceiling(self) -> float:
        return self.epsilon if self.lifetime_epsilon is None else self.lifetime_epsilon

    def __post_init__(self):
        if not self.epsilon > 0:
            raise ValueError(f"privacy epsilon must be > 0, got {self.epsilon}")
        if not 0 < self.delta < 1:
            raise ValueError(f"privacy delta must be in (0, 1), got {self.delta}")
        if not self.max_grad_norm > 0:
            raise ValueError(f"privacy max_grad_norm must be > 0, got {self.max_grad_norm}")
        if self.lifetime_epsilon is not None and not self.lifetime_epsilon > 0:
            raise ValueError(f"privacy lifetime_epsilon must be > 0, got {self.lifetime_epsilon}")
        if self.noise_multiplier is not None and not self.noise_multiplier > 0:
            raise ValueError(f"privacy noise_multiplier must be > 0, got {self.noise_multiplier}")


def parse_privacy(raw: Optional[dict]) -> Optional[PrivacyPolicy]:
    """{"preset": "moderate"} or {"epsilon": 2.5, "delta": 1e-6, "max_grad_norm": 1.0, "noise_multiplier": 1.1}."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ValueError(f"privacy must be an object, got {raw!r}")
    check_keys(
        raw,
        ("preset", "epsilon", "delta", "max_grad_norm", "noise_multiplier", "release_metrics", "lifetime_epsilon"),
        "privacy",
    )
    preset = raw.get("preset", "custom")
    if preset != "custom" and preset not in PRESETS:
        raise ValueError(f"privacy preset must be one of {sorted(PRESETS)} or 'custom', got {preset!r}")
    if preset == "custom" and "epsilon" not in raw:
        raise ValueError("privacy needs 'epsilon' (or a 'preset')")
    epsilon = float(raw.get("epsilon", PRESETS.get(preset, 0.0)))
    if preset != "custom" and "epsilon" in raw and epsilon != PRESETS[preset]:
        raise ValueError(f"privacy preset {preset!r} means epsilon {PRESETS[preset]}, but epsilon {epsilon} was given")
    delta = float(raw.get("delta", DEFAULT_DELTA))
    if delta > DEFAULT_DELTA and preset != "custom":
        raise ValueError(f"presets use delta <= {DEFAULT_DELTA}; got {delta}")
    nm = raw.get("noise_multiplier")
    release = raw.get("release_metrics", True)
    if not isinstance(release, bool):
        raise ValueError(f"privacy release_metrics must be true or false, got {release!r}")
    lifetime = raw.get("lifetime_epsilon")
    if lifetime is not None and (isinstance(lifetime, bool) or not isinstance(lifetime, (int, float))):
        raise ValueError(f"privacy lifetime_epsilon must be a number, got {lifetime!r}")
    return PrivacyPolicy(
        epsilon,
        delta,
        float(raw.get("max_grad_norm", 1.0)),
        None if nm is None else float(nm),
        preset,
        release,
        None if lifetime is None else float(lifetime),
    )


def strictest(*policies: Optional[PrivacyPolicy]) -> Optional[PrivacyPolicy]:
    """The policy that promises the most of those given (None = no policy from that source): the lowest epsilon
    ceiling, with the lowest delta of all, releasing metrics only if every source allows it. A hospital can set its
    ceiling in fedmed_site.json and in an NVFlare privacy scope; neither can loosen the other. The lifetime ceiling
    is the lowest each source implies (its lifetime_epsilon, else its job ceiling)."""
    given = [p for p in policies if p is not None]
    if not given:
        return None
    lifetimes = [p.lifetime_epsilon for p in given if p.lifetime_epsilon is not None]
    lifetime = min(p.lifetime_ceiling for p in given) if lifetimes else None
    return replace(
        min(given, key=lambda p: p.epsilon),
        delta=min(p.delta for p in given),
        release_metrics=all(p.release_metrics for p in given),
        lifetime_epsilon=lifetime,
    )
