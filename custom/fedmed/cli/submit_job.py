"""FL admin: export the fedmed job (job.py --export-job), submit it through NVFlare's admin API, follow its rounds, fetch its results.

    fedmed-submit --kit <admin startup kit> --user admin@fedmed.org [--db-url URL]
                  [--timeout 3600] [--out DIR] -- [job.py options, e.g. --rounds 2 --image-size 64]
    fedmed-submit --workspace runs/federation -- --rounds 2      (a fedmed-federation federation)
    fedmed-submit --workspace runs/federation --abort JOB_ID     (or --kit ...: abort a job on the server; JOB_ID
                                                                   may be a unique prefix, as for runs)
    fedmed-submit --workspace runs/federation --resume RUN -- --rounds 2   (continue an interrupted or failed run)
(or `python scripts/submit_job.py ...`, the same command)

Uses NVFlare's Session API (fedmed.cli.admin_session: the same secure session, logged in 1-2 s sooner):
submit_job -> get_job_meta polled every 0.5 s until the job ends (or --timeout, which aborts the job) ->
download_job_result. With --db-url (the server's FEDMED_DB_URL, readable by the admin) each round is printed as the
server records it, with the reason for every site that did not count (missing, refused, rejected), and the run's
summary is written into the downloaded result as fedmed_summary.json, with the cross-site evaluation table (each
hospital's score of the global model and of each lent local model), which is printed too. Why sites did not count
in rounds is printed once per cause, not once per round.
At the end it prints where the best and the last global model are inside the downloaded result. Ctrl-C asks
whether to abort the job on the server (otherwise it keeps running).

Exit codes (docs/fl_admin.md#fedmed-submit-exit-codes):
  0    the job finished normally (FINISHED:COMPLETED)
  2    a cause fedmed-submit can name, on stderr: one line, then one line per cause naming the sites and the fix.
       A bad option or job option, a missing kit or unprovisioned workspace, an unreachable server or a refused
       login, an admin whose role may not submit, a job the hospitals refused to start (FINISHED:FAILED_TO_RUN:
       each hospital's reason from the job's deploy record), a job that started and whose run failed (e.g. every
       site refused or could not take part in a round: each site's reason, from the database or, without
       --db-url, from the server's log in the downloaded result), a resumption or evaluation the server refused,
       a server that stops answering mid-job, and --timeout (the job is aborted)
  1    the job ended otherwise with no cause on record (aborted by an admin; NVFlare's FINISHED:ABNORMAL after a
       run that finished: the database has the training outcome)
  130  Ctrl-C, the job left running on the server

--resume RUN (the run's number as fedmed-rounds prints it, its uid in the database, or a unique prefix) submits a
job that continues that interrupted or failed run from its last recorded round (fedmed.server.resume): same run in the
database, rounds numbered on. With
--db-url it is checked before anything is submitted (the run exists and is resumable, and the job's task,
aggregation, HE layers, norm, image size and rounds are the run's); the server checks it again, with the model
file's sha256, and refuses with the reason, which is printed.
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from fedmed.paths import JOBS

JOB_SCRIPT = JOBS / "cxr_densenet" / "job.py"
COMPLETED = "FINISHED:COMPLETED"
SUMMARY_FILE = "fedmed_summary.json"
MODEL_FILES = ("best_model.pt", "global_model.pt")  # fedmed.flare.persistor's, in the server's app folder


class SubmitError(Exception):
    """Something the admin can fix; main prints it as one line (one more line per cause when there are several)."""


class JobFailed(SubmitError):
    """A job that started and ended without completing its run, with its causes; its result is still downloaded."""

    def __init__(self, message: str, outcome: "JobOutcome"):
        super().__init__(message)
        self.outcome = outcome


@dataclass(frozen=True)
class Polling:
    """How fedmed-submit waits on the server. NVFlare's own wait_for_job polls every 2 s: a job's end (and with it
    the download and the exit) was seen up to 2 s late, 1 s on average (docs/bench_admin.md). get_job_meta on a
    loopback server answers in milliseconds, so polling 4x as often costs the server nothing that matters."""

    interval: float = 0.5  # seconds between get_job_meta calls
    connect_timeout: float = 30.0  # seconds NVFlare may take to open the admin session


@dataclass
class JobOutcome:
    job_id: str
    status: str
    result_dir: Path | None
    submit_seconds: float
    run_seconds: float
    round_seconds: list = field(default_factory=list)  # wall time between consecutive recorded rounds
    models: dict = field(default_factory=dict)  # "best_model.pt" / "global_model.pt" -> path in the result
    not_counted: list = field(default_factory=list)  # (round, site, status, reason) of every site that did not count


def export_job(dest: Path, job_args: list[str]) -> Path:
    """jobs/cxr_densenet/job.py --export-job, in its own process (torch, MONAI): the job folder the admin console
    takes (it names fedmed classes only; its Controller's `job` argument holds every setting)."""
    proc = subprocess.run(
        [sys.executable, str(JOB_SCRIPT), "--export-job", str(dest), *job_args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if proc.returncode != 0:
        # job.py's own last line (argparse's "error: ..." or the exception) is what the admin has to fix
        last = next((line for line in reversed(proc.stderr.splitlines()) if line.strip()), "no output")
        raise SubmitError(f"the job options after -- were refused: {last.strip()} (see `python {JOB_SCRIPT} --help`)")
    folders = [p for p in dest.iterdir() if (p / "meta.json").is_file()]
    if len(folders) != 1:
        raise RuntimeError(f"expected one exported job folder in {dest}, found {folders}")
    return folders[0]


def exported_controller_args(job_folder: Path) -> dict:
    """The exported job's settings by name: its FedMedController's `job` argument (JobConfig.to_dict(): every
    setting, defaults included; the server checks them again). Read as JSON: the admin's process imports neither
    torch nor MONAI."""
    path = job_folder / "app_server" / "config" / "config_fed_server.json"
    server = json.loads(path.read_text())
    controller = next((w for w in server.get("workflows", []) if w.get("path", "").endswith("FedMedController")), {})
    job = controller.get("args", {}).get("job")
    if not isinstance(job, dict):  # not a fedmed job export (or one from before the Controller took `job`)
        raise SubmitError(f"{path} has no FedMedController workflow with a `job` argument: not a fedmed job export")
    return job


def _decide_in_record(db_url: str, option: str, run: str, purpose: str, decide) -> tuple:
    """(the full uid of `run`, decide(its RunHistory)) from the database; a refusal (fedmed.server.resume, for `purpose`)
    becomes a SubmitError with its one line. Writes nothing."""
    from fedmed.server.resume import PURPOSES, find_run_uid
    from fedmed.store.repository import Repository

    try:
        repo = Repository(db_url, create_schema=False)
    except Exception as e:
        raise SubmitError(f"{option}: cannot open the database {db_url.split('@')[-1]}: {type(e).__name__}") from None
    try:
        uid = find_run_uid(repo, run, purpose)
        return uid, decide(repo.run_history(uid))
    except PURPOSES[purpose] as e:
        raise SubmitError(str(e)) from None
    finally:
        repo.close()


def check_resume(db_url: str | None, run: str, job_folder: Path) -> str:
    """The full uid of the run --resume names, once the record says the exported job may continue it; raises
    SubmitError with the one-line reason (nothing submitted). Without a database only the server can check."""
    if not db_url:
        print(f"--resume {run}: no --db-url, so the server checks the resumption (its reason is printed if it refuses)")
        return run
    from fedmed.server.resume import FIXED_OPTIONS, plan_resume

    args = exported_controller_args(job_folder)
    uid, plan = _decide_in_record(
        db_url, "--resume", run, "resume", lambda history: plan_resume(history, {k: args.get(k) for k in FIXED_OPTIONS})
    )
    print(
        f"resuming run {uid} from round {plan.from_round} (last recorded round {plan.from_round - 1}, "
        f"{plan.previous_status}; global model sha256 {plan.model_sha256[:16]}...)",
        flush=True,
    )
    return uid


def check_evaluation(db_url: str | None, job_folder: Path) -> None:
    """When the exported job scores a recorded run's model (--cross-site-eval-only RUN): the run exists and recorded
    that model; raises SubmitError with the one-line reason (nothing submitted). The model file is on the server,
    which checks its sha256 and refuses with the reason, which is printed."""
    args = exported_controller_args(job_folder)
    run = args.get("cross_site_eval_run")
    if not run:
        return
    if not db_url:
        print(f"--cross-site-eval-only {run}: no --db-url, so the server checks the run and its model file")
        return
    from fedmed.server.resume import pick_recorded_model

    which = args.get("cross_site_eval_model") or "final"
    uid, recorded = _decide_in_record(
        db_url, "--cross-site-eval-only", run, "cross-site evaluation", lambda h: pick_recorded_model(h, which)
    )
    print(
        f"scoring run {uid}'s {recorded.which} model (round {recorded.model_round}, sha256 "
        f"{recorded.model_sha256[:16]}...)",
        flush=True,
    )


REFUSALS = ("resume: ", "cross-site evaluation: ")  # how the server's one-line refusals start (fedmed.server.resume)


def refusal_in(result: Path | None) -> str | None:
    """The server's one-line reason for refusing a resumption or the evaluation of a recorded run's model, from the
    job's downloaded log (the controller's error line)."""
    for log in sorted(Path(result).rglob("log*.txt")) if result else []:
        for line in log.read_text(errors="replace").splitlines():
            if "FedMedController" not in line or "ERROR" not in line:
                continue
            for start in REFUSALS:
                if start in line:
                    return line[line.index(start) :]
    return None


FAILED_TO_RUN = "FINISHED:FAILED_TO_RUN"
NVFLARE_ERROR = "NVFLARE_ERROR:"
DEPLOY_DETAIL = "job_deploy_detail"  # nvflare.apis.job_def.JobMetaKey.JOB_DEPLOY_DETAIL: each site's deploy answer
# What the admin does about a cause, found by a piece of its text (the site's or NVFlare's own words).
FIXES = (
    (
        "privacy scope",
        "give -- --scope NAME with a scope every hospital's local/privacy.json lists (shipped: private, or "
        "rehearsal for synthetic data; site_configs/README.md)",
    ),
    ("norm='group'", "submit with -- --norm group"),
    ("no privacy policy applies", "give -- --scope private (DP), or mark synthetic data synthetic_rehearsal"),
    ("no reply", "is the site running? (fedmed-federation status, or ask the hospital's IT)"),
    (
        "never from a job",
        "leave that option out of the job: each hospital sets it in its own kit (local/fedmed_site.json, its "
        "environment)",
    ),
    (
        "set-up failed at the site",
        "the hospital's IT fixes it (`site_configs/install.sh --check <kit>`, docs/hospital_it.md); the next job "
        "reads the site's settings again",
    ),
    ("no result", "is the site running? (fedmed-federation status, or ask the hospital's IT)"),
    ("not connected to the server", "is the site running? (fedmed-federation status, or ask the hospital's IT)"),
    (
        "global model rejected",
        "the global model is unusable (non-finite or collapsed outputs; `fedmed-rounds` shows the alert and the "
        "sites' updates): resubmit with a lower -- --lr",
    ),
    (
        "min_clients",
        "fewer sites counted than the job's --min-clients: fix the causes above, or submit with a lower "
        "-- --min-clients",
    ),
)


def fix_for(reason: str) -> str:
    return next((f"; fix: {fix}" for key, fix in FIXES if key in (reason or "")), "")


def deploy_causes(detail) -> list[str]:
    """One line per cause from NVFlare's job_deploy_detail ("hospital-a: privacy scope 'x' is not allowed", ...,
    "num_ok_sites 0 < required_min_sites 3"): the sites that gave the same reason on one line, with the fix."""
    by_reason: dict[str, list[str]] = {}
    general = []
    for entry in detail or []:
        site, sep, reason = str(entry).partition(": ")
        if not sep or " " in site:
            general.append(str(entry))  # NVFlare's own conclusion, e.g. the min_sites count
        elif reason.strip() != "OK":
            # a client's refusal arrives as "NVFLARE_ERROR: <why>" (nvflare.private.defs.ERROR_MSG_PREFIX)
            why = reason.strip().removeprefix(NVFLARE_ERROR).strip()
            by_reason.setdefault(why, []).append(site)
    lines = [f"{', '.join(sorted(sites))}: {reason}{fix_for(reason)}" for reason, sites in by_reason.items()]
    return lines + [f"so the job did not start ({g})" for g in general]


class Causes:
    """Why sites did not count, one line per cause (status and reason), however many rounds and sites it covers;
    a cause is printed again only when more sites share it."""

    def __init__(self):
        self._sites: dict[tuple, dict] = {}  # (status, reason) -> {site: first round}
        self._printed: dict[tuple, set] = {}

    def add(self, rnd: int, site: str, status: str, reason) -> None:
        self._sites.setdefault((status, reason or "no reason recorded"), {}).setdefault(site, rnd)

    def new_lines(self) -> list[str]:
        lines = []
        for (status, reason), sites in self._sites.items():
            if set(sites) == self._printed.get((status, reason)):
                continue
            self._printed[(status, reason)] = set(sites)
            lines.append(self._line(status, reason, sites))
        return lines

    def all_lines(self) -> list[str]:
        """Every cause, printed before or not: what a failed job's last lines say."""
        return [self._line(status, reason, sites) for (status, reason), sites in self._sites.items()]

    @staticmethod
    def _line(status: str, reason: str, sites: dict) -> str:
        first = min(sites.values())
        return f"{', '.join(sorted(sites))} {status} (from round {first}): {reason}{fix_for(reason)}"


# The server's log lines for a site that did not count (fedmed.server.rounds' round log, "round N: ..." in the controller's
# log): what fedmed-submit reads from the downloaded result when it has no database to ask.
_SITE_LOG = (
    (re.compile(r"round (\d+): (\S+) refused the round: (.*)$"), "refused"),
    (re.compile(r"round (\d+): (\S+) cannot take part: (.*)$"), "missing"),
    (re.compile(r"round (\d+): update from (\S+) rejected: (.*)$"), "rejected"),
    (re.compile(r"round (\d+): no result from (\S+) this round: (.*)$"), "missing"),
)
_RUN_FAILED = re.compile(r" - run (\S+) failed: (.*)$")


def _controller_lines(result: Path | None):
    for log in sorted(Path(result).rglob("log*.txt")) if result else []:
        for line in log.read_text(errors="replace").splitlines():
            if "FedMedController" in line:
                yield line


def causes_in_log(result: Path | None, causes: Causes) -> str | None:
    """Adds every site that did not count, as the server logged it, to `causes`; returns the server's reason for
    failing the run ("round 1: 0 valid, trusted update(s), min_clients is 2; ..."), None when it did not fail."""
    failed = None
    for line in _controller_lines(result):
        for pattern, status in _SITE_LOG:
            m = pattern.search(line)
            if m:
                causes.add(int(m.group(1)), m.group(2), status, m.group(3).strip())
                break
        m = _RUN_FAILED.search(line)
        if m and " ERROR " in line:
            failed = m.group(2).strip()
    return failed


def exported_num_rounds(job_folder: Path) -> int:
    """The exported job's number of rounds, as its server config says."""
    return int(exported_controller_args(job_folder)["num_rounds"])


def round_line(r, label) -> str:
    """One round as the admin follows it: who counted, who did not (the reasons follow once per cause)."""
    counted = f"sites {', '.join(r.sites_accepted)}" if r.sites_accepted else "no site counted"
    others = "".join(f", {s} {st}" for s, st in r.sites_other)
    score = f"{label} {r.score:.4f}" if label is not None else "no score"
    return f"round {r.round_num}: {counted}{others}; {score}"


class RoundFollower:
    """Prints each round of the job's run as the server records it in the database."""

    def __init__(self, db_url: str | None, num_rounds: int | None):
        self.db_url, self.printed, self.round_times = db_url, set(), []
        self.causes = Causes()
        self.job_id = self.status = None  # what the admin is told if the server stops answering
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
        new = [r for r in rows if r.round_num not in self.printed]
        reasons = {}
        if any(r.sites_other for r in new):
            try:
                reasons = {(u["round"], u["site"]): u["reason"] for u in self._repo.client_updates(run_id)}
            except Exception:  # briefly locked: print without reasons rather than not at all
                reasons = {}
        from fedmed.cli.rounds_table import score_label

        for r in new:
            self.printed.add(r.round_num)
            self.round_times.append(time.monotonic())
            for s, st in r.sites_other:
                self.causes.add(r.round_num, s, st, reasons.get((r.round_num, s)))
            self.bar.write(round_line(r, score_label(r) if r.score is not None else None))
            for line in self.causes.new_lines():  # each reason once, not once a round
                self.bar.write(f"  {line}")
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self._repo is not None:
            self._repo.close()


def admin_target(kit: Path) -> tuple[str, int]:
    """(host, port) of the server's admin endpoint, from the admin kit's startup/fed_admin.json."""
    cfg = Path(kit) / "startup" / "fed_admin.json"
    if not cfg.is_file():
        raise SubmitError(
            f"{kit} is not an admin startup kit (no startup/fed_admin.json): give --kit the folder "
            "the FL admin received from provisioning (or --workspace of a fedmed-federation)"
        )
    admin = json.loads(cfg.read_text()).get("admin", {})
    return str(admin.get("host")), int(admin.get("port"))


def probe_server(kit: Path) -> tuple[str, int]:
    """Raises SubmitError at once when nothing answers at the kit's server address (NVFlare's own session would
    retry for its whole timeout, then end in a traceback)."""
    host, port = admin_target(kit)
    try:
        socket.create_connection((host, port), timeout=5).close()
    except OSError as e:
        workspace = federation_workspace(kit)
        hint = (
            f"`fedmed-federation status --workspace {workspace}`, then `fedmed-federation start --workspace "
            f"{workspace}`"
            if workspace
            else "ask whoever runs the server, or for a fedmed-federation run `fedmed-federation start --workspace "
            "<its workspace>`"
        )
        raise SubmitError(
            f"cannot reach the FL server at {host}:{port} ({e.strerror or e}): is it running? ({hint})"
        ) from None
    return host, port


def federation_workspace(kit: Path) -> Path | None:
    """The fedmed-federation workspace a kit was provisioned in (the folder above it holding federation.json),
    None for a kit handed out by a real deployment's provisioning."""
    from fedmed.cli.federation import STATE_FILE

    return next((p for p in Path(kit).resolve().parents if (p / STATE_FILE).is_file()), None)


def open_session(kit: Path, user: str, connect_timeout: float = 30.0):
    """A secure admin session (fedmed.cli.admin_session: NVFlare's, without its avoidable waits); an unreachable
    server is one SubmitError at once, not NVFlare's retries."""
    from fedmed.cli.admin_session import new_admin_session

    host, port = probe_server(kit)
    try:
        return new_admin_session(kit, user, connect_timeout)
    except Exception as e:  # NoConnection, AuthenticationError, ...: NVFlare's reason, one line
        raise SubmitError(
            f"no admin session with the server at {host}:{port} as {user}: {type(e).__name__}: {e} "
            "(is this the admin's own kit, from the server's current provisioning?)"
        ) from None


def _ask_abort(job_id: str) -> bool:
    try:
        answer = input(f"\nabort job {job_id} on the server? [y/N] ")
    except (EOFError, KeyboardInterrupt):
        return False
    return answer.strip().lower() in ("y", "yes")


def resolve_job_id(session, given: str) -> str:
    """The server's job id that `given` is or uniquely starts (fedmed.server.resume.match_prefix, the rule every run and
    job identifier follows); SubmitError naming the ambiguity or the absence."""
    from fedmed.server.resume import match_prefix

    try:
        jobs = session.list_jobs(id_prefix=given.strip())
        return match_prefix(given, [j.get("job_id", "") for j in jobs], "job", " on the server")
    except ValueError as e:
        raise SubmitError(f"--abort: {e}") from None


def abort(kit: Path, user: str, given: str) -> tuple[str, str]:
    """Abort the job whose id is or starts with `given` on the server; returns (its id, its status after)."""
    session = open_session(kit, user)
    try:
        job_id = resolve_job_id(session, given)
        try:
            session.abort_job(job_id)
        except Exception as e:  # JobNotRunning, AuthorizationError
            raise SubmitError(f"cannot abort job {job_id}: {type(e).__name__}: {e}") from None
        return job_id, str(session.get_job_meta(job_id).get("status"))
    finally:
        _close(session)


def _close(session) -> None:
    try:
        session.close()
    except Exception:  # the server is gone: nothing left to close there, and the cause is already said
        pass


def run_summary(db_url: str | None, job_id: str) -> dict | None:
    """The job's fedmed run as recorded: status, best round and every site's status and reason per round."""
    if not db_url:
        return None
    from fedmed.store.repository import Repository

    try:
        repo = Repository(db_url, create_schema=False)
    except Exception:
        return None
    try:
        run_id = repo.run_id_for_job(job_id)
        if run_id is None:
            return None
        run = repo.get_run(run_id)
        updates = [{k: u[k] for k in ("round", "site", "status", "reason")} for u in repo.client_updates(run_id)]
        cross = [
            {k: c[k] for k in ("model", "site", "status", "score", "score_name", "reason")}
            for c in repo.cross_site_results(run_id)
        ]
        return {
            "job_id": job_id,
            "run_id": run_id,
            "status": run.status,
            "best_round": run.best_round,
            "sites": updates,
            "cross_site": cross,
        }
    except Exception:
        return None
    finally:
        repo.close()


def cross_site_lines(cells: list) -> list[str]:
    """The cross-site table as the admin reads it: one line per hospital, its score of each model (or why none)."""
    if not cells:
        return []
    from fedmed.server.crosssite import heatmap_matrix, model_label

    m = heatmap_matrix(cells)
    name = next((c["score_name"] for c in cells if c["score_name"]), "score")
    width = max(len(s) for s in m.sites)
    lines = [f"cross-site evaluation ({name}; rows: the hospital whose validation data scored the model):"]
    lines.append(" " * (width + 2) + "  ".join(f"{model_label(x):>22}" for x in m.models))
    for site, row in zip(m.sites, m.values):
        lines.append(f"  {site:<{width}}" + "  ".join(f"{'-' if v is None else f'{v:.3f}':>22}" for v in row))
    for c in cells:
        if c["status"] != "evaluated":
            lines.append(f"  {c['site']} on {model_label(c['model'])}: {c['status']}: {c['reason']}")
    return lines


def models_in(result: Path) -> dict:
    found = {}
    for name in MODEL_FILES:
        paths = sorted(Path(result).rglob(name))
        if paths:
            found[name] = paths[0]
    return found


@dataclass(frozen=True)
class Submission:
    """One job to submit and follow (submit_and_follow's arguments)."""

    kit: Path
    user: str
    job_folder: Path
    timeout: float
    out: Path | None = None
    db_url: str | None = None
    polling: Polling = Polling()


def submit_and_follow(
    kit: Path,
    user: str,
    job_folder: Path,
    timeout: float,
    out: Path | None = None,
    db_url: str | None = None,
    num_rounds: int | None = None,
    polling: Polling = Polling(),
) -> JobOutcome:
    """Submit job_folder as user; wait for the job to end (abort it at timeout); download its result to out.
    A server that stops answering, a job the sites refused to start, or one that started and failed (every site
    refused, a refused resumption...) is a SubmitError naming each cause (JobFailed, with the downloaded outcome,
    for a job that ran)."""
    from nvflare.fuel.flare_api.api_spec import NoConnection, SessionClosed

    sub = Submission(kit, user, job_folder, timeout, out, db_url, polling)
    session = open_session(kit, user, polling.connect_timeout)
    follower = RoundFollower(db_url, num_rounds)
    try:
        return _follow(session, follower, sub)
    except (NoConnection, SessionClosed, ConnectionError) as e:
        host, port = admin_target(kit)
        where = f"job {follower.job_id} was {follower.status}" if follower.job_id else "submitting"
        raise SubmitError(
            f"lost the FL server at {host}:{port} while {where} ({type(e).__name__}): is it still running? When it "
            "is back, its job list says what became of the job (a server restart marks it interrupted; "
            "`fedmed-submit --resume RUN` continues the run)"
        ) from None
    finally:
        follower.close()
        _close(session)


def _submit(session, sub: Submission) -> str:
    from nvflare.fuel.flare_api.api_spec import AuthorizationError, InvalidJobDefinition

    try:
        return session.submit_job(str(sub.job_folder))
    except AuthorizationError as e:
        raise SubmitError(
            f"{sub.user} may not submit jobs ({e}): submit with the project admin's kit (the shipped "
            "site_configs/authorization.json lets only the project admin submit; provision/README.md)"
        ) from None
    except InvalidJobDefinition as e:
        raise SubmitError(f"the server refused the job folder {sub.job_folder.name}: {e}") from None


def _wait(session, follower, job_id: str, sub: Submission) -> dict:
    """The job's meta once it has FINISHED; aborts it past sub.timeout (a SubmitError)."""
    deadline = time.monotonic() + sub.timeout
    while True:
        try:
            meta = session.get_job_meta(job_id)
            follower.status = meta.get("status")
            follower.poll(job_id)
            if follower.status and follower.status.startswith("FINISHED"):
                return meta
            if time.monotonic() > deadline:
                session.abort_job(job_id)
                raise SubmitError(
                    f"job {job_id} still {follower.status} after {sub.timeout:.0f}s, so it was aborted: give a longer "
                    "--timeout (seconds), or fewer rounds"
                )
            time.sleep(min(sub.polling.interval, max(deadline - time.monotonic(), 0.0) + 0.01))
        except KeyboardInterrupt:
            if _ask_abort(job_id):
                session.abort_job(job_id)
                print(f"job {job_id}: abort requested; its result is still downloaded", flush=True)
                continue  # follow it to FINISHED:ABORTED, then download what it left
            print(
                f"job {job_id} keeps running on the server; abort it later with `fedmed-submit --abort "
                f"{job_id[:8]}` (and the same --kit/--workspace)",
                flush=True,
            )
            raise


def _follow(session, follower, sub: Submission) -> JobOutcome:
    t0 = time.monotonic()
    job_id = _submit(session, sub)
    follower.job_id, follower.status = job_id, "SUBMITTED"
    submitted = time.monotonic()
    print(f"submitted {sub.job_folder.name} as {sub.user}: job {job_id} ({submitted - t0:.1f}s)", flush=True)
    meta = _wait(session, follower, job_id, sub)
    status = follower.status
    follower.poll(job_id)
    finished = time.monotonic()
    print(f"job {job_id}: {status} after {finished - submitted:.0f}s", flush=True)
    if status == FAILED_TO_RUN:
        # The sites' refusals (a scope they do not list, no reply...) are in the job's meta, one entry per site.
        causes = deploy_causes(meta.get(DEPLOY_DETAIL))
        raise SubmitError(
            f"job {job_id} did not start ({status})"
            + ("".join(f"\n  {c}" for c in causes) if causes else ": the server's log.txt says why")
        )
    result = session.download_job_result(job_id, str(sub.out) if sub.out else None)
    summary = run_summary(sub.db_url, job_id)
    not_counted = [
        (u["round"], u["site"], u["status"], u["reason"])
        for u in (summary or {}).get("sites", [])
        if u["status"] != "accepted"
    ]
    for rnd, site, st, reason in not_counted:
        follower.causes.add(rnd, site, st, reason)
    for line in follower.causes.new_lines():  # only causes the rounds above did not already print
        print(line, flush=True)
    for line in cross_site_lines((summary or {}).get("cross_site", [])):
        print(line, flush=True)
    models = {}
    if result:
        print(f"results downloaded to {result}")
        if summary is not None:
            (Path(result) / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, default=str) + "\n")
            print(f"run summary (every site's status and reason, per round): {Path(result) / SUMMARY_FILE}")
        models = models_in(Path(result))
        for name, path in models.items():
            print(f"{'best' if name.startswith('best') else 'last global'} model: {path}")
    times = follower.round_times
    outcome = JobOutcome(
        job_id,
        status,
        Path(result) if result else None,
        submitted - t0,
        finished - submitted,
        [b - a for a, b in zip(times, times[1:])],
        models,
        not_counted,
    )
    failure = failure_lines(outcome, summary, follower.causes)
    if failure:
        raise JobFailed("\n  ".join(failure), outcome)
    return outcome


def failure_lines(outcome: JobOutcome, summary: dict | None, causes: Causes) -> list[str]:
    """Why a job that started did not complete its run: the first line says how it ended, one line follows per
    cause (the sites that gave it, the fix). Empty for a completed job, and for one that ended otherwise with no
    cause on record (aborted by an admin, or NVFlare's FINISHED:ABNORMAL after a run that finished)."""
    if outcome.status == COMPLETED:
        return []
    refused = refusal_in(outcome.result_dir)
    if refused:  # a resumption or an evaluation the server refused, before any round
        return [f"job {outcome.job_id} ended {outcome.status}: the server refused: {refused}"]
    logged = Causes()  # without a database, the server's own log in the downloaded result says it
    failed = causes_in_log(outcome.result_dir, logged)
    run_status = (summary or {}).get("status")
    if run_status != "failed" and failed is None:
        return []
    lines = (causes if summary is not None else logged).all_lines()
    why = f" ({failed})" if failed else ""
    if failed and not lines:
        lines = [f"fix: {fix}" for key, fix in FIXES if key in failed][:1]
    return [f"job {outcome.job_id} ended {outcome.status}: its run failed{why}", *lines]


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    job_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kit", type=Path, help="the admin's startup kit folder (holds startup/fed_admin.json)")
    p.add_argument("--user", help="admin user name (the kit's folder name when omitted)")
    p.add_argument("--workspace", type=Path, help="a scripts/federation.py workspace: use its project admin kit")
    p.add_argument("--db-url", help="the server's database, to print rounds as they are recorded")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds before the job is aborted")
    p.add_argument("--out", type=Path, help="download the job's results here (default: the kit's transfer/)")
    p.add_argument(
        "--abort", metavar="JOB_ID", help="abort this job (its id or a unique prefix) instead of submitting one"
    )
    p.add_argument(
        "--resume",
        metavar="RUN",
        help="continue this interrupted or failed run (its number as fedmed-rounds prints it, its uid or a unique "
        "prefix) from its last "
        "recorded round; give the job options it ran with after --",
    )
    a = p.parse_args(argv)
    try:
        if a.workspace:
            from fedmed.cli.federation import PROJECT_ADMIN, Federation

            fed = Federation(a.workspace)
            a.user = a.user or PROJECT_ADMIN
            try:
                a.kit = a.kit or fed.kit(a.user)
                a.db_url = a.db_url or fed.db_url()
            except FileNotFoundError as e:
                raise SubmitError(str(e)) from None
        if a.kit is None:
            raise SubmitError("give --kit (the admin startup kit) or --workspace (a fedmed-federation workspace)")
        user = a.user or a.kit.resolve().name
        if a.abort:
            job_id, status = abort(a.kit, user, a.abort)
            print(f"job {job_id}: abort requested; status {status}")
            return 0
        probe_server(a.kit)  # a wrong --kit or a stopped server is said before the ~20 s job export
        if a.resume:
            job_args = [*job_args, "--resume", a.resume]
        with tempfile.TemporaryDirectory() as tmp:
            folder = export_job(Path(tmp), job_args)
            if a.resume:
                check_resume(a.db_url, a.resume, folder)
            check_evaluation(a.db_url, folder)
            outcome = submit_and_follow(a.kit, user, folder, a.timeout, a.out, a.db_url, exported_num_rounds(folder))
    except SubmitError as e:
        print(f"fedmed-submit: {e}", file=sys.stderr)
        return 2
    except ConnectionError as e:  # NVFlare's NoConnection outside a followed job (e.g. during --abort)
        print(f"fedmed-submit: lost the FL server ({type(e).__name__}: {e}): is it still running?", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0 if outcome.status == COMPLETED else 1


if __name__ == "__main__":
    sys.exit(main())
