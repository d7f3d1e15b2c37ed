"""The server's per-site work spread over threads: screening, hashing and distances of K updates, and the geometric
median's passes over the parameters. Threads, not processes: numpy and hashlib release the GIL on large arrays, and
the updates stay shared, never copied. Measured by scripts/bench_scale.py.

No oversubscription: each server thread may call BLAS (numpy's OpenBLAS), which by default starts a pool of one
thread per core. P server threads x a full BLAS pool each is P x cores threads on the cores: on a loaded 2-core
machine 50 updates through the geometric median took 13 s that way and 2.7 s with one BLAS thread (issue 30). So
while thread_map runs P > 1 threads, BLAS is limited to cores // P threads (at least 1) for the whole process
(threadpoolctl; OpenBLAS's thread count is process-wide), and restored afterwards. The sites choose theirs the same
way: site_torch_threads() is what a site passes to torch.set_num_threads when its own config sets no
resources.num_threads; fedmed.flare.fedjob.run_simulation shares the cores among the sites it trains at once.

Overrides (environment of the server or site process):
  FEDMED_SERVER_THREADS=P  server threads for the per-site work (default: the cores, at most MAX_THREADS)
  FEDMED_BLAS_THREADS=B    BLAS threads while P > 1 server threads run (default cores // P; B = cores is the old,
                           oversubscribed behaviour, for measuring it)
  FEDMED_SITE_THREADS=T    torch threads of a site whose fedmed_site.json sets no resources.num_threads
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import lru_cache
from typing import Callable, Iterable, Iterator, Optional, TypeVar

ENV_SERVER_THREADS = "FEDMED_SERVER_THREADS"
ENV_BLAS_THREADS = "FEDMED_BLAS_THREADS"
ENV_SITE_THREADS = "FEDMED_SITE_THREADS"
MAX_THREADS = 8  # beyond this the passes are bound by memory bandwidth, not cores

T = TypeVar("T")
R = TypeVar("R")

_limit_lock = threading.Lock()
_limit_depth = 0  # thread_map calls running now; only the outermost sets and restores the BLAS limit
_limit_undo = None  # the outermost call's threadpoolctl limiter, restored when the last call ends


def _env_threads(name: str) -> Optional[int]:
    text = os.environ.get(name, "").strip()
    if not text:
        return None
    try:
        n = int(text)
    except ValueError:
        raise ValueError(f"${name} must be a whole number of threads, got {text!r}") from None
    if n < 1:
        raise ValueError(f"${name} must be >= 1, got {n}")
    return n


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, which containers and taskset narrow)."""
    return max(1, len(os.sched_getaffinity(0)))


def server_threads() -> int:
    """Threads for the server's per-site work: $FEDMED_SERVER_THREADS, else the cores this process may run on (at
    most MAX_THREADS)."""
    n = _env_threads(ENV_SERVER_THREADS)
    return n if n is not None else min(MAX_THREADS, available_cores())


def blas_threads(pool: int) -> int:
    """BLAS threads while `pool` server threads run: $FEDMED_BLAS_THREADS, else cores // pool (at least 1), so
    pool x BLAS threads <= cores."""
    n = _env_threads(ENV_BLAS_THREADS)
    return n if n is not None else max(1, available_cores() // max(1, pool))


def site_torch_threads() -> Optional[int]:
    """Torch threads for a site whose own config names none: $FEDMED_SITE_THREADS, else None (torch's choice, all
    the cores: right for a hospital whose machine trains one site)."""
    return _env_threads(ENV_SITE_THREADS)


def simulated_site_threads(sites_at_once: int) -> int:
    """Torch threads per site when `sites_at_once` sites train on this machine's cores together: cores // sites
    (at least 1), so sites x torch threads <= cores."""
    return max(1, available_cores() // max(1, sites_at_once))


@lru_cache(maxsize=1)
def _controller():
    """threadpoolctl's view of the BLAS libraries loaded in this process (found once: a few milliseconds)."""
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


@contextmanager
def limited_blas(threads: int) -> Iterator[None]:
    """BLAS limited to `threads` threads for the whole process while the block runs (nested and concurrent uses:
    the outermost one's limit holds until the last one ends)."""
    global _limit_depth, _limit_undo
    with _limit_lock:
        if _limit_depth == 0:
            _limit_undo = _controller().limit(limits=threads, user_api="blas")
        _limit_depth += 1
    try:
        yield
    finally:
        with _limit_lock:
            _limit_depth -= 1
            if _limit_depth == 0:
                _limit_undo.restore_original_limits()
                _limit_undo = None


def thread_map(fn: Callable[[T], R], items: Iterable[T], threads: int | None = None) -> list[R]:
    """[fn(x) for x in items], in order, on up to `threads` threads (default server_threads()), with BLAS limited
    to blas_threads(threads) meanwhile. An exception in any call is raised here, as the loop would."""
    items = list(items)
    n = min(threads or server_threads(), len(items))
    if n <= 1:
        return [fn(x) for x in items]
    with limited_blas(blas_threads(n)), ThreadPoolExecutor(max_workers=n, thread_name_prefix="fedmed-server") as pool:
        return list(pool.map(fn, items))
