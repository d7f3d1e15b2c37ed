"""Where an FL admin command's seconds go, before and after fedmed.cli.admin_session and the 0.5 s poll, measured
in the same run on a loopback federation (docs/bench_admin.md).

    python scripts/bench_admin.py [--workspace W] [--repeats 3] [--out docs/bench_admin.md]

Without --workspace it generates three tiny synthetic hospitals, provisions a federation on 127.0.0.1 (a free port)
under runs/bench_admin/, starts it, and stops every process it started by PID at the end. With --workspace (a
running fedmed-federation) it uses that one and stops nothing.

Each command runs as the admin runs it, in a fresh Python process, `repeats` times, alternating before and after:
- `status`: `fedmed-federation status`'s admin part (a session, get_system_info, close);
- `abort`: `fedmed-submit --abort PREFIX` on a running job (a session, list_jobs by prefix, abort_job, get_job_meta,
  close); a fresh job is submitted and seen RUNNING before each;
- the child process reports its own phases (imports, session login, the commands, close) and the parent the whole
  process's wall time.
"before" is NVFlare's own new_secure_session (what fedmed used), "after" fedmed.cli.admin_session.
`submit`'s wait: how long after the job's end fedmed-submit's poll sees it (a second session polling every 50 ms
marks the end), for the old 2 s poll interval and the new 0.5 s, on jobs that end at once (a scope no hospital
lists). The job export (`job.py --export-job`, torch and MONAI imports) is timed once.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from fedmed.paths import CHECKOUT as REPO
from fedmed.paths import RUNS

MODES = ("before", "after")

# Runs in a fresh process: the admin command, its phases timed (seconds) and printed as one JSON line.
CHILD = r"""
import json, sys, time
t0 = time.monotonic()
import fedmed.cli.submit_job as sj
from nvflare.fuel.flare_api.flare_api import new_secure_session
from fedmed.cli.admin_session import new_admin_session
kit, user, mode, what, prefix = sys.argv[1:6]
t1 = time.monotonic()
if what == "settings":  # what fedmed-submit reads from the exported job in its own process, after the export
    from pathlib import Path
    if mode == "before":  # it read the settings through JobConfig (torch, MONAI)
        from fedmed.job.jobconfig import JobConfig  # noqa: F401
    sj.exported_num_rounds(Path(prefix))
    t2 = time.monotonic()
    print("PHASES " + json.dumps({"imports": t1 - t0, "read settings": t2 - t1}))
    sys.exit(0)
s = new_secure_session(user, kit, timeout=30) if mode == "before" else new_admin_session(kit, user, 30)
t2 = time.monotonic()
if what == "status":
    s.get_system_info()
else:
    job_id = sj.resolve_job_id(s, prefix)
    s.abort_job(job_id)
    s.get_job_meta(job_id)
t3 = time.monotonic()
s.close()
t4 = time.monotonic()
print("PHASES " + json.dumps({"imports": t1 - t0, "login": t2 - t1, "commands": t3 - t2, "close": t4 - t3}))
"""


def _child(kit: Path, user: str, mode: str, what: str, prefix: str = "-") -> dict:
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(kit), user, mode, what, prefix],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,  # where the admin runs it: NVFlare's unconfigured config search walks this folder
    )
    wall = time.monotonic() - t0
    line = next((x for x in proc.stdout.splitlines() if x.startswith("PHASES ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"{mode} {what} failed: {proc.stderr.strip()[-500:]}")
    return {**json.loads(line[len("PHASES ") :]), "process": wall}


def _wait_status(session, job_id: str, done, timeout: float = 300.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = str(session.get_job_meta(job_id).get("status"))
        if done(status):
            return status
        time.sleep(0.05)
    raise TimeoutError(f"job {job_id} not as expected within {timeout:.0f}s")


def measure_abort(kit: Path, user: str, job: Path, mode: str) -> dict:
    """A fresh job, seen RUNNING, then aborted by the admin command in a new process."""
    from fedmed.cli.admin_session import new_admin_session

    s = new_admin_session(kit, user)
    try:
        job_id = s.submit_job(str(job))
        _wait_status(s, job_id, lambda st: st == "RUNNING" or st.startswith("FINISHED"))
        phases = _child(kit, user, mode, "abort", job_id[:8])
        _wait_status(s, job_id, lambda st: st.startswith("FINISHED"))
        return phases
    finally:
        s.close()


def measure_poll_lag(kit: Path, user: str, job: Path, interval: float) -> float:
    """Seconds between a job's end (seen by a 50 ms poll on a session of its own) and fedmed-submit's poll seeing
    it, at `interval`."""
    from fedmed.cli.admin_session import new_admin_session
    from fedmed.cli.submit_job import Polling, RoundFollower, Submission, _wait

    watcher, follower_session = new_admin_session(kit, user), new_admin_session(kit, user)
    try:
        job_id = follower_session.submit_job(str(job))
        ended = {}

        def watch():
            _wait_status(watcher, job_id, lambda st: st.startswith("FINISHED"))
            ended["t"] = time.monotonic()

        thread = threading.Thread(target=watch)
        thread.start()
        follower = RoundFollower(None, None)
        _wait(follower_session, follower, job_id, Submission(kit, user, job, 300, polling=Polling(interval)))
        seen = time.monotonic()
        thread.join()
        return seen - ended["t"]
    finally:
        watcher.close()
        follower_session.close()


def export(dest: Path, extra: list[str]) -> tuple[Path, float]:
    from fedmed.cli.submit_job import export_job

    t0 = time.monotonic()
    folder = export_job(dest, ["--rounds", "50", "--image-size", "64", "--batch-size", "4", *extra])
    return folder, time.monotonic() - t0


def measure_settings(job: Path, mode: str) -> dict:
    """Reading the exported job's rounds in a fresh process: before, importing JobConfig (torch, MONAI) as
    fedmed-submit did; after, the exported Controller's `job` argument alone (every setting, as JSON)."""
    return _child(job.parent, "-", mode, "settings", str(job))


def _median(values: list) -> float:
    return statistics.median(values)


def _ratio(before: float, after: float) -> str:
    return f"{before / after:.1f}x" if after >= 0.01 else "(after under 0.01 s)"


def table(results: dict) -> list[str]:
    """Markdown rows: each command's phases, median before and after, and the ratio."""
    rows = ["| command | phase | before (s) | after (s) | before / after |", "|---|---|---|---|---|"]
    for what in ("status", "abort"):
        for phase in ("imports", "login", "commands", "close", "process"):
            b = _median([r[phase] for r in results[what]["before"]])
            a = _median([r[phase] for r in results[what]["after"]])
            ratio = _ratio(b, a)
            name = "whole process (wall)" if phase == "process" else phase
            rows.append(f"| {what} | {name} | {b:.2f} | {a:.2f} | {ratio} |")
    for phase in ("imports", "read settings", "process"):
        b = _median([r[phase] for r in results["settings"]["before"]])
        a = _median([r[phase] for r in results["settings"]["after"]])
        name = "whole process (wall)" if phase == "process" else phase
        rows.append(
            f"| submit: the exported job's rounds, read in the admin's process | {name} | {b:.2f} | {a:.2f} | "
            f"{_ratio(b, a)} |"
        )
    lag_b, lag_a = _median(results["poll_lag"]["before"]), _median(results["poll_lag"]["after"])
    rows.append(
        f"| submit | end of job seen after (poll 2 s / 0.5 s) | {lag_b:.2f} | {lag_a:.2f} | {_ratio(lag_b, lag_a)} |"
    )
    return rows


def _start_own(root: Path, port: int | None):
    from dataclasses import replace

    from fedmed.cli.federation import Federation
    from fedmed.data.synthetic import DEFAULT_HOSPITALS, generate_hospitals

    data = root / "data"
    if not (data / "global_test").exists():
        specs = [replace(h, num_images=n) for h, n in zip(DEFAULT_HOSPITALS, (16, 12, 14))]
        generate_hospitals(data, specs, num_test=16, seed=7, size=96)
    configs = root / "configs"
    for site in ("hospital-a", "hospital-b", "hospital-c"):
        (configs / site).mkdir(parents=True, exist_ok=True)
        cfg = {
            "site_name": site,
            "data": {
                "format": "dicom",
                "root": str(data / site / "dicom"),
                "labels_csv": str(data / site / "labels.csv"),
            },
            "resources": {"num_threads": 1},
            "synthetic_rehearsal": True,
        }
        (configs / site / "fedmed_site.json").write_text(json.dumps(cfg))
    fed = Federation(root / "federation")
    fed.provision(port=port or _free_port(), site_configs=configs, force=(root / "federation").exists())
    fed.start(env={"OMP_NUM_THREADS": "1"}, timeout=600)
    return fed


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_markdown(out: Path, results: dict, meta: dict) -> None:
    lines = [
        "# FL admin commands: where the seconds go (before / after)",
        "",
        f"Measured by `{meta['command']}` ({meta['when']}) on a loopback federation (server and three "
        f"tiny synthetic hospitals on 127.0.0.1, {meta['cpus']} CPUs shared with other work; load average "
        f"{meta['load']}). Medians of {meta['repeats']} runs each, before and after alternating in the same run.",
        "Each command is a fresh Python process run from the checkout, as the admin runs it; the child reports its "
        "phases, the parent the process's wall time.",
        "",
        "- **before**: NVFlare's `new_secure_session` as fedmed used it; `fedmed-submit` polled `get_job_meta` every "
        "2 s, and read the exported job's rounds and options through `JobConfig` in its own process (importing "
        "torch, MONAI and scikit-learn).",
        "- **after**: `fedmed.cli.admin_session.new_admin_session` (NVFlare's config search pointed at the admin "
        "kit instead of walking the current directory, and the login's first retry after 0.1 s instead of 1 s) and "
        "a 0.5 s poll with the same deadline; the exported Controller's `job` argument holds every setting, "
        "defaults included, so the admin's process reads JSON and imports no torch.",
        "",
        *table(results),
        "",
        f"The job export before a submit (`job.py --export-job`, a separate process importing torch and MONAI): "
        f"{meta['export_s']:.1f} s, the same before and after; it is most of a submit's time before the job runs.",
        "",
        "Where the login's time went (before): NVFlare builds its connection after searching for an optional "
        "`comm_config.json` a dozen times, each a walk of the current directory when nothing told it where to "
        f"look ({meta['cwd_entries']} entries under the checkout here: .venv, data/, runs/); and its first login "
        "challenge goes out before the new connection is up, fails, and is retried after a fixed 1 s. The commands "
        "themselves (get_system_info, list_jobs by prefix, abort_job, get_job_meta) take milliseconds on loopback.",
        "",
        "A poll sees the job's end somewhere between at once and one interval later: on average half the interval "
        f"(1 s before, 0.25 s after); {meta['repeats']} samples each here, so the lag's ratio is rough.",
        "",
        "What is left: the export (torch and MONAI imported by `jobs/cxr_densenet/job.py` through "
        "`fedmed.flare.fedjob`, to build a job folder that is JSON) and, under load, the login's own work (a TLS "
        "connection, NVFlare's cell and its threads, two signed messages), which is CPU-bound and grows with the "
        "machine's load.",
        "",
    ]
    out.write_text("\n".join(lines))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workspace", type=Path, help="a running fedmed-federation workspace (default: start one)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=REPO / "docs" / "bench_admin.md")
    a = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from fedmed.cli.federation import PROJECT_ADMIN, Federation

    own = a.workspace is None
    fed = _start_own(RUNS / "bench_admin", None) if own else Federation(a.workspace)
    try:
        kit, user = fed.kit(PROJECT_ADMIN), PROJECT_ADMIN
        with tempfile.TemporaryDirectory() as tmp:
            long_job, export_s = export(Path(tmp) / "long", ["--scope", "rehearsal", "--no-cross-site-eval"])
            refused_job, _ = export(Path(tmp) / "refused", ["--scope", "bench_no_such_scope"])
            results = {w: {m: [] for m in MODES} for w in ("status", "abort", "poll_lag", "settings")}
            for i in range(a.repeats):
                for mode in MODES if i % 2 == 0 else MODES[::-1]:
                    results["status"][mode].append(_child(kit, user, mode, "status"))
                    results["abort"][mode].append(measure_abort(kit, user, long_job, mode))
                    results["settings"][mode].append(measure_settings(long_job, mode))
                    interval = 2.0 if mode == "before" else 0.5
                    results["poll_lag"][mode].append(measure_poll_lag(kit, user, refused_job, interval))
                    print(f"repeat {i + 1} {mode}: done", flush=True)
        load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
        meta = {
            "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "cpus": os.cpu_count(),
            "load": load,
            "repeats": a.repeats,
            "command": " ".join(["python scripts/bench_admin.py", *(sys.argv[1:] if argv is None else argv)]),
            "export_s": export_s,
            "cwd_entries": sum(len(d) + len(f) for _, d, f in os.walk(REPO)),
        }
        write_markdown(a.out, results, meta)
        (a.out.with_suffix(".json")).write_text(json.dumps({"results": results, "meta": meta}, indent=1) + "\n")
        print("\n".join(table(results)))
        print(f"written: {a.out}")
    finally:
        if own:
            fed.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
