"""Thread settings the benchmarks compare (bench_aggregation, bench_scale), and a CPU burner to load the machine.

Modes, each applied around one timed call in this process (interleaved, so all see the same machine load):
  default         fedmed.server.parallel's choice: P server threads x cores // P BLAS threads
  one-thread      BLAS limited to one thread for the whole call (what OMP_NUM_THREADS=1 gave), server threads kept
  oversubscribed  P server threads x a full BLAS pool each (FEDMED_BLAS_THREADS = cores): the behaviour before
                  issue 30, kept to show what the default avoids
"""

from __future__ import annotations

import multiprocessing
import os
import time
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

from fedmed.server.parallel import ENV_BLAS_THREADS, available_cores, limited_blas

THREAD_MODES = ("default", "one-thread", "oversubscribed")


@contextmanager
def thread_mode(mode: str) -> Iterator[None]:
    if mode not in THREAD_MODES:
        raise ValueError(f"unknown thread mode {mode!r}; choose one of {list(THREAD_MODES)}")
    if mode == "default":
        yield
    elif mode == "one-thread":
        with limited_blas(1):  # the outermost limit holds: thread_map's own limits inside change nothing
            yield
    else:
        previous = os.environ.get(ENV_BLAS_THREADS)
        os.environ[ENV_BLAS_THREADS] = str(available_cores())
        try:
            yield
        finally:
            if previous is None:
                os.environ.pop(ENV_BLAS_THREADS, None)
            else:
                os.environ[ENV_BLAS_THREADS] = previous


def time_modes(fn: Callable[[], object], modes: Sequence[str], repeats: int) -> dict[str, list[float]]:
    """Wall seconds of fn() under each mode, `repeats` times, modes interleaved within each repetition."""
    out: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(repeats):
        for m in modes:
            with thread_mode(m):
                t = time.perf_counter()
                fn()
                out[m].append(time.perf_counter() - t)
    return out


def _burn() -> None:
    x = 0
    while True:
        x = (x * 1103515245 + 12345) & 0x7FFFFFFF


@contextmanager
def cpu_burners(n: int) -> Iterator[None]:
    """n processes spinning on a core each while the block runs (a loaded machine on demand); stopped by their own
    handles at the end."""
    procs = [multiprocessing.get_context("spawn").Process(target=_burn, daemon=True) for _ in range(max(0, n))]
    for p in procs:
        p.start()
    try:
        yield
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.join(timeout=5)


def modes_table(times: dict[str, list[float]], label: str) -> list[str]:
    """Markdown rows: mode, each repetition, median, median / one-thread median."""
    med = {m: sorted(v)[len(v) // 2] for m, v in times.items()}
    ref = med.get("one-thread")
    rows = []
    for m, v in times.items():
        ratio = f"{med[m] / ref:.2f}x" if ref else "-"
        rows.append(f"| {label} | {m} | {', '.join(f'{s:.2f}' for s in v)} | {med[m]:.2f} | {ratio} |")
    return rows


MODES_HEADER = [
    "| what | threads | seconds, each repetition | median s | / one-thread |",
    "|---|---|---|---|---|",
]
