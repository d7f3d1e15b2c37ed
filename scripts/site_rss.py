#!/usr/bin/env python
"""The simulated sites' resident memory per round, measured from outside their processes.

    python scripts/site_rss.py sample WORK OUT.jsonl STOP_FILE      # every 2 s until STOP_FILE exists
    python scripts/site_rss.py per-round WORK OUT.jsonl              # each site's RSS when each round ended

`sample` records VmRSS of every NVFlare simulator_worker process whose command line contains WORK (the --work
folder of a bench_scale run), with the wall clock. `per-round` takes, for each round in WORK's server probe
(bench_scale_long.probe.jsonl, written by fedmed.flare.probes with the monotonic clock), each site's last sample
before the round ended, and fits a line through them (all rounds, and after round 10). Used for
docs/bench_scale.md's site memory figures, beside a bench_scale long run:

    python scripts/bench_scale.py --sites 2 3 --rounds 1 --db sqlite --sim-sites 0 --long-sites 2 \\
        --long-rounds 20 --thread-repeats 0 --work WORK
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

WORKER = b"nvflare.private.fed.app.simulator.simulator_worker"


def sample(work: str, out: Path, stop: Path) -> None:
    with out.open("a") as f:
        while not stop.exists():
            for pid in filter(str.isdigit, os.listdir("/proc")):
                try:
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                    if WORKER not in cmd or not any(work.encode() in c for c in cmd):
                        continue
                    client = cmd[cmd.index(b"--client") + 1].decode()
                    status = Path(f"/proc/{pid}/status").read_text().splitlines()
                    rss_kb = next(int(line.split()[1]) for line in status if line.startswith("VmRSS"))
                except (OSError, ValueError, StopIteration):
                    continue  # the process ended while being read
                f.write(json.dumps({"t": time.time(), "pid": int(pid), "client": client, "rss_kb": rss_kb}) + "\n")
            f.flush()
            time.sleep(2)


def per_round(work: Path, samples: Path) -> list[str]:
    offset = time.time() - time.monotonic()  # the probe's monotonic clock -> the samples' wall clock
    ends = [json.loads(line)["t_end"] + offset for line in (work / "bench_scale_long.probe.jsonl").open()]
    rows = [json.loads(line) for line in samples.open()]
    lines = []
    for client in sorted({r["client"] for r in rows}):
        mine = [r for r in rows if r["client"] == client]
        t = np.array([r["t"] for r in mine])
        mb = np.array([r["rss_kb"] for r in mine]) / 1024
        at = np.array([mb[max(0, np.searchsorted(t, e) - 1)] for e in ends])
        x = np.arange(1, len(at) + 1)
        late = x > 10
        slope_late = np.polyfit(x[late], at[late], 1)[0] if late.sum() >= 2 else float("nan")
        lines.append(
            f"{client}: {at[0]:.0f} -> {at[-1]:.0f} MB, {np.polyfit(x, at, 1)[0]:+.2f} MB per round over all "
            f"rounds, {slope_late:+.2f} after round 10; per round: {', '.join(f'{v:.0f}' for v in at)}"
        )
    return lines


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) == 4 and args[0] == "sample":
        sample(args[1], Path(args[2]), Path(args[3]))
        return 0
    if len(args) == 3 and args[0] == "per-round":
        print("\n".join(per_round(Path(args[1]), Path(args[2]))))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
