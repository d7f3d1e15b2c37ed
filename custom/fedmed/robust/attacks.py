"""Hostile-hospital simulation: what a compromised or broken site could send. Used by the robustness tests and
benchmarks, and switchable per site (fedmed_site.json "hostile") to rehearse a real deployment's defences.
Attacks act on the site's update (local - global) after honest local training, except label flipping, which
poisons the training itself."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

from fedmed.config_keys import check_keys
from fedmed.robust.geometric_median import NON_TRAINABLE_SUFFIXES

ATTACKS = ("sign_flip", "scale", "gaussian_noise", "label_flip", "nan", "little_is_enough")
# Attacks on what a site sends besides its weights (its claims, statistics, ciphertexts, metrics, or an earlier or
# another site's update). The red-team script plays them in-process (fedmed.inprocess, apply_wire_attack); a
# site's rehearsal config ("hostile" in fedmed_site.json) takes only ATTACKS.
WIRE_ATTACKS = ("inflate_count", "bn_poison", "he_scale", "he_other_scale", "long_metric", "replay", "copy_site")


@dataclass(frozen=True)
class Attack:
    """Args:
    kind: one of ATTACKS.
    factor: sign_flip / scale multiply the update by -factor / factor; gaussian_noise uses factor x the update's
        RMS as noise std; little_is_enough shifts by factor (z) standard deviations (Baruch et al. 2019 use z ~ 1).
    seed: noise seed.
    """

    kind: str
    factor: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.kind not in ATTACKS + WIRE_ATTACKS:
            raise ValueError(f"attack kind must be one of {ATTACKS + WIRE_ATTACKS}, got {self.kind!r}")
        if not np.isfinite(self.factor) or self.factor < 0:
            raise ValueError(f"attack factor must be finite and >= 0, got {self.factor}")

    @property
    def poisons_labels(self) -> bool:
        return self.kind == "label_flip"

    @property
    def on_wire(self) -> bool:
        return self.kind in WIRE_ATTACKS


def parse_attack(raw: dict | None) -> Attack | None:
    if raw is None:
        return None
    if not isinstance(raw, dict) or "kind" not in raw:
        raise ValueError(f"hostile must be an object with 'kind' (one of {ATTACKS}), got {raw!r}")
    check_keys(raw, ("kind", "factor", "seed"), "hostile")
    if raw["kind"] not in ATTACKS:
        raise ValueError(f"hostile kind must be one of {ATTACKS} in a site config, got {raw['kind']!r}")
    return Attack(raw["kind"], float(raw.get("factor", 1.0)), int(raw.get("seed", 0)))


def apply_attack(
    local: Mapping[str, np.ndarray], global_: Mapping[str, np.ndarray], attack: Attack, round_num: int = 0
) -> dict:
    """Return the hostile version of a site's parameters. BatchNorm statistics pass through unchanged."""
    rng = np.random.default_rng([attack.seed, round_num])
    out = {}
    for k, v in local.items():
        v = np.asarray(v)
        if (
            not np.issubdtype(v.dtype, np.floating)
            or k.endswith(NON_TRAINABLE_SUFFIXES)
            or attack.poisons_labels
            or attack.on_wire
        ):
            out[k] = v.copy()
            continue
        g = np.asarray(global_[k], np.float64)
        delta = v.astype(np.float64) - g
        if attack.kind == "sign_flip":
            delta = -attack.factor * delta
        elif attack.kind == "scale":
            delta = attack.factor * delta
        elif attack.kind == "gaussian_noise":
            rms = float(np.sqrt(np.mean(delta**2))) if delta.size else 0.0
            delta = delta + rng.normal(0.0, attack.factor * rms + 1e-12, delta.shape)
        elif attack.kind == "nan":
            delta = np.full_like(delta, np.nan)
        elif attack.kind == "little_is_enough":
            # One colluder's estimate of the benign spread: its own update's magnitude per coordinate. The shift
            # stays within the benign spread, against the benign direction, which distance filters struggle to see.
            delta = delta - attack.factor * np.abs(delta)
        out[k] = (g + delta).astype(v.dtype)
    return out
