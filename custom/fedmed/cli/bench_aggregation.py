"""Benchmark: FedAvg vs our geometric median vs the `geom-median` reference on DenseNet-121-sized updates.

    python scripts/bench_aggregation.py [--ks 3,8,16] [--out docs/bench_aggregation.md]
    python scripts/bench_aggregation.py --threads-only --thread-k 50 --burn 2     # thread settings, loaded machine

All timings of one K are taken in the same process, back to back, and reported as ratios to FedAvg. Peak extra
memory (tracemalloc, numpy allocations) is reported as a multiple of the K updates' own size. Then --thread-k
updates through the geometric median and FedAvg under each thread setting (fedmed.cli.bench_threads: the default,
one BLAS thread, and the oversubscribed pre-issue-30 behaviour), interleaved, with --burn CPU-spinning processes
beside them to load the machine.
"""

from __future__ import annotations

import argparse
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
from geom_median.numpy import compute_geometric_median
from tqdm import tqdm

from fedmed.cli.bench_sim import load_average
from fedmed.cli.bench_threads import MODES_HEADER, THREAD_MODES, cpu_burners, modes_table, time_modes
from fedmed.models.network import build_densenet121, state_to_numpy
from fedmed.server.aggregation import weighted_mean
from fedmed.server.robust.geometric_median import distance_keys, geometric_median

TOLERANCES = (1e-6, 1e-10, 1e-20)  # 1e-20 is geom-median's default (it then runs to maxiter)


def make_updates(k: int, seed: int) -> tuple[list[dict], np.ndarray]:
    """K realistic updates: the same DenseNet-121 state plus site-specific drifts of different sizes."""
    rng = np.random.default_rng(seed)
    base = state_to_numpy(build_densenet121(14))
    updates = []
    for i in range(k):
        scale = 0.01 * (1 + i % 3)
        updates.append(
            {
                n: (v + rng.normal(0, scale, v.shape).astype(v.dtype)) if v.dtype.kind == "f" else v.copy()
                for n, v in base.items()
            }
        )
    return updates, rng.integers(100, 400, k).astype(float)


def timed(fn, repeats: int = 1):
    best = float("inf")
    out = None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def peak_memory(fn) -> int:
    tracemalloc.start()
    fn()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak


def thread_section(a, argv) -> list[str]:
    """--thread-k updates through the geometric median and FedAvg under each thread setting, interleaved."""
    updates, w = make_updates(a.thread_k, a.seed)
    with cpu_burners(a.burn):
        load = load_average()
        gm = time_modes(lambda: geometric_median(updates, w), THREAD_MODES, a.thread_repeats)
        avg = time_modes(lambda: weighted_mean(updates, w), THREAD_MODES, a.thread_repeats)
        load_end = load_average()
    return [
        f"## Thread settings: {a.thread_k} updates, {a.burn} CPU burner(s) beside them",
        "",
        f"Command: `python scripts/bench_aggregation.py {' '.join(sys.argv[1:] if argv is None else argv)}`. Load average when the timing started: {load}; "
        f"at its end: {load_end}. The settings are interleaved in one process (fedmed.cli.bench_threads); "
        "compare ratios, not seconds: on a shared machine the seconds move with the other jobs.",
        "",
        *MODES_HEADER,
        *modes_table(gm, "geometric median"),
        *modes_table(avg, "FedAvg"),
    ]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ks", default="3,8,16")
    p.add_argument("--out", type=Path, default=Path("docs/bench_aggregation.md"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--thread-k", type=int, default=50, help="updates for the thread-settings comparison (0: skip)")
    p.add_argument("--thread-repeats", type=int, default=3)
    p.add_argument("--burn", type=int, default=0, help="CPU-spinning processes beside the thread comparison")
    p.add_argument("--threads-only", action="store_true", help="only the thread-settings comparison")
    a = p.parse_args(argv)
    if a.thread_k < 0 or (a.thread_k and a.thread_k < 3) or a.thread_repeats < 1 or a.burn < 0:
        p.error("--thread-k must be 0 or >= 3, --thread-repeats >= 1, --burn >= 0")
    ks = [] if a.threads_only else [int(x) for x in a.ks.split(",")]
    thread_lines = thread_section(a, argv) if a.thread_k else []
    if a.threads_only:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text("\n".join(["# bench_aggregation: thread settings", "", *thread_lines]) + "\n")
        print("\n".join(thread_lines))
        return 0
    rows, mem_rows = [], []
    for k in tqdm(ks, desc="K"):
        updates, w = make_updates(k, a.seed)
        keys = distance_keys(updates[0])
        size = sum(np.asarray(u[n]).nbytes for u in updates for n in u)
        flat = [np.concatenate([u[n].ravel() for n in keys]) for u in updates]  # reference's list-of-arrays input
        for tol in TOLERANCES:
            # FedAvg timed right before each geometric median, best of 5 each: tens of milliseconds are noisy here.
            t_avg, _ = timed(lambda: weighted_mean(updates, w), repeats=5)
            t_ours, ours = timed(lambda: geometric_median(updates, w, ftol=tol), repeats=5)
            t_ref, ref = timed(lambda: compute_geometric_median(flat, w, ftol=tol))
            ours_flat = np.concatenate([ours.median[n].ravel() for n in keys]).astype(np.float64)
            rel = float(np.linalg.norm(ours_flat - ref.median) / np.linalg.norm(ref.median))
            rows.append((k, tol, t_avg, t_ours, ours.iterations, t_ref, len(ref.logs) - 1 if ref.logs else -1, rel))
        mem = peak_memory(lambda: geometric_median(updates, w, ftol=1e-10))
        mem_avg = peak_memory(lambda: weighted_mean(updates, w))
        mem_rows.append((k, size, mem, mem_avg))
        flat = updates = None  # free this K's updates before the next K's are made

    lines = [
        "# bench_aggregation",
        "",
        f"Command: `python scripts/bench_aggregation.py --ks {a.ks}` (2-core CPU, DenseNet-121 state: "
        f"{sum(v.size for v in state_to_numpy(build_densenet121(14)).values()):,} values per update).",
        "",
        "| K | ftol | FedAvg s | ours s | ours / FedAvg | ours iters | geom-median s | geom-median iters | "
        "geom-median / ours | rel. diff |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for k, tol, t_avg, t_ours, it, t_ref, it_ref, rel in rows:
        lines.append(
            f"| {k} | {tol:g} | {t_avg:.2f} | {t_ours:.2f} | {t_ours / t_avg:.2f}x | {it} | {t_ref:.2f} | "
            f"{it_ref} | {t_ref / t_ours:.1f}x | {rel:.1e} |"
        )
    lines += [
        "",
        "Peak memory allocated during one aggregation (tracemalloc), relative to the K updates themselves:",
        "",
        "| K | updates MB | geometric median peak MB | ratio | FedAvg peak MB |",
        "|---|---|---|---|---|",
    ]
    for k, size, mem, mem_avg in mem_rows:
        lines.append(f"| {k} | {size / 2**20:.0f} | {mem / 2**20:.0f} | {mem / size:.2f}x | {mem_avg / 2**20:.0f} |")
    lines += ["", *thread_lines]
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for tol in TOLERANCES:
        sel = [r for r in rows if r[1] == tol]
        ax.plot([r[0] for r in sel], [r[3] / r[2] for r in sel], "o-", label=f"ours, ftol={tol:g}")
        ax.plot([r[0] for r in sel], [r[5] / r[2] for r in sel], "x--", label=f"geom-median, ftol={tol:g}")
    ax.set_xlabel("K (sites)")
    ax.set_ylabel("time / FedAvg time")
    ax.set_yscale("log")
    ax.set_title("Geometric median cost on DenseNet-121 updates")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(a.out.with_suffix(".png"), dpi=120)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
