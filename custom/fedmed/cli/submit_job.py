"""FL admin: export the fedmed job (job.py --export-job), submit it through NVFlare's admin API, follow its rounds, fetch its results.

    fedmed-submit --kit <admin startup kit> --user admin@fedmed.org [--db-url URL]
                  [--timeout 3600] [--out DIR] -- [job.py options, e.g. --rounds 2 --image-size 64]
    fedmed-submit --workspace runs/federation -- --rounds 2      (a fedmed-federation federation)
(or `python scripts/submit_job.py ...`, the same command)

Uses NVFlare's Session API: new_secure_session -> submit_job -> get_job_meta polled until the job ends (or
--timeout, which aborts the job) -> download_job_result. With --db-url (the server's FEDMED_DB_URL, readable by
the admin) each round is printed as the server records it. Exit code 0 only when the job finished normally.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from fedmed.jobconfig import JobConfig
from fedmed.paths import JOBS

JOB_SCRIPT = JOBS / "cxr_densenet" / "job.py"
COMPLETED = "FINISHED:COMPLETED"


@dataclass
class JobOutcome:
    job_id: str
    status: str
    result_dir: Path | None
    submit_seconds: float
    run_seconds: float
    round_seconds: list = field(default_factory=list)  # wall time between consecutive recorded rounds


def export_job(dest: Path, job_args: list[str]) -> Path:
    """jobs/cxr_densenet/job.py --export-job: the job folder the admin console takes (it names fedmed classes only)."""
    proc = subprocess.run([sys.executable, str(JOB_SCRIPT), "--export-job", str(dest), *job_args],
                          capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"job export failed: {proc.stderr[-3000:]}")
    folders = [p for p in dest.iterdir() if (p / "meta.json").is_file()]
    if len(folders) != 1:
        raise RuntimeError(f"expected one exported job folder in {dest}, found {folders}")
    return folders[0]


def exported_num_rounds(job_folder: Path) -> int:
    """The exported job's number of rounds, as its server config says (NVFlare leaves out an argument equal to the
    Controller's default, which is JobConfig's)."""
    server = json.loads((job_folder / "app_server" / "config" / "config_fed_server.json").read_text())
    controller = next((w for w in server.get("workflows", []) if w.get("path", "").endswith("FedMedController")), {})
    return int(controller.get("args", {}).get("num_rounds", JobConfig.num_rounds))


class RoundFollower:
    """Prints each round of the job's run as the server records it in the database."""

    def __init__(self, db_url: str | None, num_rounds: int | None):
        self.db_url, self.printed, self.round_times = db_url, set(), []
        self.bar = tqdm(total=num_rounds, desc="rounds", unit="round") if db_url else None
        self._repo = None

    def poll(self, job_id: str) -> None:
        if not self.db_url:
            return
        from fedmed.store.repository import Repository

        try:
            if self._repo is None:
                self._repo = Repository(self.db_url, create_schema=False)
            run_id = self._repo.run_id_for_job(job_id)
            rows = self._repo.rounds_table(run_id) if run_id is not None else []
        except Exception:  # not created yet, or briefly locked: the next poll will see it
            return
        for r in rows:
            if r.round_num in self.printed:
                continue
            self.printed.add(r.round_num)
            self.round_times.append(time.monotonic())
            others = "".join(f", {s} {st}" for s, st in r.sites_other)
            from fedmed.cli.rounds_table import score_label

            score = f"{score_label(r)} {r.score:.4f}" if r.score is not None else "no score"
            self.bar.write(f"round {r.round_num}: sites {', '.join(r.sites_accepted)}{others}; {score}")
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self._repo is not None:
            self._repo.close()


def submit_and_follow(kit: Path, user: str, job_folder: Path, timeout: float, out: Path | None = None,
                      db_url: str | None = None, num_rounds: int | None = None, poll_interval: float = 2.0,
                      connect_timeout: float = 30.0) -> JobOutcome:
    """Submit job_folder as user; wait for the job to end (abort it at timeout); download its result to out."""
    from nvflare.fuel.flare_api.flare_api import new_secure_session

    session = new_secure_session(user, str(kit), timeout=connect_timeout)
    follower = RoundFollower(db_url, num_rounds)
    try:
        t0 = time.monotonic()
        job_id = session.submit_job(str(job_folder))  # raises AuthorizationError when the role may not submit
        submitted = time.monotonic()
        print(f"submitted {job_folder.name} as {user}: job {job_id} ({submitted - t0:.1f}s)", flush=True)
        deadline = submitted + timeout
        status = None
        while True:
            status = session.get_job_meta(job_id).get("status")
            follower.poll(job_id)
            if status and status.startswith("FINISHED"):
                break
            if time.monotonic() > deadline:
                session.abort_job(job_id)
                raise TimeoutError(f"job {job_id} still {status} after {timeout:.0f}s; aborted it")
            time.sleep(poll_interval)
        follower.poll(job_id)
        finished = time.monotonic()
        print(f"job {job_id}: {status} after {finished - submitted:.0f}s", flush=True)
        result = session.download_job_result(job_id, str(out) if out else None)
        if result:
            print(f"results downloaded to {result}")
        times = follower.round_times
        return JobOutcome(job_id, status, Path(result) if result else None, submitted - t0, finished - submitted,
                          [b - a for a, b in zip(times, times[1:])])
    finally:
        follower.close()
        session.close()


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    job_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kit", type=Path, help="the admin's startup kit folder (holds startup/fed_admin.json)")
    p.add_argument("--user", help="admin user name (the kit's folder name when omitted)")
    p.add_argument("--workspace", type=Path, help="a scripts/federation.py workspace: use its project admin kit")
    p.add_argument("--db-url", help="the server's database, to print rounds as they are recorded")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds before the job is aborted")
    p.add_argument("--out", type=Path, help="download the job's results here (default: the kit's transfer/)")
    a = p.parse_args(argv)
    if a.workspace:
        from fedmed.cli.federation import PROJECT_ADMIN, Federation

        fed = Federation(a.workspace)
        a.user = a.user or PROJECT_ADMIN
        a.kit = a.kit or fed.kit(a.user)
        if a.db_url is None:
            from fedmed.cli.install_kit import read_env

            a.db_url = read_env(fed.kit("server") / "local" / "fedmed.env").get("FEDMED_DB_URL")
    if a.kit is None:
        p.error("give --kit (the admin startup kit) or --workspace")
    user = a.user or a.kit.resolve().name
    with tempfile.TemporaryDirectory() as tmp:
        folder = export_job(Path(tmp), job_args)
        outcome = submit_and_follow(a.kit, user, folder, a.timeout, a.out, a.db_url, exported_num_rounds(folder))
    return 0 if outcome.status == COMPLETED else 1


if __name__ == "__main__":
    sys.exit(main())
