"""Hospital IT's commands for one installed site kit, without NVFlare's interactive stop_fl.sh.

    fedmed-site check <kit>     the pre-flight check (same as install.sh --check): site config, labels, one image
    fedmed-site stop <kit>      stop the site (and its job processes) started by <kit>/start_fedmed.sh
(or `python scripts/site.py ...`, the same command)

stop: for a site started as a daemon (start_fedmed.sh, NVFlare's start.sh) it first leaves NVFlare's shutdown.fl
so the daemon does not restart it, then, like `fedmed-federation stop`, sends SIGTERM to the site's process and
every job process below it (found by parentage), SIGKILL after --grace seconds, and checks every PID is gone.
PIDs come from <kit>/fedmed_site.pid (start_fedmed.sh --once), <kit>/pid.fl and <kit>/daemon_pid.fl (NVFlare's).
Settings in <kit>/local/ are read when each job starts: editing them needs no restart (the next job uses them).
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from fedmed.cli.federation import _alive, _descendants, _signal, _wait_gone
from fedmed.cli.install_kit import SITE_PID_FILE, check_kit, kit_identity

PID_FILES = (SITE_PID_FILE, "pid.fl", "daemon_pid.fl")


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def stop_kit(kit: Path, grace: float = 20.0) -> list[int]:
    """Stop whatever this kit's start_fedmed.sh started; returns the PIDs stopped ([] if nothing ran)."""
    kit = Path(kit).resolve()
    kit_identity(kit)  # raises unless this is a startup kit
    roots = [pid for pid in (_read_pid(kit / name) for name in PID_FILES) if pid is not None and _alive(pid)]
    if not roots:
        for name in (SITE_PID_FILE,):
            (kit / name).unlink(missing_ok=True)
        return []
    daemon = _read_pid(kit / "daemon_pid.fl")
    if daemon is not None and _alive(daemon):
        (kit / "shutdown.fl").touch()  # NVFlare's daemon loop: do not restart, exit
    tree = list(dict.fromkeys(p for root in roots for p in (root, *_descendants(root))))
    for pid in tree:
        _signal(pid, signal.SIGTERM)
    if not all(_wait_gone(p, grace) for p in tree):
        for pid in tree:
            _signal(pid, signal.SIGKILL)
    alive = [p for p in tree if not _wait_gone(p, 10)]
    if alive:
        raise RuntimeError(f"process(es) {alive} of {kit} did not exit")
    for name in (SITE_PID_FILE, "pid.fl", "daemon_pid.fl", "shutdown.fl"):
        (kit / name).unlink(missing_ok=True)
    return tree


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("check", "stop"):
        s = sub.add_parser(name)
        s.add_argument("kit", type=Path, help="the site's startup kit folder (holds startup/ and local/)")
        if name == "stop":
            s.add_argument("--grace", type=float, default=20.0, help="seconds before SIGKILL")
    a = p.parse_args(argv)
    try:
        if a.cmd == "check":
            for line in check_kit(a.kit):
                print(line)
        else:
            stopped = stop_kit(a.kit, a.grace)
            print(
                f"stopped {a.kit.resolve().name}: processes {stopped}"
                if stopped
                else f"{a.kit.resolve().name}: nothing was running (no live PID in {', '.join(PID_FILES)})"
            )
    except (ValueError, FileNotFoundError, OSError, RuntimeError) as e:
        print(f"fedmed-site {a.cmd}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
