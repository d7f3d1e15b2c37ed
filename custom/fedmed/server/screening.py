"""Checks on what a site sends, before anything of it is aggregated or recorded (pure: no NVFlare, no database).

Each function returns None when the input is acceptable, else one sentence naming what is wrong; the round engine
rejects the update with that sentence as the recorded reason."""

from __future__ import annotations

from typing import Mapping, Optional

import numpy as np

from fedmed.server.aggregation import is_statistic
from fedmed.server.wire_checks import METRIC_NAME_PATTERN

# A site's claimed training-set size: an int in [1, MAX_CLAIMED_SAMPLES]. Larger claims are not plausible for one
# hospital's local epoch and would only be capped anyway (fedmed.server.aggregation.capped_counts).
MAX_CLAIMED_SAMPLES = 10_000_000
# Metric names become database rows and log lines: a short, printable, fixed alphabet (a 10 kB or control-character
# name must not reach either); the repository refuses the same names. Per-class AUROCs fit comfortably.
MAX_METRICS = 256
# BatchNorm statistics may move by at most this factor per round relative to the global model's (variance ratio in
# [1/F, F]; mean shift at most F global standard deviations). Honest local epochs stay far inside it (measured on
# DenseNet-121 from a fresh model, synthetic hospitals at 32 and 64 px, one epoch: variance ratio <= 2.2x, mean
# shift <= 1 standard deviation); a poisoned running_var of -1e6 or 1e6, or a mean moved by 1e4, is far outside.
# Within the bound, the coordinate-wise median of the statistics keeps one site from steering them.
DEFAULT_STATISTICS_FACTOR = 100.0


def find_count_problem(claimed) -> Optional[str]:
    if isinstance(claimed, bool) or not isinstance(claimed, (int, np.integer)):
        return f"num_samples must be a positive integer, got {claimed!r}"[:200]
    if not 1 <= int(claimed) <= MAX_CLAIMED_SAMPLES:
        return f"num_samples must be in [1, {MAX_CLAIMED_SAMPLES}], got {int(claimed)}"
    return None


def find_metrics_problem(metrics) -> Optional[str]:
    """Metric names and values a site reports: a mapping of at most MAX_METRICS names matching METRIC_NAME_PATTERN to
    numbers (None, NaN and Inf are allowed and not recorded: a metric the site could not compute). The same name
    rule as fedmed.server.wire_checks, which the repository applies to what it stores."""
    if metrics is None:
        return None
    if not isinstance(metrics, Mapping):
        return f"metrics must be a mapping, got {type(metrics).__name__}"
    if len(metrics) > MAX_METRICS:
        return f"{len(metrics)} metrics, at most {MAX_METRICS} allowed"
    for name, value in metrics.items():
        if not isinstance(name, str) or not METRIC_NAME_PATTERN.fullmatch(name):
            shown = repr(name)[:40] + ("..." if len(repr(name)) > 40 else "")
            return (
                f"metric name {shown} (length {len(name) if isinstance(name, str) else '?'}) is not 1-64 "
                "characters of A-Z a-z 0-9 _ . / : -"
            )
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            return f"metric {name}: value must be a number, got {type(value).__name__}"
        # A NaN or infinite value is not an attack on anything (an AUROC over a split without positives is NaN):
        # it is left out of the record, not a reason to reject the update.
    return None


def find_statistics_problem(
    update: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray], factor: float = DEFAULT_STATISTICS_FACTOR
) -> Optional[str]:
    """BatchNorm running statistics: finite, variances > 0, within factor of the global model's (see
    DEFAULT_STATISTICS_FACTOR); batch counters non-negative. Call after find_update_problem (names and shapes).

    An update that passes (nearly all) is told so by _statistics_pass, the same element-wise tests over all the
    layers at once; only one that fails is walked layer by layer, for the sentence naming its first failing layer."""
    try:
        if _statistics_pass(update, reference, factor):
            return None
    except (TypeError, ValueError):  # something that does not convert: the walk below says what
        pass
    for key in sorted(k for k in reference if is_statistic(k)):
        v = np.asarray(update[key])
        g = np.asarray(reference[key])
        if key.endswith("num_batches_tracked"):
            if np.any(v < 0):
                return f"{key}: negative batch counter {int(v.min())}"
            continue
        v64 = v.astype(np.float64)
        if not np.all(np.isfinite(v64)):
            return f"{key}: contains NaN or Inf"
        if key.endswith("running_var"):
            if np.any(v64 <= 0):
                return f"{key}: variance must be > 0, got min {float(v64.min()):.4g}"
            ratio = v64 / np.maximum(g.astype(np.float64), 1e-12)
            worst = float(np.max(np.maximum(ratio, 1.0 / ratio)))
            if worst > factor:
                return f"{key}: variance changed {worst:.3g}x from the global model's (at most {factor:g}x per round)"
        elif key.endswith("running_mean"):
            var_key = key[: -len("running_mean")] + "running_var"
            scale = np.sqrt(np.maximum(np.asarray(reference.get(var_key, np.ones_like(g)), np.float64), 1e-12))
            shift = float(np.max(np.abs(v64 - g.astype(np.float64)) / scale))
            if shift > factor:
                return f"{key}: mean moved {shift:.3g} global standard deviations (at most {factor:g} per round)"
    return None


def _statistics_pass(update: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray], factor: float) -> bool:
    """Whether find_statistics_problem's walk would find nothing: the very same float64 element-wise quantities
    (counters >= 0, finite, variances > 0, variance ratio and mean shift within factor), each over the layers
    concatenated, so ~360 BatchNorm layers cost a few numpy calls per update instead of ~10 each (issue 30)."""
    keys = [k for k in reference if is_statistic(k)]
    counters = [k for k in keys if k.endswith("num_batches_tracked")]
    variances = [k for k in keys if k.endswith("running_var")]
    means = [k for k in keys if k.endswith("running_mean")]
    others = [k for k in keys if k not in counters and k not in variances and k not in means]

    def joined(state, names):
        # one cast into the float64 result (np.concatenate's dtype), not a float64 copy of each layer first
        return np.concatenate([np.ravel(state[k]) for k in names], dtype=np.float64) if names else None

    if counters and any(np.any(np.asarray(update[k]) < 0) for k in counters):
        return False
    values = joined(update, variances + means + others)
    if values is not None and not np.all(np.isfinite(values)):
        return False
    if variances:
        v, g = joined(update, variances), joined(reference, variances)
        if np.any(v <= 0):
            return False
        ratio = v / np.maximum(g, 1e-12)
        if float(np.max(np.maximum(ratio, 1.0 / ratio))) > factor:
            return False
    if means:
        v, g = joined(update, means), joined(reference, means)
        var = [
            np.ravel(reference.get(k[: -len("running_mean")] + "running_var", np.ones_like(np.asarray(reference[k]))))
            for k in means
        ]
        scale = np.sqrt(np.maximum(np.concatenate(var, dtype=np.float64), 1e-12))
        if float(np.max(np.abs(v - g) / scale)) > factor:
            return False
    return True
