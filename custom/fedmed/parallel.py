"""The server's per-site work spread over threads: screening, hashing and distances of K updates, and the geometric
median's passes over the parameters. Threads, not processes: numpy and hashlib release the GIL on large arrays, and
the updates stay shared, never copied. Measured by scripts/bench_scale.py."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, TypeVar

ENV_SERVER_THREADS = "FEDMED_SERVER_THREADS"
MAX_THREADS = 8  # beyond this the passes are bound by memory bandwidth, not cores

T = TypeVar("T")
R = TypeVar("R")


def server_threads() -> int:
    """Threads for the server's per-site work: $FEDMED_SERVER_THREADS, else the cores this process may run on (at
    most MAX_THREADS)."""
    text = os.environ.get(ENV_SERVER_THREADS, "").strip()
    if text:
        try:
            n = int(text)
        except ValueError:
            raise ValueError(f"${ENV_SERVER_THREADS} must be a whole number of threads, got {text!r}") from None
        if n < 1:
            raise ValueError(f"${ENV_SERVER_THREADS} must be >= 1, got {n}")
        return n
    return max(1, min(MAX_THREADS, len(os.sched_getaffinity(0))))


def thread_map(fn: Callable[[T], R], items: Iterable[T], threads: int | None = None) -> list[R]:
    """[fn(x) for x in items], in order, on up to `threads` threads (default server_threads()). An exception in
    any call is raised here, as the loop would."""
    items = list(items)
    n = min(threads or server_threads(), len(items))
    if n <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(max_workers=n, thread_name_prefix="fedmed-server") as pool:
        return list(pool.map(fn, items))
