"""Strict keys for hand-edited settings files: an unknown key is an error naming the nearest valid one.

A typo must never silently drop a setting (a "privcy" block would otherwise remove a hospital's DP ceiling).
"""

from __future__ import annotations

import difflib
from typing import Iterable, Mapping


def check_keys(raw: Mapping, allowed: Iterable[str], where: str) -> None:
    """Raises ValueError for each key of raw not in allowed, suggesting the closest allowed key (difflib)."""
    allowed = sorted(allowed)
    unknown = sorted(str(k) for k in raw if k not in allowed)
    if not unknown:
        return
    parts = []
    for key in unknown:
        near = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
        parts.append(f"{key!r}" + (f" (did you mean {near[0]!r}?)" if near else ""))
    raise ValueError(f"{where}: unknown key(s) {', '.join(parts)}; valid keys: {', '.join(allowed)}")
