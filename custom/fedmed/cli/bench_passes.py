"""Benchmark: the screening's per-update passes before and after fedmed.server.passes, in one process, interleaved.

    python scripts/bench_passes.py [--sites 20] [--repeats 3] [--out /tmp/bench_passes.md]

K DenseNet-121 updates (bench_scale's generator). For each update, `before` = model_sha256 (SHA-256) then the two-pass
distance (a float64 copy of each parameter's difference, then a dot), `after` = fedmed.server.passes.hash_and_norm (BLAKE3); the
distance to another state (the aggregate's pass) by both formulas; and the screening's finiteness check. Process CPU seconds per update (steadier than
wall time on a shared machine), under one BLAS thread (what fedmed.server.parallel gives each server thread on 2 cores) and
under the BLAS library's default pool; the tracemalloc peak of one update's pass; bytes of memory traffic per value
by construction. The digests and norms are checked equal.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
import tracemalloc
from pathlib import Path

import blake3
import numpy as np

from fedmed.cli.bench_scale import site_updates
from fedmed.cli.bench_sim import load_average
from fedmed.models.hashing import model_sha256, params_blake3
from fedmed.models.network import build_densenet121, state_to_numpy
from fedmed.server.kernels import middle_of_rows
from fedmed.server.parallel import limited_blas, thread_map
from fedmed.server.passes import has_non_finite, hash_and_norm, reference_pass, squared_distance
from fedmed.server.robust.collusion import MEDIAN_CHUNK, _median_rows, coordinate_median_reference
from fedmed.server.robust.geometric_median import (
    centred_gram,
    combine,
    distance_keys,
    key_groups,
    weiszfeld_on_gram,
)


def two_pass_distance(update, center, keys) -> float:
    """fedmed.server.aggregation.distance before issue 30."""
    sq = 0.0
    for k in keys:
        d = np.subtract(update[k], center[k], dtype=np.float64).reshape(-1)
        sq += float(np.dot(d, d))
    return float(np.sqrt(sq))


def cpu_per_item(fn, items) -> float:
    c = time.process_time()
    for x in items:
        fn(x)
    return (time.process_time() - c) / len(items)


def traced_peak(fn) -> int:
    tracemalloc.start()
    fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def judging_median(updates, keys, repeats: int) -> list:
    """The judging reference's coordinate median (fedmed.server.robust.collusion._median_rows) against np.median(axis=0),
    its formula before issue 30 beyond 16 sites, on the first of the 8 key groups (1/8 of the values), one thread,
    interleaved; the values are checked equal."""
    part = key_groups(updates[0], keys)[0]
    n = sum(updates[0][k].size for k in part)
    before, after = [], []
    with limited_blas(1):
        for _ in range(repeats):
            for out, fn in ((before, lambda r: np.median(np.stack(r), axis=0)), (after, _median_rows)):
                c = time.process_time()
                for k in part:
                    rows = [u[k].reshape(-1) for u in updates]
                    for start in range(0, rows[0].size, MEDIAN_CHUNK):
                        got = fn([r[start : start + MEDIAN_CHUNK] for r in rows])
                out.append(time.process_time() - c)
    k = part[-1]
    rows = [u[k].reshape(-1)[:MEDIAN_CHUNK] for u in updates]
    if not np.array_equal(_median_rows(rows), np.median(np.stack(rows), axis=0)) or got is None:
        raise RuntimeError("_median_rows differs from np.median")
    b, f = sorted(before)[repeats // 2], sorted(after)[repeats // 2]
    scale = sum(updates[0][k].size for k in keys) / n
    return [
        "",
        f"Judging reference (coordinate median of the {len(updates)} updates), one thread, on {n:,} of the values "
        f"(the first key group): np.median(axis=0) {b:.2f} s CPU, _median_rows {f:.3f} s ({b / f:.1f}x); scaled "
        f"to the whole model {b * scale:.1f} s -> {f * scale:.1f} s, {f * scale / len(updates) * 1000:.1f} ms per "
        "update.",
    ]


def reference_lines(updates, keys, repeats: int) -> list:
    """The judging reference, the distances to it and the Gram matrix: three passes before issue 30's fourth pass
    (coordinate_median_reference, then a distance per update, then centred_gram in float64 centred on the mean)
    against fedmed.server.passes.reference_pass, interleaved, process CPU seconds on the server's threads as the round
    engine runs them; the references checked equal, the Weiszfeld weights within 1e-6."""
    k = len(updates)
    w = np.full(k, 1.0 / k)

    def separate():
        ref = coordinate_median_reference(updates, keys)
        thread_map(lambda u: squared_distance(u, ref, keys), updates)
        return ref, centred_gram(updates, w, keys)

    def fused():
        found = reference_pass(updates, keys)
        return found.reference, found.gram

    times: dict = {"separate": [], "fused": []}
    for _ in range(repeats):
        for name, fn in (("separate", separate), ("fused", fused)):
            c = time.process_time()
            got = fn()
            times[name].append(time.process_time() - c)
            if name == "separate":
                want = got
    (ref_a, gram_a), (ref_b, gram_b) = want, got
    if any(not np.array_equal(ref_a[x], ref_b[x]) for x in keys):
        raise RuntimeError("reference_pass's reference differs from coordinate_median_reference's")
    beta_a, beta_b = weiszfeld_on_gram(gram_a, w)[0], weiszfeld_on_gram(gram_b, w)[0]
    gap = float(np.max(np.abs(beta_a - beta_b)))
    if gap > 1e-6:
        raise RuntimeError(f"Weiszfeld weights from reference_pass's Gram differ by {gap:.2g}")
    a, b = (sorted(times[x])[repeats // 2] for x in ("separate", "fused"))
    return [
        "",
        f"Judging reference + distances to it + Gram matrix of the {k} updates, the server's threads, median of "
        f"{repeats} interleaved repetitions: three passes (coordinate_median_reference, squared_distance per "
        f"update, float64 centred_gram) {a:.2f} s CPU; reference_pass {b:.2f} s ({a / b:.2f}x, {a - b:+.2f} s "
        f"saved). The same reference bit for bit; Weiszfeld weights within {gap:.1e}.",
    ]


def floor_lines(updates, keys) -> list:
    """What the round's unavoidable work costs on this machine, one core: reading memory, BLAKE3 (the update digest
    screening records; SHA-256 beside it, what it replaced), the float32
    Gram product of a (K x 4096) block of rows (the reference pass's layout), the median network over the same
    block (fedmed.server.kernels.middle_of_rows), and numpy's sort of K values per coordinate (what it replaced)."""
    k = len(updates)
    big = max(keys, key=lambda x: updates[0][x].size)
    rows = [u[big].reshape(-1) for u in updates]
    with limited_blas(1):
        c = time.process_time()
        for r in rows:
            float(np.add.reduce(r))
        read = sum(r.nbytes for r in rows) / (time.process_time() - c)
        c = time.process_time()
        for r in rows:
            hashlib.sha256(r).digest()
        sha = sum(r.nbytes for r in rows) / (time.process_time() - c)
        c = time.process_time()
        for r in rows:
            blake3.blake3(r.view(np.uint8)).digest()
        b3 = sum(r.nbytes for r in rows) / (time.process_time() - c)
        block = np.stack([r[:4096] for r in rows])
        reps = 50
        c = time.process_time()
        for _ in range(reps):
            np.dot(block, block.T)
        syrk = reps * k * (k + 1) / 2 * 4096 / (time.process_time() - c)  # multiply-adds per second
        middle_of_rows(block.copy())  # compiled (or loaded) before it is timed
        c = time.process_time()
        for _ in range(reps):
            middle_of_rows(block.copy())
        network = reps * 4096 / (time.process_time() - c)  # coordinates per second
        tall = np.ascontiguousarray(block.T)
        c = time.process_time()
        for _ in range(reps):
            np.sort(tall, axis=1)
        sort = reps * 4096 / (time.process_time() - c)
    d = sum(updates[0][x].size for x in keys)
    total = sum(v.nbytes for u in updates for v in u.values())
    one_pass, hashing = total / read, total / b3
    gram, median = k * (k + 1) / 2 * d / syrk, d / network
    floor = one_pass * 3 + hashing + gram + median
    return [
        "",
        f"Floor on this machine (one core, process CPU, one BLAS thread; {k} updates of {total / k / 2**20:.1f} MB): "
        f"reading memory {read / 1e9:.1f} GB/s (one pass over the updates {one_pass:.2f} s); BLAKE3 "
        f"{b3 / 1e9:.2f} GB/s over one buffer ({hashing:.2f} s for every update; SHA-256 {sha / 1e9:.2f} GB/s, "
        f"{total / sha:.2f} s); float32 Gram product of a {k} x 4096 block "
        f"{syrk / 1e9:.1f} G multiply-adds/s (the Gram matrix's {k * (k + 1) / 2 * d / 1e9:.1f} G: {gram:.2f} s); "
        f"the median network over it {network / 1e6:.1f} M coordinates/s (the median: {median:.2f} s; numpy's sort "
        f"of {k} values per coordinate, already transposed: {sort / 1e6:.1f} M/s, {d / sort:.2f} s). With three "
        f"passes (screening, the reference pass, combine): **~{floor:.1f} core-s, {floor / 2:.1f} s on 2 cores**, "
        "before the interpreter's per-block overheads.",
    ]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sites", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("/tmp/bench_passes.md"))
    p.add_argument(
        "--reference-only", action="store_true", help="only the reference pass against its three passes, and the floor"
    )
    a = p.parse_args(argv)
    if a.sites < 1 or a.repeats < 1:
        p.error("--sites and --repeats must be >= 1")
    base = state_to_numpy(build_densenet121(14))
    rng = np.random.default_rng(0)
    drift = {n: rng.normal(0, 0.003, v.shape).astype(v.dtype) for n, v in base.items() if v.dtype.kind == "f"}
    updates = [r.params for r in site_updates(base, a.sites, rng, drift)]
    keys = distance_keys(base)
    if a.reference_only:
        load = load_average()
        lines = [
            f"Command: `python scripts/bench_passes.py {' '.join(sys.argv[1:] if argv is None else argv)}`; "
            f"{a.sites} DenseNet-121 updates. Load average at the start: {load}."
        ]
        lines += reference_lines(updates, keys, a.repeats) + floor_lines(updates, keys)
        lines.append(f"\nLoad average at the end: {load_average()}.")
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text("\n".join(lines) + "\n")
        print("\n".join(lines))
        return 0
    for u in updates:  # the new path gives the old results
        sha, norm = hash_and_norm(u, base, keys)
        if sha != params_blake3(u) or not np.isclose(norm, two_pass_distance(u, base, keys), rtol=1e-6):
            raise RuntimeError("hash_and_norm differs from params_blake3 + the two-pass distance")
    paths = {
        "finiteness before: float64 sum": lambda u: [
            np.isfinite(np.sum(v, dtype=np.float64)) for v in u.values() if v.dtype.kind == "f"
        ],
        "finiteness after: has_non_finite": lambda u: [has_non_finite(v) for v in u.values() if v.dtype.kind == "f"],
        "screening before: model_sha256 + two-pass norm": lambda u: (
            model_sha256(u),
            two_pass_distance(u, base, keys),
        ),
        "screening after: hash_and_norm": lambda u: hash_and_norm(u, base, keys),
        "distance before: two-pass": lambda u: two_pass_distance(u, base, keys),
        "distance after: squared_distance": lambda u: squared_distance(u, base, keys),
    }
    load = load_average()
    times = {(name, mode): [] for name in paths for mode in ("1 BLAS thread", "default BLAS")}
    for _ in range(a.repeats):
        for name, fn in paths.items():
            with limited_blas(1):
                times[(name, "1 BLAS thread")].append(cpu_per_item(fn, updates))
            times[(name, "default BLAS")].append(cpu_per_item(fn, updates[: max(1, a.sites // 4)]))
    w = np.full(a.sites, 1.0 / a.sites)
    gram_cpu, combine_cpu = [], []
    with limited_blas(1):
        for _ in range(a.repeats):
            c = time.process_time()
            centred_gram(updates, w, keys, threads=1)
            gram_cpu.append(time.process_time() - c)
            c = time.process_time()
            combine(updates, w, threads=1)
            combine_cpu.append(time.process_time() - c)
    gram_s, combine_s = sorted(gram_cpu)[a.repeats // 2], sorted(combine_cpu)[a.repeats // 2]
    median_lines = judging_median(updates, keys, a.repeats)
    peaks = {name: traced_peak(lambda fn=fn: fn(updates[0])) for name, fn in paths.items()}
    n_values = sum(base[k].size for k in keys)
    lines = [
        f"Command: `python scripts/bench_passes.py {' '.join(sys.argv[1:] if argv is None else argv)}`; "
        f"{a.sites} DenseNet-121 updates ({n_values:,} values in the distance). Load average at the start: {load}; "
        f"at the end: {load_average()}. CPU ms per update, median of {a.repeats} interleaved repetitions (`default "
        "BLAS` on a quarter of the updates, it is slow under load):",
        "",
        "| pass | 1 BLAS thread ms | default BLAS ms | tracemalloc peak MB |",
        "|---|---|---|---|",
    ]
    for name in paths:
        one = sorted(times[(name, "1 BLAS thread")])[a.repeats // 2] * 1000
        default = sorted(times[(name, "default BLAS")])[a.repeats // 2] * 1000
        lines.append(f"| {name} | {one:.1f} | {default:.1f} | {peaks[name] / 2**20:.2f} |")
    gram_flop = a.sites * (a.sites + 1) * sum(base[k].size for k in keys)  # syrk: K(K+1)/2 x D multiply-adds
    lines += [
        "",
        f"Geometric median's passes over the same {a.sites} updates, one thread, 1 BLAS thread: the Gram matrix "
        f"(centred_gram) {gram_s:.2f} s CPU, {gram_s / a.sites * 1000:.1f} ms per update, "
        f"{gram_flop / gram_s / 1e9:.1f} GFLOP/s of its {gram_flop / 1e9:.1f} GFLOP; combine "
        f"{combine_s / a.sites * 1000:.1f} ms per update.",
    ]
    lines += median_lines
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
