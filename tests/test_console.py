"""fedmed.display.console: the simulator's concise live view and the log file that takes everything else."""

import subprocess
import sys

from fedmed.display.console import ConciseView, concise

# A kit's log line (the simulator's console drops the logger name and the FL context).
PREFIX = "2026-11-29 21:14:01,123 - {name} - {level} - [identity=hospital-a, run=simulate_job, peer=server] - "


def test_only_the_lines_a_user_wants_reach_the_console():
    site = (
        PREFIX.format(name="FedMedTrainer", level="INFO")
        + "site hospital-a round 2: val loss 0.6225 accuracy 0.6667 (13 samples, lr 1.00e-04, 3s)"
    )
    assert concise(site) == "  round 2  hospital-a     val loss 0.6225 accuracy 0.6667 (13 samples, lr 1.00e-04, 3s)"
    server = (
        PREFIX.format(name="FedMedController", level="INFO")
        + "round 2/5 done in 7s: 3/3 sites aggregated (fedavg), test accuracy 0.52; best 0.52 (round 2)"
    )
    assert (
        concise(server)
        == "round 2/5 done in 7s: 3/3 sites aggregated (fedavg), test accuracy 0.52; best 0.52 (round 2)"
    )
    warning = PREFIX.format(name="FedMedController", level="WARNING") + "round 2: no result from hospital-c this round"
    assert concise(warning) == "  WARNING FedMedController: round 2: no result from hospital-c this round"
    error = PREFIX.format(name="ServerRunner", level="ERROR") + "job failed"
    assert concise(error) == "  ERROR ServerRunner: job failed"
    # The simulator's console format has no logger name.
    assert (
        concise("2026-11-29 21:15:01,475 - WARNING - round 2: no result from hospital-c this round")
        == "  WARNING: round 2: no result from hospital-c this round"
    )
    for noise in (
        PREFIX.format(name="nvflare.private.fed.simulator", level="INFO") + "deployed app to site-1",
        PREFIX.format(name="FedMedTrainer", level="INFO") + "site hospital-a round 2: epoch 1/1 train loss 0.6",
        "2026-11-29 21:15:01,475 - WARNING - Number of results (3) is different from number of expected responses (2).",
        "2026-11-29 21:14:22,086 - INFO - setup plugin alembic.autogenerate.schemas",
        PREFIX.format(name="FedMedController", level="WARNING") + "Number of results (3) is different from "
        "number of expected responses (1).",
        "INFO  [alembic.runtime.migration] Running upgrade 0008 -> 0009",
        "Traceback (most recent call last):",
    ):
        assert concise(noise) is None, noise


def test_child_processes_output_goes_to_the_file_and_the_kept_lines_to_the_console(tmp_path):
    """The simulator's processes inherit stdout and stderr: what they write is captured too."""
    log = tmp_path / "logs" / "sim.log"
    log.parent.mkdir()
    log.write_text("an earlier run\n")  # appended to, never replaced
    code = (
        "import subprocess, sys\n"
        "from fedmed.display.console import full_output_to\n"
        f"with full_output_to({str(log)!r}):\n"
        "    print('noise from this process', flush=True)\n"
        "    subprocess.run([sys.executable, '-c', \"import sys; print('noise from a child'); "
        "print('x - FedMedController - INFO - round 1/1 done in 1s: 1/1 sites aggregated', file=sys.stderr)\"])\n"
        "print('after the block')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["round 1/1 done in 1s: 1/1 sites aggregated", "after the block"]
    full = log.read_text().splitlines()
    assert full[:3] == ["an earlier run", "noise from this process", "noise from a child"]
    assert "round 1/1 done" in full[3] and "after the block" not in full  # the console is restored after the block
    assert out.stderr == ""


def test_a_refusal_reason_reaches_the_console_once_however_many_sites_and_rounds_repeat_it():
    why = "this site's privacy policy requires DP-SGD, but the job's model uses batch normalisation"
    lines = [
        *(
            PREFIX.format(name="FedMedTrainer", level="ERROR") + f"site {h} refuses this job: {why}"
            for h in ("hospital-a", "hospital-b")
        ),
        *(
            PREFIX.format(name="FedMedController", level="WARNING") + f"round {r}: {h} refused the round: {why}"
            for r in (1, 2)
            for h in ("hospital-a", "hospital-b")
        ),
        PREFIX.format(name="FedMedController", level="WARNING") + "round 2: hospital-c refused the round: other",
    ]
    view = ConciseView()
    shown = [s for s in map(view, lines) if s is not None]
    assert shown == [
        f"  ERROR FedMedTrainer: site hospital-a refuses this job: {why}",
        "  WARNING FedMedController: round 2: hospital-c refused the round: other",
    ]
