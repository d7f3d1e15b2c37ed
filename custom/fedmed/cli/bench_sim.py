"""What the server-side benchmarks share (fedmed.cli.bench_overhead, fedmed.cli.bench_scale): small generated
hospitals, a job run in NVFlare's simulator with a self-measuring server workflow (fedmed.flare.probes), the rounds
it measured, and the lines every document starts with (command, environment, load average)."""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from fedmed.cli.generate_hospitals import write_site_config
from fedmed.data.synthetic import DEFAULT_HOSPITALS, generate_hospitals


def make_small_hospitals(root: Path, n_sites: int, per_site: int, seed: int = 0, size: int = 64) -> list[str]:
    """n_sites synthetic hospitals (site-00, site-01, ...; the three default scanners in turn) of per_site images
    each, stored at `size` px, with their fedmed_site.json (one torch thread each) and a small global test set;
    generated once into root."""
    names = [f"site-{i:02d}" for i in range(n_sites)]
    if not (root / "global_test" / "labels.csv").exists():
        specs = [replace(DEFAULT_HOSPITALS[i % 3], name=n, num_images=per_site) for i, n in enumerate(names)]
        generate_hospitals(root, specs, num_test=8, seed=seed, size=size)
    for n in names:
        write_site_config(root / n, n, 1)
    return names


@dataclass(frozen=True)
class ProbedRound:
    """One round as the server measured it (fedmed.flare.probes): wall and server-process CPU seconds since the
    previous round ended (round 1: since its task went out), seconds waiting for the sites' results, fedmed's
    phases, and the server's resident / peak resident memory at its end (bytes)."""

    round: int
    wall: float
    cpu: float
    wait: float
    phases: dict
    rss: int
    hwm: int

    @property
    def server_work(self) -> float:
        """Wall seconds the workflow spent on its own work (not waiting for the sites' results)."""
        return self.wall - self.wait


def read_probe(path: Path) -> list[ProbedRound]:
    lines = [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]
    rounds = []
    for i, x in enumerate(lines):
        prev = lines[i - 1] if i else None
        start = prev["t_end"] if prev else x["t_send"]
        cpu_start = prev["cpu"] if prev else None
        rounds.append(
            ProbedRound(
                x["round"],
                x["t_end"] - start,
                x["cpu"] - cpu_start if cpu_start is not None else float("nan"),
                x.get("t_results", x["t_end"]) - x["t_send"],
                x["phases"],
                x["rss"],
                x["hwm"],
            )
        )
    return rounds


def run_probed(job, sites, workspace: Path, threads: int, probe_file: Path, log_file: Path) -> tuple[list, float]:
    """Run the job (its server workflow writes probe_file) in NVFlare's simulator, the whole output in log_file.
    Returns (the measured rounds, wall seconds of the whole simulation)."""
    from fedmed.flare.fedjob import run_simulation

    t = time.monotonic()
    try:
        run_simulation(job, sites, workspace, threads, log_file=log_file)
    except Exception as e:
        raise RuntimeError(f"simulation of {job.name} failed ({e}); its full log: {log_file}") from e
    seconds = time.monotonic() - t
    if not probe_file.is_file():
        raise RuntimeError(f"simulation of {job.name} measured no round; its full log: {log_file}")
    return read_probe(probe_file), seconds


def memory_now() -> tuple[int, int]:
    """(resident, peak resident) bytes of this process, from /proc/self/status (Linux)."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024
    return fields.get("VmRSS", 0), fields.get("VmHWM", 0)


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f}, {five:.2f}, {fifteen:.2f} (1, 5, 15 min)"


def environment() -> str:
    import nvflare
    import torch

    return (
        f"{os.cpu_count()} CPU cores, Python {platform.python_version()}, NVFlare {nvflare.__version__}, "
        f"torch {torch.__version__}, numpy {__import__('numpy').__version__}, OMP_NUM_THREADS="
        f"{os.environ.get('OMP_NUM_THREADS', 'unset')}"
    )


def command(script: str, argv) -> str:
    """The command line that reproduces the run, with the environment settings that change what it measures."""
    args = sys.argv[1:] if argv is None else list(argv)
    env = [f"{k}={os.environ[k]}" for k in ("FEDMED_SERVER_THREADS", "FEDMED_TRIM_HEAP") if os.environ.get(k)]
    return " ".join([*env, "python", script, *(shlex.quote(str(a)) for a in args)])


def median(values) -> float:
    values = sorted(values)
    if not values:
        return float("nan")
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2
