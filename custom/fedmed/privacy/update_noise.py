"""User-level (whole-update) clipping and Gaussian noise applied to what leaves a hospital.

A different guarantee from DP-SGD: DP-SGD bounds what the update reveals about any one *image* (example-level DP,
accounted per round by Opacus); this bounds the whole update relative to the global model the site received, so
with calibrated noise it protects the *site's whole contribution* for that round: the Gaussian mechanism, with
noise std sigma x sensitivity, where the sensitivity depends on the neighbouring relation stated:
  - "replace" (the default): the site's data replaced by any other data. Two clipped updates can differ by up to
    2C (both lie in the ball of radius C around the reference), so the sensitivity is 2C. This relation also covers
    any change to one image, which is what lets the site's ledger compose these rounds with DP-SGD's.
  - "add_remove": the site present or absent, absence meaning it sends the reference unchanged; sensitivity C.
Each round is one such mechanism (sampling rate 1); the site's lifetime ledger composes the rounds
(fedmed.flare.filters.UpdateNoiseFilter charges them). Written by hand because neither NVFlare 2.9 nor Opacus ships
an update-level clip-and-noise step (NVFlare's SVT/percentile filters give no such guarantee).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

# Neighbouring relation -> sensitivity in units of the clip norm C (module docstring).
RELATIONS = {"replace": 2.0, "add_remove": 1.0}


def sensitivity(clip_norm: float, relation: str) -> float:
    if relation not in RELATIONS:
        raise ValueError(f"neighbouring relation must be one of {sorted(RELATIONS)}, got {relation!r}")
    return RELATIONS[relation] * clip_norm


@dataclass(frozen=True)
class NoisedUpdate:
    params: dict  # reference + clipped delta + noise (float arrays); integer buffers passed through
    norm: float  # L2 norm of the update's delta before clipping
    scale: float  # factor applied to the delta (1 = not clipped)
    noise_std: float  # per-coordinate Gaussian standard deviation added (noise_multiplier x sensitivity)
    sensitivity: float  # L2 sensitivity for the stated relation (2C replace, C add/remove)


def clip_and_noise_update(
    update: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray],
    clip_norm: float,
    noise_multiplier: float,
    rng: np.random.Generator,
    relation: str = "replace",
) -> NoisedUpdate:
    """reference + min(1, C / ||u - r||) (u - r) + N(0, (sigma Delta)^2) over every floating-point array (BatchNorm
    statistics too: they come from local data), Delta the sensitivity for `relation`. Inputs are not modified."""
    if not clip_norm > 0:
        raise ValueError(f"clip_norm must be > 0, got {clip_norm}")
    if not noise_multiplier >= 0:
        raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
    missing = sorted(set(update) ^ set(reference))
    if missing:
        raise ValueError(f"update and reference differ in parameters: {missing[:3]}")
    floats = [k for k, v in update.items() if np.asarray(v).dtype.kind == "f"]
    deltas = {k: np.asarray(update[k], np.float64) - np.asarray(reference[k], np.float64) for k in floats}
    for k in floats:
        if np.shape(update[k]) != np.shape(reference[k]):
            raise ValueError(f"parameter {k}: update shape {np.shape(update[k])} != reference {np.shape(reference[k])}")
    norm = float(np.sqrt(sum(float(np.sum(d * d)) for d in deltas.values())))
    if not np.isfinite(norm):
        raise ValueError("the update contains NaN or Inf; nothing is released")
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    sens = sensitivity(clip_norm, relation)
    std = noise_multiplier * sens
    out = {k: np.array(v, copy=True) for k, v in update.items() if k not in deltas}
    for k, d in deltas.items():
        noised = np.asarray(reference[k], np.float64) + scale * d + (rng.normal(0.0, std, d.shape) if std else 0.0)
        out[k] = noised.astype(np.asarray(update[k]).dtype)
    return NoisedUpdate(out, norm, scale, std, sens)
