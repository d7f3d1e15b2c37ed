"""Every way a job can fail before or during its run reaches the FL admin as one line per cause, once, naming the
sites and the fix; a user mistake or a dead server is one line and exit 2, never a traceback."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from nvflare.fuel.flare_api.api_spec import NoConnection

from fedmed.cli import federation, submit_job
from fedmed.cli.submit_job import Causes, JobFailed, JobOutcome, SubmitError, deploy_causes, failure_lines, round_line
from fedmed.store.repository import RoundRow

REPO = Path(__file__).resolve().parents[1]
HOSPITALS = ("hospital-a", "hospital-b", "hospital-c")


def test_a_scope_typo_is_one_line_naming_every_hospital_and_the_fix():
    # NVFlare's job_deploy_detail for `-- --scope rehersal`: each hospital's deploy answer, then its conclusion
    # (a client's refusal comes prefixed with NVFlare's NVFLARE_ERROR, replies in the order they arrived)
    detail = ["server: OK", *(f"{h}: NVFLARE_ERROR: privacy scope 'rehersal' is not allowed" for h in HOSPITALS[::-1])]
    detail.append("num_ok_sites 0 < required_min_sites 2")
    lines = deploy_causes(detail)
    assert lines[0].startswith("hospital-a, hospital-b, hospital-c: privacy scope 'rehersal' is not allowed; fix: ")
    assert "--scope NAME" in lines[0] and "rehearsal" in lines[0]
    assert lines[1:] == ["so the job did not start (num_ok_sites 0 < required_min_sites 2)"]


def test_different_deploy_causes_get_a_line_each():
    # sites in the order their replies came: the line names them sorted
    detail = ["hospital-c: disk full", "hospital-b: OK", "hospital-a: no reply (deployment timeout)"]
    assert deploy_causes(detail) == [
        "hospital-c: disk full",
        "hospital-a: no reply (deployment timeout); fix: is the site running? (fedmed-federation status, or ask "
        "the hospital's IT)",
    ]
    same = ["hospital-c: no reply (deployment timeout)", "hospital-a: no reply (deployment timeout)"]
    assert deploy_causes(same)[0].startswith("hospital-a, hospital-c: no reply")


def test_a_refusal_repeated_every_round_is_printed_once_and_again_only_for_new_sites():
    norm = "this site's privacy policy requires DP-SGD ...; the job must use norm='group'"
    causes = Causes()
    for rnd in (1, 2, 3):
        causes.add(rnd, "hospital-a", "refused", norm)
    causes.add(1, "hospital-b", "missing", None)
    first = causes.new_lines()
    assert first == [
        f"hospital-a refused (from round 1): {norm}; fix: submit with -- --norm group",
        "hospital-b missing (from round 1): no reason recorded",
    ]
    assert causes.new_lines() == []  # nothing new: nothing printed
    causes.add(4, "hospital-c", "refused", norm)
    assert causes.new_lines() == [
        f"hospital-a, hospital-c refused (from round 1): {norm}; fix: submit with -- --norm group"
    ]


def test_a_round_no_site_counted_in_says_so_instead_of_an_empty_list():
    row = RoundRow(1, (), (("hospital-a", "refused"), ("hospital-b", "missing")), None, None, None, None, None)
    assert round_line(row, None) == "round 1: no site counted, hospital-a refused, hospital-b missing; no score"


def _kit(tmp_path: Path, port: int, in_workspace: bool) -> Path:
    """An admin kit whose fed_admin.json points at `port`, inside a fedmed-federation workspace or not."""
    root = tmp_path / "ws" if in_workspace else tmp_path / "handed-out"
    kit = root / "provision" / "fedmed" / "prod_00" / "admin@fedmed.org"
    (kit / "startup").mkdir(parents=True)
    (kit / "startup" / "fed_admin.json").write_text(json.dumps({"admin": {"host": "127.0.0.1", "port": port}}))
    if in_workspace:
        (root / federation.STATE_FILE).write_text("{}")
    return kit


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block ends: nothing listens there


@pytest.mark.parametrize("in_workspace", [True, False])  # a fedmed-federation kit, and a real deployment's
def test_an_unreachable_server_hint_names_the_real_workspace(tmp_path, capsys, in_workspace):
    kit = _kit(tmp_path, _closed_port(), in_workspace)
    assert submit_job.main(["--kit", str(kit), "--abort", "abc"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot reach the FL server at 127.0.0.1:" in err
    assert "--workspace W`" not in err
    if in_workspace:
        assert f"fedmed-federation start --workspace {(tmp_path / 'ws').resolve()}`" in err
    else:
        assert "ask whoever runs the server" in err


class _Session:
    """Stands in for NVFlare's admin Session where only a running server could answer: the meta and job list it
    returns have NVFlare's shape (status, job_deploy_detail, job_id), and its failure is NVFlare's NoConnection."""

    def __init__(self, meta=None, jobs=(), dies_after=None, server_log=None):
        self.meta, self.jobs, self.dies_after, self.calls = meta or {}, list(jobs), dies_after, 0
        self.server_log, self.aborted = server_log, []

    def submit_job(self, folder):
        return "4f2a9c10-0000-4000-8000-000000000001"

    def get_job_meta(self, job_id):
        self.calls += 1
        if self.dies_after is not None and self.calls > self.dies_after:
            raise NoConnection("cannot connect to server")
        return self.meta

    def download_job_result(self, job_id, dest=None):
        """The job's result folder as NVFlare lays it out, holding the server's log.txt."""
        result = Path(dest) / job_id
        (result / "workspace").mkdir(parents=True)
        (result / "workspace" / "log.txt").write_text(self.server_log or "")
        return str(result)

    def abort_job(self, job_id):
        self.aborted.append(job_id)

    def list_jobs(self, id_prefix=None, **_):
        return [{"job_id": j} for j in self.jobs if j.startswith(id_prefix or "")]

    def close(self):
        raise NoConnection("server gone")  # closing a dead server's session must not raise either


def _follow(monkeypatch, tmp_path, session):
    monkeypatch.setattr(submit_job, "open_session", lambda *a, **k: session)
    kit = _kit(tmp_path, 1, in_workspace=False)
    polling = submit_job.Polling(interval=0.01)
    return submit_job.submit_and_follow(kit, "admin@fedmed.org", tmp_path / "job", 60, polling=polling)


def test_a_server_that_dies_mid_job_is_one_line_naming_the_job(monkeypatch, tmp_path):
    session = _Session(meta={"status": "RUNNING"}, dies_after=2)
    with pytest.raises(SubmitError) as e:
        _follow(monkeypatch, tmp_path, session)
    (line,) = str(e.value).splitlines()
    assert line.startswith("lost the FL server at 127.0.0.1:1 while job 4f2a9c10-") and "was RUNNING" in line
    assert "NoConnection" in line and "--resume" in line


def test_a_job_the_sites_refused_to_start_names_each_cause_once(monkeypatch, tmp_path):
    detail = ["server: OK", *(f"{h}: privacy scope 'rehersal' is not allowed" for h in HOSPITALS)]
    session = _Session(meta={"status": submit_job.FAILED_TO_RUN, "job_deploy_detail": detail})
    with pytest.raises(SubmitError) as e:
        _follow(monkeypatch, tmp_path, session)
    text = str(e.value)
    assert text.count("privacy scope 'rehersal' is not allowed") == 1 and ", ".join(HOSPITALS) in text
    assert text.splitlines()[0].endswith("did not start (FINISHED:FAILED_TO_RUN)")


# The server's log of a job whose every hospital refused round 1 (the controller's lines, as NVFlare writes them).
SITE_SETTINGS = "the job sets site_config='/tmp/x.json'; this hospital takes its site config ... never from a job"
_PREFIX = "2026-12-07 13:00:00,000 - FedMedController - {} - [identity=fedmed, run=4f2a9c10] - "
ALL_REFUSED_LOG = "\n".join(
    [
        _PREFIX.format("INFO") + "round 1/1: sending the global model to ['hospital-a', 'hospital-b', 'hospital-c']",
        *(_PREFIX.format("WARNING") + f"round 1: {h} refused the round: {SITE_SETTINGS}" for h in HOSPITALS[:2]),
        _PREFIX.format("WARNING") + "round 1: hospital-c cannot take part: set-up failed at the site: "
        "FileNotFoundError: data.root /mnt/pacs does not exist",
        _PREFIX.format("ERROR") + "run 9b1f failed: RuntimeError: round 1: 0 valid, trusted update(s), min_clients is "
        "2; not aggregating (the global model is left unchanged)",
    ]
)


def test_a_job_that_started_and_failed_because_every_site_refused_is_one_line_per_cause(monkeypatch, tmp_path):
    # no --db-url: the causes come from the server's log in the downloaded result
    session = _Session(meta={"status": "FINISHED:EXECUTION_EXCEPTION"}, server_log=ALL_REFUSED_LOG)
    monkeypatch.setattr(submit_job, "open_session", lambda *a, **k: session)
    kit = _kit(tmp_path, 1, in_workspace=False)
    with pytest.raises(JobFailed) as e:
        submit_job.submit_and_follow(
            kit, "admin@fedmed.org", tmp_path / "job", 60, out=tmp_path / "out", polling=submit_job.Polling(0.01)
        )
    first, *causes = str(e.value).splitlines()
    assert first.startswith("job 4f2a9c10-") and "ended FINISHED:EXECUTION_EXCEPTION: its run failed (RuntimeError: "
    assert "min_clients is 2" in first
    assert causes == [
        f"  hospital-a, hospital-b refused (from round 1): {SITE_SETTINGS}; fix: leave that option out of the job: "
        "each hospital sets it in its own kit (local/fedmed_site.json, its environment)",
        "  hospital-c missing (from round 1): set-up failed at the site: FileNotFoundError: data.root /mnt/pacs does "
        "not exist; fix: the hospital's IT fixes it (`site_configs/install.sh --check <kit>`, docs/hospital_it.md); "
        "the next job reads the site's settings again",
    ]
    assert e.value.outcome.result_dir.is_dir()  # the result is downloaded all the same


def test_the_failed_runs_causes_come_from_the_database_when_there_is_one(tmp_path):
    outcome = JobOutcome("4f2a", "FINISHED:EXECUTION_EXCEPTION", None, 1.0, 2.0)
    causes = Causes()
    for h in HOSPITALS:
        causes.add(1, h, "refused", "this site's privacy policy requires DP-SGD; the job must use norm='group'")
    lines = failure_lines(outcome, {"status": "failed"}, causes)
    assert lines[0] == "job 4f2a ended FINISHED:EXECUTION_EXCEPTION: its run failed"
    assert lines[1:] == [
        "hospital-a, hospital-b, hospital-c refused (from round 1): this site's privacy policy requires DP-SGD; the "
        "job must use norm='group'; fix: submit with -- --norm group"
    ]
    # a run that finished (NVFlare may still say ABNORMAL) or an admin's abort names no cause: exit 1, not 2
    assert failure_lines(outcome, {"status": "finished"}, causes) == []
    assert failure_lines(JobOutcome("4f2a", "FINISHED:ABORTED", None, 1.0, 2.0), None, Causes()) == []


def test_fedmed_submit_exits_2_with_each_cause_for_a_job_whose_run_failed(monkeypatch, tmp_path, capsys):
    session = _Session(meta={"status": "FINISHED:EXECUTION_EXCEPTION"}, server_log=ALL_REFUSED_LOG)
    monkeypatch.setattr(submit_job, "open_session", lambda *a, **k: session)
    monkeypatch.setattr(submit_job, "probe_server", lambda kit: ("127.0.0.1", 1))
    monkeypatch.setattr(submit_job, "export_job", lambda dest, args: _job_folder(dest))
    kit = _kit(tmp_path, 1, in_workspace=False)
    assert submit_job.main(["--kit", str(kit), "--out", str(tmp_path / "out"), "--", "--rounds", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("fedmed-submit: job 4f2a9c10-") and "its run failed" in err[0]
    assert [line.split(" (from")[0] for line in err[1:]] == [
        "  hospital-a, hospital-b refused",
        "  hospital-c missing",
    ]
    assert all("; fix: " in line for line in err[1:])


def _job_folder(dest: Path) -> Path:
    """An exported job's server config, as job.py --export-job writes it (the rounds exported_num_rounds reads)."""
    cfg = dest / "cxr_densenet" / "app_server" / "config"
    cfg.mkdir(parents=True)
    workflow = {"path": "fedmed.flare.controller.FedMedController", "args": {"job": {"num_rounds": 1}}}
    (cfg / "config_fed_server.json").write_text(json.dumps({"workflows": [workflow]}))
    return dest / "cxr_densenet"


def test_a_job_past_its_timeout_is_aborted_and_said_in_one_line(monkeypatch, tmp_path):
    session = _Session(meta={"status": "RUNNING"})
    monkeypatch.setattr(submit_job, "open_session", lambda *a, **k: session)
    kit = _kit(tmp_path, 1, in_workspace=False)
    with pytest.raises(SubmitError) as e:
        submit_job.submit_and_follow(kit, "admin@fedmed.org", tmp_path / "job", 0.05, polling=submit_job.Polling(0.01))
    (line,) = str(e.value).splitlines()
    assert line.startswith("job 4f2a9c10-") and "still RUNNING after 0s, so it was aborted" in line
    assert "--timeout" in line and session.aborted == ["4f2a9c10-0000-4000-8000-000000000001"]


@pytest.mark.parametrize(
    "given, jobs, expected",
    [
        ("4f2a", ["4f2a9c10-1", "9b000000-2"], "4f2a9c10-1"),  # a unique prefix of the job id
        ("4f2a9c10-1", ["4f2a9c10-1", "4f2a9c10-10"], "4f2a9c10-1"),  # the whole id
    ],
)
def test_abort_takes_a_job_id_prefix(given, jobs, expected):
    assert submit_job.resolve_job_id(_Session(jobs=jobs), given) == expected


def test_abort_refuses_an_ambiguous_or_unknown_prefix():
    session = _Session(jobs=["4f2a9c10-1", "4f2b0000-2"])
    with pytest.raises(SubmitError, match=r"--abort: '4f2' is the start of 2 jobs"):
        submit_job.resolve_job_id(session, "4f2")
    with pytest.raises(SubmitError, match="--abort: no job 'ee' on the server"):
        submit_job.resolve_job_id(session, "ee")


@pytest.mark.parametrize("cmd", ["start", "status", "stop", "stop-site"])
def test_federation_commands_on_an_unprovisioned_workspace_say_so(cmd, tmp_path, capsys):
    args = [cmd, "--workspace", str(tmp_path / "fresh")] + (["hospital-a"] if cmd == "stop-site" else [])
    assert federation.main(args) == 2
    captured = capsys.readouterr()
    (line,) = captured.err.strip().splitlines()
    assert "is not a provisioned federation" in line and "fedmed-federation provision --workspace" in line
    assert "processes: none" not in captured.out


def test_start_before_provision_is_one_line_without_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "federation.py"), "start", "--workspace", str(tmp_path / "w")],
        capture_output=True,
        text=True,
        timeout=600,  # the import alone took over a minute on the loaded shared machine
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "provision --workspace" in proc.stderr


def test_submit_to_an_unprovisioned_workspace_is_one_line(tmp_path, capsys):
    assert submit_job.main(["--workspace", str(tmp_path / "none"), "--", "--rounds", "1"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "fedmed-federation provision --workspace" in line


def test_a_server_that_dies_during_abort_is_one_line(monkeypatch, tmp_path, capsys):
    session = _Session()

    def gone(**_):
        raise NoConnection("cannot connect to server")

    session.list_jobs = gone
    monkeypatch.setattr(submit_job, "open_session", lambda *a, **k: session)
    kit = _kit(tmp_path, 1, in_workspace=False)
    assert submit_job.main(["--kit", str(kit), "--abort", "4f2a"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("fedmed-submit: lost the FL server (NoConnection")


def test_the_admin_commands_start_without_torch_or_scikit_learn():
    # `fedmed-federation status` and `fedmed-submit --abort` took 6-14 s on a quiet machine, 22-27 s on the loaded
    # shared one, mostly importing torch, MONAI and scikit-learn through the repository module (fedmed.server.crosssite ->
    # fedmed.job.tasks) and JobConfig, which neither command uses; now 1.4 s there
    code = (
        "import sys, fedmed.cli.federation, fedmed.cli.submit_job; "
        "print(sorted(m for m in ('torch', 'sklearn', 'monai', 'scipy', 'numba') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, check=True)
    assert out.stdout.strip() == "[]"


def test_a_hospitals_processes_do_not_load_the_servers_compiler():
    # the site round imports the server's result types (fedmed.server.rounds); numba, which only the server's kernels
    # use (fedmed.server.kernels), would cost each hospital process ~0.25 s and ~55 MB at start
    code = "import sys, fedmed.flare.executor, fedmed.cli.infer; print('numba' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, check=True)
    assert out.stdout.strip() == "False"


def test_submit_reads_the_exported_jobs_settings_without_importing_torch(tmp_path):
    # fedmed-submit read the exported job's rounds and run options through JobConfig, importing torch, MONAI and
    # scikit-learn into the admin's process (9-27 s here); the exported Controller's `job` argument holds every
    # setting, defaults included, read as JSON
    from dataclasses import MISSING, fields

    from fedmed.job.jobconfig import JobConfig

    code = (
        "import json, sys; from pathlib import Path; import fedmed.cli.submit_job as s; "
        f"f = s.export_job(Path({str(tmp_path)!r}), ['--rounds', '3', '--scope', 'rehearsal']); "
        "a = s.exported_controller_args(f); "
        "print(json.dumps([s.exported_num_rounds(f), a, [m for m in ('torch', 'monai', 'sklearn') if m in sys.modules]]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, check=True)
    rounds, args, heavy = json.loads(out.stdout.strip().splitlines()[-1])
    assert rounds == 3 and heavy == []
    assert [p.name for p in tmp_path.iterdir()] == ["cxr_densenet"]  # the job folder alone: no defaults file beside
    defaults = {f.name: f.default for f in fields(JobConfig) if f.default is not MISSING}
    assert {k: args[k] for k in ("aggregation", "he_layers", "norm", "image_size", "trust_ok_ratio")} == {
        k: defaults[k] for k in ("aggregation", "he_layers", "norm", "image_size", "trust_ok_ratio")
    }


def test_a_job_folder_without_the_controllers_settings_is_refused_naming_the_file(tmp_path):
    cfg = tmp_path / "other" / "app_server" / "config"
    cfg.mkdir(parents=True)
    (cfg / "config_fed_server.json").write_text(json.dumps({"workflows": [{"path": "x.FedAvg", "args": {}}]}))
    with pytest.raises(SubmitError, match=r"config_fed_server\.json has no FedMedController workflow with a `job`"):
        submit_job.exported_num_rounds(tmp_path / "other")


def test_an_admin_whose_role_may_not_submit_is_one_line_naming_the_fix(monkeypatch, tmp_path):
    # NVFlare's answer to a `member` admin's submit_job (tests/test_deployment.py sees it from a real server)
    from nvflare.fuel.flare_api.api_spec import AuthorizationError

    session = _Session()

    def refused(folder):
        raise AuthorizationError("user not authorized for the action 'submit_job'")

    session.submit_job = refused
    monkeypatch.setattr(submit_job, "open_session", lambda *a, **k: session)
    kit = _kit(tmp_path, 1, in_workspace=False)
    with pytest.raises(SubmitError) as e:
        submit_job.submit_and_follow(kit, "member@fedmed.org", tmp_path / "job", 60)
    (line,) = str(e.value).splitlines()
    assert (
        line.startswith("member@fedmed.org may not submit jobs (user not authorized") and "project admin's kit" in line
    )
