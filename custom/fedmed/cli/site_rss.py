"""The simulated sites' resident memory per round, measured from outside their processes.

    python scripts/site_rss.py sample WORK OUT.jsonl STOP_FILE [INTERVAL_S]   # every INTERVAL_S (default 2) s
    python scripts/site_rss.py per-round WORK OUT.jsonl                        # each site's RSS per round

`sample` records VmRSS of every NVFlare simulator_worker process whose command line contains WORK (the --work
folder of a bench_scale run), with the wall clock, until STOP_FILE exists. `per-round` takes, for each round in
WORK's server probe (bench_scale_long.probe.jsonl, written by fedmed.flare.probes with the monotonic clock), each
site's last sample while the server aggregated (between the round's last result arriving and the round's end: the
site has sent its result and released the round's memory, and waits for the next task), or, where no sample fell
in that window, its last sample before the round ended (said per site); then fits a line through them (all rounds,
and after round 10). A sample taken mid-training is the round's working set, not what the site keeps: sample at
0.25 s for windows of about a second. Used for docs/bench_scale.md's site memory figures, beside a bench_scale
long run:

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


def sample(work: str, out: Path, stop: Path, interval: float = 2.0) -> None:
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
            time.sleep(interval)


def per_round(work: Path, samples: Path) -> list[str]:
    offset = time.time() - time.monotonic()  # the probe's monotonic clock -> the samples' wall clock
    probes = [json.loads(line) for line in (work / "bench_scale_long.probe.jsonl").open()]
    windows = [(p["t_results"] + offset, p["t_end"] + offset) for p in probes]
    rows = [json.loads(line) for line in samples.open()]
    lines = []
    for client in sorted({r["client"] for r in rows}):
        mine = sorted((r for r in rows if r["client"] == client), key=lambda r: r["t"])
        t = np.array([r["t"] for r in mine])
        mb = np.array([r["rss_kb"] for r in mine]) / 1024
        at, fallback = [], 0
        for start, end in windows:
            last = np.searchsorted(t, end) - 1  # the last sample before the round ended
            if last < 0 or t[last] < start:
                fallback += 1  # none while the server aggregated
            at.append(mb[max(0, last)])
        at = np.array(at)
        x = np.arange(1, len(at) + 1)
        late = x > 10
        slope_late = np.polyfit(x[late], at[late], 1)[0] if late.sum() >= 2 else float("nan")
        lines.append(
            f"{client}: {at[0]:.0f} -> {at[-1]:.0f} MB, {np.polyfit(x, at, 1)[0]:+.2f} MB per round over all "
            f"rounds, {slope_late:+.2f} after round 10 ({len(at) - fallback} of {len(at)} rounds sampled while the "
            f"server aggregated); per round: {', '.join(f'{v:.0f}' for v in at)}"
        )
    return lines


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) in (4, 5) and args[0] == "sample":
        try:
            interval = float(args[4]) if len(args) == 5 else 2.0
        except ValueError:
            print(f"INTERVAL_S must be a number of seconds, got {args[4]!r}", file=sys.stderr)
            return 2
        if not interval > 0:
            print(f"INTERVAL_S must be > 0, got {interval}", file=sys.stderr)
            return 2
        sample(args[1], Path(args[2]), Path(args[3]), interval)
        return 0
    if len(args) == 3 and args[0] == "per-round":
        print("\n".join(per_round(Path(args[1]), Path(args[2]))))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
