"""Benchmark: does the server scale to many hospitals?

    python scripts/bench_scale.py                      # --sites 10 25 50 100 --db sqlite postgres, both simulator runs
    python scripts/bench_scale.py --sites 50 --db sqlite --skip-simulator
    python scripts/bench_scale.py --quick --out /tmp/bench_scale.md          # tiny, what the test runs

1. Round engine: K sites' DenseNet-121 updates (perturbations of a real model state: a drift all sites share plus
   each site's own noise, BatchNorm statistics moved a little) through RoundEngine.step, the very call the
   Controller makes (screening, replay/copy hashes, geometric median, distance and head-direction scoring, trust),
   then the round recorded with Repository.record_round (the Controller's record: every update, alert and trust
   row, audit chain) on SQLite and on a throwaway PostgreSQL on 127.0.0.1. --rounds rounds per K (each with fresh
   updates around the last aggregate). Time: wall and process CPU. Memory: the numpy/Python allocations made
   during step + record (tracemalloc peak, a separate pass) and the process's peak RSS during the timed pass
   (VmHWM reset just before), against the K updates held (K x the state's bytes).
2. Simulator, many hospitals: one job of --sim-sites small hospitals end to end in NVFlare's simulator.
   Then, at the largest K, the same step under each thread setting (fedmed.cli.bench_threads: the default, one
   BLAS thread, the oversubscribed pre-issue-30 behaviour), interleaved, --thread-repeats times, with --burn
   CPU-spinning processes beside it (0: none; the machine's own load is reported either way).
3. Simulator, many rounds: --long-rounds rounds of a small job, the server process's RSS taken at the end of every
   round (fedmed.flare.probes); the slope of a straight line through it says whether the server grows. The
   Controller returns the round's freed heap to the operating system at the end of each round (fedmed.server.heap);
   FEDMED_TRIM_HEAP=0 in the environment turns that off, to measure the growth without it.
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import io
import os
import pstats
import sys
import tempfile
import time
import tracemalloc
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

import numpy as np
from tqdm import tqdm

from fedmed.cli.bench_sim import (
    command,
    environment,
    load_average,
    make_small_hospitals,
    median,
    memory_now,
    run_probed,
)
from fedmed.cli.bench_threads import MODES_HEADER, THREAD_MODES, cpu_burners, modes_table, time_modes
from fedmed.models.network import build_densenet121, state_to_numpy
from fedmed.server.aggregation import is_statistic
from fedmed.server.heap import ENV_TRIM_HEAP
from fedmed.server.rounds import RoundEngine, RoundRules, SiteResult, finite_or_none
from fedmed.store.models import utcnow
from fedmed.store.repository import Repository, RoundRecord, TrustRecord

DBS = ("sqlite", "postgres")
TARGETS = {50: 2.0, 100: 4.0}  # sites -> step + record seconds on 2 cores (issue 30)
# Everything from this line on in an existing --out file is hand-written (analysis, other runs) and kept when the
# generated part above it is written again.
KEEP_MARKER = "<!-- bench_scale: hand-written sections below are kept when the file is regenerated -->"
QUICK_SLICE = ("features.conv0.", "features.norm0.", "features.denseblock1.denselayer1.", "class_layers.")


# -- 1. the round engine --------------------------------------------------------------------------------------------


def site_updates(base: dict, k: int, rng: np.random.Generator, drift: dict) -> list[SiteResult]:
    """K sites' results around `base`: weights = base + the shared drift + the site's own noise (three noise
    levels, so distances differ as real sites' do); BatchNorm means and variances moved by ~1%, counters advanced."""
    results = []
    for i in range(k):
        sigma = np.float32(0.002 * (1 + i % 3))
        params = {}
        for name, v in base.items():
            if v.dtype.kind != "f":
                params[name] = v + 10
            elif is_statistic(name) and name.endswith("running_var"):
                params[name] = v * np.exp(rng.normal(0, 0.01, v.shape)).astype(v.dtype)
            elif is_statistic(name):
                params[name] = v + rng.normal(0, 0.01, v.shape).astype(v.dtype)
            else:
                noise = rng.standard_normal(v.shape, dtype=np.float32)
                noise *= sigma
                noise += v
                noise += drift[name]
                params[name] = noise
        results.append(
            SiteResult(
                site=f"site-{i:03d}",
                params=params,
                claimed_samples=int(rng.integers(100, 400)),
                metrics={"train_loss": 0.3, "val_loss": 0.35, "val_mean_auroc": 0.7 + 0.001 * i, "val_auroc": 0.7},
            )
        )
    return results


def round_record(report, engine: RoundEngine, results: list, started) -> RoundRecord:
    """The record the Controller writes for an aggregated round scored by the sites' validation (no server test
    set): every update, alert and each site's trust (fedmed.flare.round_scoring.RoundScorer.record)."""
    trust = tuple(TrustRecord(s, t.trust, t.quarantined, t.good_streak) for s, t in sorted(engine.trust.items()))
    updates = tuple(replace(u, val_score=finite_or_none(u.metrics.get("val_auroc"))) for u in report.updates)
    score = report.weighted_site_metric(results, "val_auroc")
    return RoundRecord(
        report.round_num + 1,
        updates,
        None,
        finite_or_none(score),
        "mean_auroc",
        "site_validation",
        finite_or_none(score),
        {},
        None,
        started,
        report.alerts,
        trust,
    )


class Databases:
    """A repository per (database kind, K): SQLite files in a temporary folder, PostgreSQL databases on one
    throwaway cluster (fedmed.store.pgcluster) started here and stopped, by PID, at close()."""

    def __init__(self, kinds, folder: Path):
        self.folder = folder
        self.cluster = None
        if "postgres" in kinds:
            from fedmed.store.pgcluster import PgCluster, find_bin_dir

            bin_dir = find_bin_dir()
            if bin_dir is None:
                raise RuntimeError(
                    "--db postgres: PostgreSQL server binaries not found (run scripts/ensure_postgres.sh)"
                )
            self.cluster = PgCluster(bin_dir)
            self.cluster.start()

    def open(self, kind: str, name: str) -> tuple[Repository, str]:
        """A fresh repository with a started run: (repository, run uid)."""
        url = f"sqlite:///{self.folder / (name + '.db')}" if kind == "sqlite" else self.cluster.create_database()
        repo = Repository(
            url,
            audit_key_file=self.folder / f"{kind}-{name}" / "local" / "audit_key",
            heads_file=self.folder / f"{kind}-{name}" / "audit_heads.log",
        )
        uid = uuid.uuid4().hex
        repo.start_run(uid, "bench_scale", name, "geometric_median", 2, {})
        return repo, uid

    def close(self) -> None:
        if self.cluster is not None:
            self.cluster.destroy()


@dataclass
class EngineRow:
    sites: int
    round: int
    step_s: float
    step_cpu_s: float
    record_s: dict  # db kind -> seconds of record_round
    updates_bytes: int
    rss_before: int = 0
    rss_peak: int = 0  # process peak RSS during step + record (VmHWM reset before)
    traced_peak: int = 0  # tracemalloc peak of step + record (allocations made during them)
    aggregated: int = 0
    iterations: int = 0
    # phase -> (process CPU s, main thread's own CPU s) of one more step (timed_phases), the last round of each K
    phases: dict = field(default_factory=dict)


def phase_points() -> tuple:
    """(label, owner, attribute) of the functions timed_phases wraps: the step's phases, none nested in another."""
    from fedmed.server import aggregation
    from fedmed.server.robust import geometric_median

    return (
        ("screening (checks, BLAKE3, norm, signs, sketch, finiteness)", RoundEngine, "_examine_all"),
        ("near-copy tests", RoundEngine, "_find_near_copies"),
        ("reference pass (coordinate median, distances to it, Gram matrix)", aggregation, "reference_pass"),
        ("Gram matrix on its own (centred_gram: not the engine's path)", geometric_median, "centred_gram"),
        ("Weiszfeld on the Gram matrix", geometric_median, "weiszfeld_on_gram"),
        ("combine (the median's weighted sum)", geometric_median, "combine"),
        ("BatchNorm statistics' median", aggregation, "median_of_statistics"),
        ("names and shapes check", aggregation, "check_same_keys_and_shapes"),
    )


@contextmanager
def timed_phases(totals: dict):
    """While open, each phase_points function adds (process CPU s, its calling thread's CPU s) of every call to
    totals[label]: the phases run one after another from the step's thread (their own threads inside), so process
    time is theirs."""

    def timed(fn, label):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            cpu, own = time.process_time(), time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                was = totals.get(label, (0.0, 0.0))
                totals[label] = (was[0] + time.process_time() - cpu, was[1] + time.thread_time() - own)

        return wrapper

    saved = [(owner, name, getattr(owner, name)) for _, owner, name in phase_points()]
    try:
        for (label, _, _), (owner, name, fn) in zip(phase_points(), saved):
            setattr(owner, name, timed(fn, label))
        yield totals
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)


def reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux: write 5 to /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def engine_rounds(base, k: int, rounds: int, seed: int, dbs: Databases, kinds, profile: bool) -> tuple[list, str]:
    """`rounds` rounds of K sites: each timed step + record per database, then the memory pass. Returns the rows
    and, with profile, cProfile's top functions of one more step + record (SQLite)."""
    rng = np.random.default_rng(seed + k)
    drift = {n: rng.normal(0, 0.003, v.shape).astype(v.dtype) for n, v in base.items() if v.dtype.kind == "f"}
    engine = RoundEngine(RoundRules(min_clients=k - 1 if k >= 3 else k))
    repos = {kind: dbs.open(kind, f"k{k}") for kind in kinds}
    rows, profile_text, global_params = [], "", base
    for r in range(rounds):
        results = site_updates(global_params, k, rng, drift)
        held = sum(v.nbytes for res in results for v in res.params.values())
        started = utcnow()
        rss_before = memory_now()[0]
        have_hwm = reset_peak_rss()
        t, c = time.perf_counter(), time.process_time()
        report = engine.step(r, global_params, results, [res.site for res in results])
        step_s, step_cpu = time.perf_counter() - t, time.process_time() - c
        record = round_record(report, engine, results, started)
        record_s = {}
        for kind, (repo, uid) in repos.items():
            t = time.perf_counter()
            repo.record_round(uid, record)
            record_s[kind] = time.perf_counter() - t
        row = EngineRow(k, r + 1, step_s, step_cpu, record_s, held, rss_before)
        row.rss_peak = memory_now()[1] if have_hwm else 0
        row.aggregated = len(report.aggregated_sites)
        row.iterations = int(report.diagnostics.get("iterations") or 0)
        if not report.aggregated:
            raise RuntimeError(f"{k} sites, round {r + 1}: not aggregated: {report.problem}")
        # Memory pass: the same round again on a fresh engine (no replay history) with tracemalloc on.
        twin = RoundEngine(engine.rules, trust=dict(engine.trust))
        repo, uid = repos[kinds[0]]
        tracemalloc.start()
        twin_report = twin.step(r, global_params, results, [res.site for res in results])
        repo.record_round(uid, round_record(twin_report, twin, results, started))
        row.traced_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        rows.append(row)
        tqdm.write(
            f"{k} sites, round {r + 1}: step {step_s:.2f} s, "
            + ", ".join(f"record {kind} {s:.2f} s" for kind, s in record_s.items())
            + f", traced peak {row.traced_peak / held:.2f}x the updates"
        )
        if r == rounds - 1:  # per-phase CPU of one more step (the same round, a fresh engine)
            twin = RoundEngine(engine.rules, trust=dict(engine.trust))
            with timed_phases({}) as phases:
                cpu, own = time.process_time(), time.thread_time()
                twin.step(r, global_params, results, [res.site for res in results])
                phases["step"] = (time.process_time() - cpu, time.thread_time() - own)
            row.phases = phases
        if profile and r == rounds - 1:
            twin = RoundEngine(engine.rules, trust=dict(engine.trust))
            prof = cProfile.Profile()
            prof.enable()
            twin_report = twin.step(r, global_params, results, [res.site for res in results])
            repo.record_round(uid, round_record(twin_report, twin, results, started))
            prof.disable()
            out = io.StringIO()
            pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(12)
            profile_text = out.getvalue()
        global_params = report.params
        results = twin_report = report = None
    for repo, _ in repos.values():
        repo.close()
    return rows, profile_text


def engine_thread_modes(base, k: int, seed: int, repeats: int, burn: int) -> tuple[dict, str, str]:
    """Wall seconds of one step of K sites under each thread setting (a fresh engine each time, so no update is a
    replay), interleaved; with `burn` CPU burners beside it. Returns (mode -> seconds, load at start, at end)."""
    rng = np.random.default_rng(seed + k + 1)
    drift = {n: rng.normal(0, 0.003, v.shape).astype(v.dtype) for n, v in base.items() if v.dtype.kind == "f"}
    results = site_updates(base, k, rng, drift)
    rules = RoundRules(min_clients=k - 1 if k >= 3 else k)
    targets = [r.site for r in results]
    with cpu_burners(burn):
        start = load_average()
        times = time_modes(lambda: RoundEngine(rules).step(0, base, results, targets), THREAD_MODES, repeats)
        end = load_average()
    return times, start, end


def linear_fit(xs, ys) -> tuple[float, float, float]:
    """(intercept, slope, R^2) of a least-squares line."""
    slope, intercept = np.polyfit(xs, ys, 1)
    pred = intercept + slope * np.asarray(xs, float)
    ss_res = float(np.sum((np.asarray(ys) - pred) ** 2))
    ss_tot = float(np.sum((np.asarray(ys) - np.mean(ys)) ** 2))
    return float(intercept), float(slope), (1 - ss_res / ss_tot) if ss_tot > 0 else 1.0


# -- 2. and 3. the simulator ----------------------------------------------------------------------------------------


def simulate(data_root: Path, sites, rounds: int, work: Path, name: str, image_size: int, threads: int):
    """One fedmed job (the Controller measuring itself) in NVFlare's simulator: (rounds, wall seconds)."""
    from fedmed.flare.fedjob import build_job
    from fedmed.flare.probes import RoundProbes
    from fedmed.job.jobconfig import JobConfig

    probe = work / f"{name}.probe.jsonl"
    probe.unlink(missing_ok=True)
    config = JobConfig(
        name=name,
        task="chest_xray14",
        sites=tuple(sites),
        num_rounds=rounds,
        image_size=image_size,
        batch_size=4,
        db_url=f"sqlite:///{work / (name + '.db')}",
        straggler_wait=60,
    )
    job = build_job(
        config,
        data_root=data_root.resolve(),
        server_components={"probes": RoundProbes(probe_file=str(probe.resolve()))},
    )
    return run_probed(job, sites, work / "workspace", threads, probe, work / f"{name}.log")


# -- the document ---------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sites", type=int, nargs="+", default=[10, 25, 50, 100], help="K values for the round engine")
    p.add_argument("--db", nargs="+", choices=DBS, default=list(DBS), help="databases the round is recorded in")
    p.add_argument("--rounds", type=int, default=2, help="engine rounds per K (fresh updates each)")
    p.add_argument("--profile", action="store_true", help="cProfile one more step + record at the largest K")
    p.add_argument("--skip-simulator", action="store_true", help="only the round engine (part 1)")
    p.add_argument("--sim-sites", type=int, default=20, help="hospitals of the end-to-end simulator run")
    p.add_argument("--sim-rounds", type=int, default=2)
    p.add_argument("--long-rounds", type=int, default=50, help="rounds of the small job whose server RSS is sampled")
    p.add_argument("--long-sites", type=int, default=3)
    p.add_argument("--per-site", type=int, default=6, help="images per simulated hospital")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=2, help="simulated sites trained at once")
    p.add_argument("--work", type=Path, help="where data, databases and simulator workspaces go (default: a temp dir)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--thread-repeats", type=int, default=2, help="steps per thread setting at the largest K (0: skip)")
    p.add_argument("--burn", type=int, default=0, help="CPU-spinning processes beside the thread-setting comparison")
    p.add_argument("--quick", action="store_true", help="tiny run for the test: --sites 3 5, 1 round, 2x2 simulated")
    p.add_argument("--out", type=Path, default=Path("docs/bench_scale.md"))
    a = p.parse_args(argv)
    if a.quick:  # part 1 on a slice of the model's state, part 3 tiny, part 2 left out
        a.sites, a.rounds, a.sim_sites, a.long_sites, a.long_rounds = [3, 5], 1, 0, 2, 3
        a.per_site = min(a.per_site, 5)
    if a.thread_repeats < 0 or a.burn < 0:
        p.error("--thread-repeats and --burn must be >= 0")
    if min(a.sites) < 2 or a.rounds < 1 or a.sim_sites == 1 or a.long_rounds == 1 or a.per_site < 4:
        p.error("--sites must be >= 2, --rounds >= 1, --sim-sites and --long-rounds 0 (skip) or >= 2, --per-site >= 4")
    load_start = load_average()
    t0 = time.time()
    tmp = tempfile.TemporaryDirectory(prefix="bench_scale-")
    work = (a.work or Path(tmp.name)).resolve()
    work.mkdir(parents=True, exist_ok=True)
    base = state_to_numpy(build_densenet121(14))
    if a.quick:
        base = {k: v for k, v in base.items() if k.startswith(QUICK_SLICE)}
    n_values = sum(v.size for v in base.values())
    state_bytes = sum(v.nbytes for v in base.values())
    dbs = Databases(a.db, work)
    rows, profile_text = [], ""
    try:
        for k in tqdm(sorted(a.sites), desc="sites (round engine)"):
            got, prof = engine_rounds(base, k, a.rounds, a.seed, dbs, list(a.db), a.profile and k == max(a.sites))
            rows += got
            profile_text = prof or profile_text
    finally:
        dbs.close()
    # Part 1 written now, so a run cut later (memory, a timeout) still leaves its figures.
    write_document(
        a, argv, ScaleRun(rows, profile_text, None, None, n_values, state_bytes, load_start, time.time() - t0)
    )
    threads = engine_thread_modes(base, max(a.sites), a.seed, a.thread_repeats, a.burn) if a.thread_repeats else None
    sim = long = None
    if not a.skip_simulator and (a.sim_sites or a.long_rounds):
        data = work / "hospitals"
        names = make_small_hospitals(data, max(a.sim_sites, a.long_sites), a.per_site, a.seed, 64)
        if a.sim_sites:
            sim = simulate(data, names[: a.sim_sites], a.sim_rounds, work, "bench_scale_many", a.image_size, a.threads)
            tqdm.write(f"{a.sim_sites} simulated hospitals: {sim[1]:.0f} s")
        if a.long_rounds:
            long = simulate(
                data, names[: a.long_sites], a.long_rounds, work, "bench_scale_long", a.image_size, a.threads
            )
            tqdm.write(f"{a.long_rounds} rounds: {long[1]:.0f} s")

    measured = ScaleRun(rows, profile_text, sim, long, n_values, state_bytes, load_start, time.time() - t0)
    lines = write_document(a, argv, measured)
    if threads is not None:
        kept = kept_sections(a.out)
        lines += thread_lines(a, threads)
        a.out.write_text("\n".join(lines) + "\n" + kept)
    plot(rows, a.out.with_suffix(".png"), list(a.db))
    print("\n".join(lines))
    tmp.cleanup()
    return 0


def phase_lines(rows) -> list:
    """Markdown: the per-phase CPU of the last round of each K (EngineRow.phases)."""
    timed = [r for r in rows if r.phases]
    if not timed:
        return []
    lines = [
        "",
        "Per phase, one more step of the last round of each K (a fresh engine, the same updates; "
        "`fedmed.cli.bench_scale.timed_phases`): process CPU s, all threads (the step's own thread's CPU s):",
        "",
        "| phase | " + " | ".join(f"{r.sites} sites" for r in timed) + " |",
        "|---" * (1 + len(timed)) + "|",
    ]
    labels = [label for label, _, _ in phase_points()]
    for label in labels:
        if any(label in r.phases for r in timed):
            cells = [r.phases.get(label) for r in timed]
            lines.append(
                f"| {label} | " + " | ".join("-" if c is None else f"{c[0]:.2f} ({c[1]:.2f})" for c in cells) + " |"
            )
    rest = [r.phases["step"][0] - sum(v[0] for k, v in r.phases.items() if k != "step") for r in timed]
    lines.append(
        "| the rest (scoring, trust, records, thread start-up) | " + " | ".join(f"{x:.2f}" for x in rest) + " |"
    )
    lines.append(
        "| **step** | " + " | ".join(f"**{r.phases['step'][0]:.2f}** ({r.phases['step'][1]:.2f})" for r in timed) + " |"
    )
    return lines


def last_rounds(rows) -> dict:
    """K -> the row of its last round (steady state: trust and replay history already there)."""
    out = {}
    for r in rows:
        out[r.sites] = r
    return out


@dataclass(frozen=True)
class ScaleRun:
    """What one bench_scale run measured: the round engine's rows, the optional profile, the simulator runs
    ((rounds, wall s) or None), the update's size, the load average at the start and the run's seconds."""

    rows: list
    profile_text: str
    sim: Optional[tuple]
    long: Optional[tuple]
    n_values: int
    state_bytes: int
    load_start: str
    seconds: float


def write_document(a, argv, measured: ScaleRun) -> list:
    rows, profile_text, sim, long = measured.rows, measured.profile_text, measured.sim, measured.long
    n_values, state_bytes, load_start, seconds = (
        measured.n_values,
        measured.state_bytes,
        measured.load_start,
        measured.seconds,
    )
    mb = 2**20
    kinds = list(a.db)
    last = last_rounds(rows)
    ks = sorted(last)
    lines = [
        "# bench_scale",
        "",
        f"Command: `{command('scripts/bench_scale.py', argv)}` ({seconds:.0f} s). Environment: {environment()}. "
        f"Load average at the start: {load_start}; at the end: {load_average()} (the machine is shared: wall "
        "times are inflated by the other jobs; CPU seconds are steadier).",
        "",
        "## 1. Round engine: screening + geometric median + trust + database write",
        "",
        f"K sites' DenseNet-121 updates ({n_values:,} values, {state_bytes / mb:.1f} MB each"
        + (", --quick: a slice of the model's state" if a.quick else "")
        + ") through "
        "`RoundEngine.step` (the Controller's call), then `Repository.record_round`. "
        f"{a.rounds} round(s) per K; the table shows each round. Peak memory: `traced` = tracemalloc peak of the "
        "allocations made during step + record (a separate pass), as a multiple of the K updates held; "
        "`server peak` = (updates held + traced) / updates held (target <= 2x); `RSS` = the process's peak "
        "resident memory during the timed step + record (VmHWM reset just before; it includes the updates, "
        "torch and the interpreter).",
        "",
        "| sites | round | step s (CPU s) | "
        + " | ".join(f"record {k} s | step + record {k} s" for k in kinds)
        + " | updates MB | traced peak | server peak | RSS before / peak MB | Weiszfeld iterations |",
        "|---" * (8 + 2 * len(kinds)) + "|",
    ]
    for r in rows:
        lines.append(
            f"| {r.sites} | {r.round} | {r.step_s:.2f} ({r.step_cpu_s:.2f}) | "
            + " | ".join(f"{r.record_s[k]:.2f} | **{r.step_s + r.record_s[k]:.2f}**" for k in kinds)
            + f" | {r.updates_bytes / mb:.0f} | {r.traced_peak / r.updates_bytes:.2f}x | "
            f"**{(r.updates_bytes + r.traced_peak) / r.updates_bytes:.2f}x** | "
            f"{r.rss_before / mb:.0f} / {r.rss_peak / mb:.0f} | {r.iterations} |"
        )
    lines.append("")
    if len(ks) >= 2:
        for kind in kinds:
            b0, b1, r2 = linear_fit(ks, [last[k].step_s + last[k].record_s[kind] for k in ks])
            lines.append(
                f"- Linear in sites ({kind}, last round of each K): step + record = {b0:.2f} s + {b1 * 1000:.0f} ms "
                f"x sites, R^2 = {r2:.3f}."
            )
        c0, c1, cr2 = linear_fit(ks, [last[k].step_cpu_s for k in ks])
        lines.append(f"- Step CPU: {c0:.2f} s + {c1 * 1000:.0f} ms x sites, R^2 = {cr2:.3f}.")
    for k, target in TARGETS.items():
        if k not in last:
            continue
        r = last[k]
        worst = max(r.step_s + r.record_s[kind] for kind in kinds)
        lines.append(
            f"- **At {k} sites: {worst:.2f} s** for step + record on the slower database, {r.step_cpu_s:.2f} s of "
            f"step CPU (target <= {target:g} s on 2 cores, issue 30: {'met' if worst <= target else 'missed'}); "
            f"server peak {(r.updates_bytes + r.traced_peak) / r.updates_bytes:.2f}x "
            f"the updates held (target <= 2x: {'met' if r.traced_peak <= r.updates_bytes else 'missed'})."
        )
    lines.append(f"- Plot: [{a.out.with_suffix('.png').name}]({a.out.with_suffix('.png').name}) (time vs sites).")
    lines += phase_lines(rows)
    if profile_text:
        lines += [
            "",
            f"cProfile of one more step + record (SQLite) at {max(ks)} sites, top functions by own time:",
            "",
            "```",
            *[x.rstrip() for x in profile_text.strip().splitlines() if x.strip()][:24],
            "```",
        ]
    if sim is not None:
        rounds, wall = sim
        lines += [
            "",
            f"## 2. Simulator: {a.sim_sites} hospitals end to end",
            "",
            f"One fedmed job (geometric median, trust, SQLite record) of {a.sim_sites} synthetic hospitals "
            f"({a.per_site} images each, {a.image_size} px, batch 4), {a.sim_rounds} round(s), in NVFlare's "
            f"simulator with {a.threads} site(s) trained at once: **{wall:.0f} s** for the whole simulation "
            "(start-up, rounds, final model to every site).",
            "",
            "| round | wall s | waiting for sites s | server's own work s | of which step / save / record s | "
            "server CPU s | server RSS MB | server peak RSS MB |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in rounds:
            ph = r.phases
            cpu = "-" if r.cpu != r.cpu else f"{r.cpu:.1f}"
            lines.append(
                f"| {r.round} | {r.wall:.1f} | {r.wait:.1f} | {r.server_work:.2f} | "
                f"{ph['step']:.2f} / {ph['save']:.2f} / {ph['record']:.2f} | {cpu} | {r.rss / mb:.0f} | "
                f"{r.hwm / mb:.0f} |"
            )
    if long is not None:
        rounds, wall = long
        rss = np.array([r.rss for r in rounds], float) / mb
        xs = np.array([r.round for r in rounds], float)
        slope_all = float(np.polyfit(xs, rss, 1)[0])
        later = xs > min(10, len(xs) // 2)
        slope_late = float(np.polyfit(xs[later], rss[later], 1)[0]) if later.sum() >= 2 else float("nan")
        lines += [
            "",
            f"## 3. Simulator: {a.long_rounds} rounds, server memory",
            "",
            f"One fedmed job of {a.long_sites} hospitals ({a.per_site} images, {a.image_size} px), "
            f"{a.long_rounds} rounds ({wall:.0f} s; median round {median([r.wall for r in rounds]):.1f} s). The "
            "server process's resident memory at the end of every round (VmRSS), "
            + (
                "with the Controller's end-of-round heap trim turned off (FEDMED_TRIM_HEAP=0)"
                if os.environ.get(ENV_TRIM_HEAP, "").strip() == "0"
                else "after the Controller's end-of-round heap trim (fedmed.server.heap: a garbage collection, then "
                "glibc's malloc_trim)"
            )
            + ":",
            "",
            f"- first round {rss[0]:.0f} MB, last {rss[-1]:.0f} MB, min {rss.min():.0f}, max {rss.max():.0f} MB; "
            f"peak resident {rounds[-1].hwm / mb:.0f} MB.",
            f"- **slope {slope_all:+.2f} MB per round** over all rounds; {slope_late:+.2f} MB per round after "
            f"round {int(min(10, len(xs) // 2))} (what is left once caches and pools are warm).",
            f"- per round (MB): {', '.join(f'{v:.0f}' for v in rss)}",
        ]
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text("\n".join(lines) + "\n" + kept_sections(a.out))
    return lines


def kept_sections(path: Path) -> str:
    """The hand-written part of an existing document (from KEEP_MARKER on), to write back after the generated one."""
    if not path.exists():
        return ""
    text = path.read_text()
    at = text.find(KEEP_MARKER)
    return "" if at < 0 else "\n" + text[at:]


def thread_lines(a, threads) -> list:
    times, start, end = threads
    return [
        "",
        f"## Thread settings: one step of {max(a.sites)} sites, {a.burn} CPU burner(s) beside it",
        "",
        f"Load average when the timing started: {start}; at its end: {end}. The settings are interleaved in one "
        "process (fedmed.cli.bench_threads); compare ratios, not seconds. `default` = fedmed.server.parallel's choice "
        "(server threads x BLAS threads <= cores); `one-thread` = BLAS limited to one thread (what "
        "OMP_NUM_THREADS=1 gave); `oversubscribed` = every server thread with a full BLAS pool (before issue 30).",
        "",
        *MODES_HEADER,
        *modes_table(times, f"step, {max(a.sites)} sites"),
    ]


def plot(rows, path: Path, kinds) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    last = last_rounds(rows)
    ks = sorted(last)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(ks, [last[k].step_s for k in ks], "o-", label="RoundEngine.step")
    for kind in kinds:
        ax.plot(ks, [last[k].step_s + last[k].record_s[kind] for k in ks], "s--", label=f"step + record ({kind})")
    if len(ks) >= 2:
        b0, b1, _ = linear_fit(ks, [last[k].step_s for k in ks])
        xs = np.linspace(0, max(ks), 50)
        ax.plot(xs, b0 + b1 * xs, ":", color="grey", label="linear fit of step")
    ax.axhline(5.0, color="red", lw=0.8, label="target at 50 sites (5 s)")
    ax.set_xlabel("sites")
    ax.set_ylabel("seconds per round (server)")
    ax.set_title("Server round cost vs sites (DenseNet-121 updates)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
