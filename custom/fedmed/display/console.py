"""A concise live view of a simulated run: one line per round per site, one per round for the server, warnings
(without NVFlare's routine ones) and errors, while the full output (NVFlare's and Alembic's logs of every process) goes to a file.

NVFlare's simulator starts the server and the sites as processes that inherit this process's stdout and stderr, and
configures its own logging in each, so no logging filter can reach them: the file descriptors themselves are
redirected into a pipe, and one thread copies every line to the log file and the few that matter to the console.
Pure (no NVFlare import).
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import threading
from pathlib import Path
from typing import Callable, Iterator, Optional, TextIO

# What the Executor and the Controller log (fedmed.flare.executor / controller); the message follows NVFlare's
# "<time> - <logger> - <level> - <fl_ctx> - " prefix.
SITE_ROUND = re.compile(r"site (?P<site>\S+) round (?P<round>\d+): (?P<rest>val loss .*)$")
SERVER_ROUND = re.compile(r"(?P<line>round \d+/\d+ done in .*)$")
CROSS_SITE = re.compile(r"(?P<line>cross-site evaluation done .*)$")
RUN_END = re.compile(r"(?P<line>run [0-9a-f]{32} (finished|failed|aborted); .*)$")
# The simulator's console prints "<time> - <level> - <message>" (no logger name); a kit's log adds the logger name and
# the FL context.
LEVEL = re.compile(
    r" - (?:(?P<name>[\w.]+) - )?(?P<level>WARNING|ERROR|CRITICAL) - (?:\[[^\]]*\](?::| -) )?(?P<msg>.*)$"
)
# NVFlare's own warnings that say nothing to a user: broadcast_model logs this whenever more sites answer than the
# round's minimum, i.e. every round in which the straggler wait works as meant.
NVFLARE_NOISE = re.compile(
    r"^Number of results \(\d+\) is different from number of expected responses"
    # ... and NVFlare repeating, after fedmed's own "run <uid> failed: <why>", that the controller raised
    r"|^Traceback \(most recent call last\):$|^Exception in model controller run: |^Aborting current RUN due to "
)
# A site that cannot take part, or refuses the job, says so (the Executor), and the server says it again each round
# (fedmed.server.rounds): the console shows each reason once.
CANNOT_TAKE_PART = re.compile(
    r"(?:cannot take part(?: in this job)?: set-up failed(?: at the site)?|refuses this job|refused the round): "
    r"(?P<why>.*?)(?:; fix it|$)"
)


def concise(line: str) -> Optional[str]:
    """The console form of one line of the full output, or None for a line that only goes to the log file."""
    line = line.rstrip("\n")
    m = SITE_ROUND.search(line)
    if m:
        return f"  round {m['round']}  {m['site']:<14} {m['rest']}"
    m = SERVER_ROUND.search(line) or CROSS_SITE.search(line) or RUN_END.search(line)
    if m:
        return m["line"]
    m = LEVEL.search(line)
    if m and not NVFLARE_NOISE.search(m["msg"]):
        return f"  {m['level']}" + (f" {m['name']}" if m["name"] else "") + f": {m['msg']}"
    return None


class ConciseView:
    """concise(), and a reason a site cannot take part (or refuses) shown once, however many sites and rounds repeat
    it."""

    def __init__(self):
        self._shown: set = set()

    def __call__(self, line: str) -> Optional[str]:
        shown = concise(line)
        m = CANNOT_TAKE_PART.search(shown or "")
        if m:
            if m["why"] in self._shown:
                return None
            self._shown.add(m["why"])
        return shown


@contextlib.contextmanager
def full_output_to(
    log_file: Path, show: Optional[Callable[[str], Optional[str]]] = None, console: Optional[TextIO] = None
) -> Iterator[Path]:
    """Within the block, everything written to stdout and stderr, by this process and the processes it starts, is
    appended to `log_file`; the lines `show` keeps are printed to `console` (the real stdout) as they come."""
    show = ConciseView() if show is None else show
    log_file = Path(log_file)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    console_fd = os.dup(1 if console is None else console.fileno())
    saved = (os.dup(1), os.dup(2))
    read_fd, write_fd = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()

    def copy() -> None:
        with (
            open(read_fd, "r", encoding="utf-8", errors="replace", closefd=True) as pipe,
            open(log_file, "a", encoding="utf-8") as log,
        ):
            for line in pipe:
                log.write(line)
                log.flush()
                shown = show(line)
                if shown is not None:
                    os.write(console_fd, (shown + "\n").encode("utf-8", "replace"))

    reader = threading.Thread(target=copy, name="fedmed-console", daemon=True)
    reader.start()
    os.dup2(write_fd, 1)
    os.dup2(write_fd, 2)
    os.close(write_fd)
    try:
        yield log_file
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        # The pipe ends when every writer has closed it: ours now, the simulator's processes when they exit.
        reader.join(timeout=30)
        if not reader.is_alive():  # else a process still holds the pipe: leave the thread its console
            os.close(console_fd)
