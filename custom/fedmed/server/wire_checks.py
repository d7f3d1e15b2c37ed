"""Checks on what a site sends that the server's screening and the record share (pure: no NVFlare, no SQL).

A site chooses its metric names and values; a name the database cannot hold (too long, odd characters) or a value
that is not a finite number must be refused at the door, with the reason, instead of failing every later write.
"""

from __future__ import annotations

import math
import numbers
import re
from typing import Mapping, Optional

METRIC_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_./:-]{1,64}$")
MAX_METRICS = 256  # a round's metrics per site; far above what the executor sends (~20)


def find_metric_name_problem(name) -> Optional[str]:
    """Why this metric name cannot be recorded, or None."""
    if not isinstance(name, str):
        return f"metric name must be a string, got {type(name).__name__}"
    if not METRIC_NAME_PATTERN.fullmatch(name):
        shown = name if len(name) <= 80 else name[:80] + "..."
        return (
            f"metric name {shown!r} ({len(name)} characters) must match {METRIC_NAME_PATTERN.pattern} "
            f"(letters, digits, _ . / : -, at most 64 characters)"
        )
    return None


def find_metrics_problem(metrics: Mapping) -> Optional[str]:
    """The first reason this metrics mapping cannot be recorded (name pattern and length, value a finite number),
    or None when every entry is fine. Booleans are not numbers here: a flag is not a metric."""
    if not isinstance(metrics, Mapping):
        return f"metrics must be a mapping of name -> number, got {type(metrics).__name__}"
    if len(metrics) > MAX_METRICS:
        return f"{len(metrics)} metrics, at most {MAX_METRICS} are accepted"
    for name in sorted(metrics, key=str):
        problem = find_metric_name_problem(name)
        if problem:
            return problem
        value = metrics[name]
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return f"metric {name!r} must be a number, got {type(value).__name__}"
        if not math.isfinite(float(value)):
            return f"metric {name!r} must be finite, got {float(value)}"
    return None
