"""A real provisioned federation on 127.0.0.1: mTLS startup kits, separate processes, the admin API.

One federation serves every scenario (start-up is paid once): a rogue hospital kit and a `member` admin are refused;
the admin's job completes 2 rounds on 3 hospitals; a hospital killed mid-run is recorded missing while the job
completes; the server killed mid-job is restarted and the run ends 'interrupted' with its rounds kept, then
`fedmed-submit --resume` continues it in a new job.
Every process is stopped by its PID in the fixture's finaliser, whatever happens.
"""

import json
import random
import signal
import socket
import time
from pathlib import Path

import pytest

from fedmed.cli.federation import PROJECT_ADMIN, Federation
from fedmed.cli.submit_job import COMPLETED, JobFailed, SubmitError, submit_and_follow
from fedmed.store.repository import Repository
from jobscripts import load_job_script
from test_provision import HOSPITALS, write_site_configs

pytestmark = pytest.mark.integration


def _free_port() -> int:
    """A loopback port nothing listens on now, below Linux's ephemeral range (32768+) so no outgoing connection takes
    it before the server binds it: two test sessions, or a developer's federation, never collide on a fixed one."""
    rng = random.Random()  # seeded from the OS: each session draws its own
    for _ in range(100):
        port = rng.randrange(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free loopback port in 20000-32000 after 100 tries")


PORT = _free_port()
THREADS = {"OMP_NUM_THREADS": "1"}
JOB_TIMEOUT = 240
USER_DP_SCOPE = "rehearsal_user_dp"
# The test server kit's heart_beat_timeout (site_configs/server/ sets 60 s): how long a hospital whose whole site died
# holds up a round. Hospitals beat every 10 s, so 30 s still leaves two beats' slack; the scenario that waits it out
# takes half a minute less.
HEART_BEAT_TIMEOUT = 30
DEAD_CLIENT_GRACE = 10  # NVFLARE_DEAD_CLIENT_GRACE_PERIOD in site_configs/server/fedmed.env


def _export(dest: Path, **kw) -> Path:
    mod = load_job_script("cxr_densenet")
    # Synthetic data: the hospitals' "rehearsal" privacy scope (no DP ceiling); their default scope demands DP-SGD.
    kw.setdefault("privacy_scope", "rehearsal")
    # Only the admin's two-round job checks the whole default path; the scenarios check rounds, not the cross-site
    # evaluation after them (each would add a step the server waits for the hospitals in).
    kw.setdefault("cross_site_eval", False)
    job = mod.build_job(image_size=64, batch_size=4, min_clients=2, **kw)
    job.export_job(str(dest))
    return dest / job.name


def _wait_for(predicate, timeout: float, what: str, poll: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise TimeoutError(f"{what} not seen within {timeout:.0f}s")


def _submit_until_first_round(session, repo: Repository, job: Path) -> tuple:
    """Submit as the session's admin; return (job id, run id) once the server has recorded round 1."""
    job_id = session.submit_job(str(job))

    def first_round():
        from sqlalchemy.exc import OperationalError

        try:
            run_id = repo.run_id_for_job(job_id)
        except OperationalError:  # the first job of a fresh database: the server has not created it yet
            return None
        return run_id if run_id is not None and repo.rounds_table(run_id) else None

    return job_id, _wait_for(first_round, JOB_TIMEOUT, f"round 1 of job {job_id} recorded")


@pytest.fixture(scope="module")
def federation(tmp_path_factory, tiny_hospitals):
    root = tmp_path_factory.mktemp("deploy")
    fed = Federation(root / "fed")
    db_url = f"sqlite:///{root / 'fedmed.db'}"
    fed.provision(port=PORT, db_url=db_url, site_configs=write_site_configs(root / "configs", tiny_hospitals))
    resources = fed.kit("server") / "local" / "resources.json"  # read when the server starts
    merged = json.loads(resources.read_text())
    merged["servers"][0]["heart_beat_timeout"] = HEART_BEAT_TIMEOUT
    resources.write_text(json.dumps(merged, indent=2))
    for site in HOSPITALS:  # a scope with the hospitals' own user-level DP filter (read when the site starts)
        path = fed.kit(site) / "local" / "privacy.json"
        policy = json.loads(path.read_text())
        policy["scopes"].append(
            {
                "name": USER_DP_SCOPE,
                "properties": {"fedmed_privacy": None},
                "task_result_filters": [
                    {
                        "path": "fedmed.flare.filters.UpdateNoiseFilter",
                        # noise std 0.01 x 2 x 0.5 = 0.01 a weight: the aggregate stays a usable model (std 1.0
                        # gave NaN outputs, which the sites now refuse to train on and the server never keeps as best)
                        "args": {"clip_norm": 0.5, "noise_multiplier": 0.01},
                    }
                ],
            }
        )
        path.write_text(json.dumps(policy))
    fed.db_url = db_url
    fed.timings = {}
    try:
        yield fed
    finally:
        fed.stop()
        assert not fed.running()


@pytest.fixture
def federation_up(federation):
    """The shared federation with the server and every hospital registered: the tests below share one federation
    for its start-up cost, yet each can run alone (pytest -k) and starts only what is not running already."""
    federation.start(HOSPITALS, timeout=120, env=THREADS)
    return federation


def _log_has(path: Path, text: str) -> bool:
    return path.is_file() and text in path.read_text(errors="replace")


def test_rogue_kit_and_member_admin_are_refused(federation, tmp_path):
    fed = federation
    t0 = time.monotonic()
    fed.start_site("server", env=THREADS)
    for site in HOSPITALS[:2]:
        fed.start_site(site, env=THREADS)
    fed.wait_registered(HOSPITALS[:2], timeout=120)
    fed.timings["server_and_2_hospitals_up_s"] = time.monotonic() - t0
    # hospital-c's kit from ANOTHER provisioning (its own root CA), pointed at this server.
    rogue = Federation(tmp_path / "rogue")
    rogue.provision(port=PORT, install_sites=False)
    from fedmed.cli.install_kit import install

    install(
        rogue.kit("hospital-c"),
        "hospital-c",
        site_config=fed.kit("hospital-c") / "local" / "fedmed_site.json",
        check_import=False,
    )
    # It trusts another root CA, so the TLS handshake fails (the hospital aborts it on our server's certificate;
    # NVFlare's server logs nothing for a handshake that never completed) and it never registers.
    fed.start_site("rogue-hospital-c", kit=rogue.kit("hospital-c"), env=THREADS)
    rogue_console = rogue.kit("hospital-c") / "console.log"
    _wait_for(lambda: _log_has(rogue_console, "CERTIFICATE_VERIFY_FAILED"), 60, "the rogue kit's handshake failing")
    assert fed.connected_clients() == HOSPITALS[:2]
    assert not _log_has(rogue.kit("hospital-c") / "log.txt", "Successfully registered client")
    assert not _log_has(fed.kit("server") / "log.txt", "client hospital-c registered")
    fed.stop_site("rogue-hospital-c")

    t0 = time.monotonic()
    fed.start_site("hospital-c", env=THREADS)
    fed.wait_registered(HOSPITALS, timeout=120)
    fed.timings["hospital_joins_s"] = time.monotonic() - t0

    from nvflare.fuel.flare_api.api_spec import AuthorizationError

    job = _export(tmp_path / "job", num_rounds=1)
    member = fed.session("member@hospital-b.org")
    try:
        with pytest.raises(AuthorizationError, match="not authorized"):
            member.submit_job(str(job))
        assert member.list_jobs() == []  # nothing was submitted
    finally:
        member.close()


def test_admin_job_completes_two_rounds_on_three_hospitals(federation_up, tmp_path):
    fed = federation_up
    job = _export(tmp_path / "job", num_rounds=2, straggler_wait=30, cross_site_eval=True)
    out = submit_and_follow(
        fed.kit(PROJECT_ADMIN),
        PROJECT_ADMIN,
        job,
        JOB_TIMEOUT,
        out=tmp_path / "results",
        db_url=fed.db_url,
        num_rounds=2,
    )
    assert out.status == COMPLETED
    assert out.result_dir is not None and (out.result_dir / "workspace").exists()
    repo = Repository(fed.db_url, create_schema=False)
    try:
        run_id = repo.run_id_for_job(out.job_id)
        assert repo.get_run(run_id).status == "finished"
        rows = repo.rounds_table(run_id)
        assert [r.round_num for r in rows] == [1, 2]
        assert all(set(r.sites_accepted) == set(HOSPITALS) and r.sites_other == () for r in rows)
        updates = repo.client_updates(run_id)
        assert len(updates) == 6 and all(u["num_samples"] > 0 and u["val_score"] is not None for u in updates)
        assert repo.verify_audit() is None
        # The kits hold signing keys, so every update was signed, verified by the server and stored with its
        # signature; the keyed record and every stored signature verify offline with the hospitals' public keys.
        from fedmed.security import signing

        assert all(u["signature"] and u["signed_digest"] for u in updates)
        report = repo.audit_report(signing.load_public_keys_dir(fed.kit("server") / "local" / signing.SITE_KEYS_DIR))
        assert not report.problems, report.problems
        assert report.signatures_checked >= 6
        # Round 2's global model carried round 1's signed chain head: each hospital kept it in its own local/, and
        # the record matches every hospital's receipts (fedmed.store.receipts).
        from fedmed.store import receipts

        for site in HOSPITALS:
            log = fed.kit(site) / "local" / receipts.RECEIPTS_FILE
            kept = [r for _, r in receipts.read_receipts(log) if r is not None and r.run == repo.get_run(run_id).uid]
            assert [r.round for r in kept] == [1], (site, kept)
            server_pub = signing.load_public_keys(fed.kit(site) / "local" / signing.SERVER_KEY_FILE)
            assert repo.check_receipts(log, server_pub) == (len(receipts.read_receipts(log)), [])
            # ... and signed it into its round-2 update, which the server checked against its record (fedmed.server.anchors)
            anchor = [a for a in repo.site_anchors(run_id) if a["site"] == site and a["round"] == 2]
            assert [(a["receipt_entry"], a["receipt_mac"]) for a in anchor] == [(kept[0].entry, kept[0].mac)], anchor
        assert not [a for a in repo.alerts(run_id) if a["kind"] in ("receipt_mismatch", "ledger_reset")]
    finally:
        repo.close()
    fed.timings.update(submit_s=out.submit_seconds, job_s=out.run_seconds, round_gaps_s=out.round_seconds)
    print(f"\nmeasured: {fed.timings}")


def test_user_level_filter_rounds_are_charged_to_each_hospitals_ledger(federation_up, tmp_path):
    from fedmed.privacy.ledger import PrivacyLedger

    fed = federation_up
    job = _export(tmp_path / "job", num_rounds=1, straggler_wait=30)
    meta = json.loads((job / "meta.json").read_text())
    (job / "meta.json").write_text(json.dumps({**meta, "scope": USER_DP_SCOPE}))
    out = submit_and_follow(
        fed.kit(PROJECT_ADMIN),
        PROJECT_ADMIN,
        job,
        JOB_TIMEOUT,
        out=tmp_path / "results",
        db_url=fed.db_url,
        num_rounds=1,
    )
    assert out.status == COMPLETED
    repo = Repository(fed.db_url, create_schema=False)
    try:
        run_id = repo.run_id_for_job(out.job_id)
        ups = repo.client_updates(run_id)
        assert {u["site"]: u["status"] for u in ups} == {s: "accepted" for s in HOSPITALS}
        anchors = {a["site"]: a for a in repo.site_anchors(run_id)}  # the signed ledger heads (fedmed.server.anchors)
        assert not [a for a in repo.alerts(run_id) if a["kind"] == "ledger_reset"]
    finally:
        repo.close()
    for site in HOSPITALS:  # charged in the kit's local/, before the update left the hospital
        ledger = PrivacyLedger(fed.kit(site) / "local" / "privacy_ledger.jsonl")
        # the head the server recorded is the ledger with this round's filter charge (re-reported by the filter)
        assert (anchors[site]["ledger_entries"], anchors[site]["ledger_head"]) == (len(ledger.entries()), ledger.head())
        mine = [e for e in ledger.entries() if e.job_id == out.job_id]
        assert [(e.mechanism, e.round) for e in mine] == [("user_level", 0)] and ledger.verify() is None
        # 0.01 x 2C
        assert mine[0].details["relation"] == "replace" and mine[0].details["noise_std"] == pytest.approx(0.01)
        assert mine[0].history == ((0.01, 1.0, 1),)  # std / 2C at the example level


def _patch_executor_args(job: Path, **args) -> Path:
    """What a hostile submitter edits in the exported job: the hospitals' executor arguments."""
    for cfg_path in job.rglob("config_fed_client.json"):
        cfg = json.loads(cfg_path.read_text())
        for ex in cfg["executors"]:
            ex["executor"]["args"].update(args)
        cfg_path.write_text(json.dumps(cfg))
    return job


@pytest.mark.parametrize(
    "arg, value",
    [
        # the submitter's own site config (e.g. without a privacy policy) and own CKKS context (a secret key it knows)
        ("site_config", "/tmp/submitter/fedmed_site.json"),
        ("he_context_file", "/tmp/submitter/client_context.tenseal"),
    ],
)
def test_a_job_naming_its_own_site_settings_is_refused_by_every_hospital(federation_up, tmp_path, arg, value):
    fed = federation_up
    job = _patch_executor_args(_export(tmp_path / "job", num_rounds=1, straggler_wait=5), **{arg: value})
    with pytest.raises(JobFailed) as failed:  # the job started, then every hospital refused its round
        submit_and_follow(
            fed.kit(PROJECT_ADMIN),
            PROJECT_ADMIN,
            job,
            JOB_TIMEOUT,
            out=tmp_path / "results",
            db_url=fed.db_url,
            num_rounds=1,
        )
    out = failed.value.outcome
    assert out.status != COMPLETED
    # what the admin reads (fedmed-submit exits 2): how the job ended, then one line for the one cause, with the fix
    first, *causes = str(failed.value).splitlines()
    assert first.startswith(f"job {out.job_id} ended FINISHED:") and "its run failed" in first, first
    assert causes == [
        f"  {', '.join(HOSPITALS)} refused (from round 1): {out.not_counted[0][3]}; fix: leave that option out of "
        "the job: each hospital sets it in its own kit (local/fedmed_site.json, its environment)"
    ], causes
    repo = Repository(fed.db_url, create_schema=False)
    try:
        run_id = repo.run_id_for_job(out.job_id)
        assert repo.get_run(run_id).status == "failed"
        ups = repo.client_updates(run_id)
        assert {u["site"] for u in ups} == set(HOSPITALS) and all(u["status"] == "refused" for u in ups)
        assert all(f"the job sets {arg}={value!r}" in u["reason"] and "never from a job" in u["reason"] for u in ups)
        assert [r.sites_accepted for r in repo.rounds_table(run_id)] == [()]  # nothing trained, nothing aggregated
    finally:
        repo.close()
    # the reason is in the job's downloaded result (the server's log of the run)
    assert out.result_dir is not None
    logs = [p.read_text(errors="replace") for p in out.result_dir.rglob("log*.txt")]
    assert any(f"refused the round: the job sets {arg}" in text for text in logs)
    for site in HOSPITALS:  # and each hospital logged it at start-up, in its log of this job
        job_logs = (fed.kit(site) / out.job_id).rglob("log*.txt")
        assert any(_log_has(p, f"refuses this job: the job sets {arg}") for p in job_logs)


def test_a_hospital_whose_own_config_has_no_privacy_policy_refuses_unless_its_data_is_synthetic(
    federation_up, tmp_path
):
    # hospital-a's IT edits its installed config by hand: no privacy policy, data not marked synthetic. The job's
    # "rehearsal" scope sets no policy either, so nothing would bound what leaves: the hospital refuses the job.
    fed = federation_up
    cfg_path = fed.kit("hospital-a") / "local" / "fedmed_site.json"
    original = cfg_path.read_text()
    cfg_path.write_text(json.dumps({k: v for k, v in json.loads(original).items() if k != "synthetic_rehearsal"}))
    try:
        job = _export(tmp_path / "job", num_rounds=1, straggler_wait=30)
        out = submit_and_follow(
            fed.kit(PROJECT_ADMIN),
            PROJECT_ADMIN,
            job,
            JOB_TIMEOUT,
            out=tmp_path / "results",
            db_url=fed.db_url,
            num_rounds=1,
        )
    finally:
        cfg_path.write_text(original)  # read at each job's start: the next job sees it again
    assert out.status == COMPLETED  # the other two hospitals meet min_clients
    repo = Repository(fed.db_url, create_schema=False)
    try:
        ups = {u["site"]: u for u in repo.client_updates(repo.run_id_for_job(out.job_id))}
    finally:
        repo.close()
    assert ups["hospital-a"]["status"] == "refused"
    assert "no privacy policy applies to this job at hospital-a" in ups["hospital-a"]["reason"]
    assert ups["hospital-b"]["status"] == ups["hospital-c"]["status"] == "accepted"


def test_a_scope_typo_is_refused_by_every_hospital_and_said_once_at_the_admin(federation_up, tmp_path):
    # `-- --scope rehersal`: NVFlare's deployer at each hospital refuses a scope its privacy.json does not list; the
    # job ends FAILED_TO_RUN and the reason was only in the server kit's log.txt
    fed = federation_up
    job = _export(tmp_path / "job", num_rounds=1, privacy_scope="rehersal")
    with pytest.raises(SubmitError) as e:
        submit_and_follow(
            fed.kit(PROJECT_ADMIN), PROJECT_ADMIN, job, JOB_TIMEOUT, out=tmp_path / "results", db_url=fed.db_url
        )
    text = str(e.value)
    assert "did not start (FINISHED:FAILED_TO_RUN)" in text.splitlines()[0]
    assert text.count("privacy scope 'rehersal' is not allowed") == 1, text
    assert f"{', '.join(HOSPITALS)}: privacy scope 'rehersal' is not allowed; fix: give -- --scope NAME" in text, text


def test_a_hospital_whose_data_path_is_wrong_is_missing_at_once_with_the_reason(federation_up, tmp_path, capsys):
    # hospital-b's IT points the kit's local/fedmed_site.json at data that is not mounted, while the site runs:
    # no restart, the next job reads it. Its set-up fails; it answers the round at once with the reason instead
    # of leaving the server to wait straggler_wait (600 s here) for a site whose job died.
    fed = federation_up
    cfg_path = fed.kit("hospital-b") / "local" / "fedmed_site.json"
    original = cfg_path.read_text()
    cfg = json.loads(original)
    cfg["data"]["root"] = str(tmp_path / "not-mounted")
    cfg_path.write_text(json.dumps(cfg))
    try:
        job = _export(tmp_path / "job", num_rounds=1, straggler_wait=600)
        out = submit_and_follow(
            fed.kit(PROJECT_ADMIN),
            PROJECT_ADMIN,
            job,
            JOB_TIMEOUT,
            out=tmp_path / "results",
            db_url=fed.db_url,
            num_rounds=1,
        )
    finally:
        cfg_path.write_text(original)
    printed = capsys.readouterr().out
    assert out.status == COMPLETED  # hospital-a and -c meet min_clients
    assert out.run_seconds < 300, f"the job took {out.run_seconds:.0f}s: the round waited for hospital-b"
    repo = Repository(fed.db_url, create_schema=False)
    try:
        ups = {u["site"]: u for u in repo.client_updates(repo.run_id_for_job(out.job_id))}
    finally:
        repo.close()
    reason = ups["hospital-b"]["reason"]
    assert ups["hospital-b"]["status"] == "missing"
    assert reason.startswith("set-up failed at the site: FileNotFoundError") and "not-mounted" in reason
    assert ups["hospital-a"]["status"] == ups["hospital-c"]["status"] == "accepted"
    # printed by fedmed-submit, and kept in the downloaded result
    assert f"hospital-b missing (from round 1): {reason}" in printed and printed.count(reason) == 1  # once
    summary = json.loads((out.result_dir / "fedmed_summary.json").read_text())
    assert {"round": 1, "site": "hospital-b", "status": "missing", "reason": reason} in summary["sites"]
    assert out.models["best_model.pt"].is_file() and out.models["global_model.pt"].is_file()
    assert f"best model: {out.models['best_model.pt']}" in printed
    print(f"\nmeasured: job with a failing hospital {out.run_seconds:.0f}s (straggler_wait 600 s)")


def test_a_hospital_killed_mid_round_costs_the_round_the_heartbeat_timeout_not_the_straggler_wait(
    federation_up, tmp_path
):
    # The server kit: heart_beat_timeout HEART_BEAT_TIMEOUT (the fixture's), dead-client grace 10 s
    # (site_configs/server/). The round stops waiting for hospital-c once NVFlare drops it, records why, and later
    # rounds record it missing, not sent.
    fed = federation_up
    job = _export(tmp_path / "job", num_rounds=3, straggler_wait=600, local_epochs=3)
    session = fed.session()
    repo = Repository(fed.db_url, create_schema=False)
    try:
        job_id, run_id = _submit_until_first_round(session, repo, job)
        fed.stop_site("hospital-c", signal.SIGKILL)  # a crash while it trains round 2; nobody restarts it
        killed = time.monotonic()
        limit = HEART_BEAT_TIMEOUT + DEAD_CLIENT_GRACE + 120
        _wait_for(lambda: len(repo.rounds_table(run_id)) >= 2, limit, "round 2 recorded")
        round_2_after_kill = time.monotonic() - killed
        meta = session.wait_for_job(job_id, timeout=JOB_TIMEOUT)
        ups = {(u["round"], u["site"]): u for u in repo.client_updates(run_id)}
        assert repo.get_run(run_id).status == "finished", meta["status"]
        assert [r.round_num for r in repo.rounds_table(run_id)] == [1, 2, 3]  # numbered from 1
        assert ups[(2, "hospital-c")]["status"] == ups[(3, "hospital-c")]["status"] == "missing"
        assert "NVFlare" in ups[(2, "hospital-c")]["reason"] or "logged it out" in ups[(2, "hospital-c")]["reason"]
        assert ups[(3, "hospital-c")]["reason"].startswith("not sent this round: ")
        assert all(ups[(r, s)]["status"] == "accepted" for r in (2, 3) for s in HOSPITALS[:2])
        print(
            f"\nmeasured: round 2 recorded {round_2_after_kill:.0f}s after hospital-c was killed "
            f"(heart_beat_timeout {HEART_BEAT_TIMEOUT} s + grace {DEAD_CLIENT_GRACE} s; straggler_wait 600 s); "
            f"reason: {ups[(2, 'hospital-c')]['reason']}"
        )
    finally:
        repo.close()
        session.close()
    fed.start_site("hospital-c", env=THREADS)
    fed.wait_registered(HOSPITALS, timeout=120)


def test_hospital_killed_mid_run_is_recorded_missing_and_the_job_completes(federation_up, tmp_path):
    fed = federation_up
    # 3 local epochs: the kill lands while hospital-c trains round 2.
    job = _export(tmp_path / "job", num_rounds=2, straggler_wait=15, local_epochs=3)
    session = fed.session()
    repo = Repository(fed.db_url, create_schema=False)
    try:
        job_id, run_id = _submit_until_first_round(session, repo, job)
        fed.stop_site("hospital-c", signal.SIGKILL)  # a crash: no goodbye to the server
        # IT restarts it; its first heartbeat tells the server it has no process for this job, which settles the
        # job's wait for hospital-c's outcome (otherwise NVFlare waits for the 600 s heartbeat timeout).
        fed.start_site("hospital-c", env=THREADS)
        meta = session.wait_for_job(job_id, timeout=JOB_TIMEOUT)
        run = repo.get_run(run_id)
        ups = {(u["round"], u["site"]): u for u in repo.client_updates(run_id)}
        assert run.status == "finished", (run.status, meta["status"])
        assert [r.round_num for r in repo.rounds_table(run_id)] == [1, 2]
        assert ups[(1, "hospital-c")]["status"] == "accepted"
        assert ups[(2, "hospital-c")]["status"] == "missing"
        assert ups[(2, "hospital-a")]["status"] == ups[(2, "hospital-b")]["status"] == "accepted"
        # The server's workflow finished every round, but NVFlare 2.9 never got hospital-c's job outcome; it ends the
        # job COMPLETED or ABNORMAL depending on whether hospital-c's restart or the job's end came first.
        assert meta["status"] in (COMPLETED, "FINISHED:ABNORMAL")
        print(f"\nNVFlare job status after a hospital crash: {meta['status']}")
    finally:
        repo.close()
        session.close()
    fed.wait_registered(HOSPITALS, timeout=120)


def test_server_killed_mid_job_ends_the_run_interrupted_with_its_rounds(federation_up, tmp_path):
    # NVFlare 2.9 does not resume a job after a server restart; fedmed.flare.recovery closes it on start-up. The
    # hospitals' user-level DP filter charges each round to their ledgers, which the resumption below continues.
    fed = federation_up
    job = _export(tmp_path / "job", num_rounds=4, straggler_wait=30, privacy_scope=USER_DP_SCOPE)
    session = fed.session()
    repo = Repository(fed.db_url, create_schema=False)
    try:
        job_id, run_id = _submit_until_first_round(session, repo, job)
        session.close()
        # killed once round 2 is recorded and a hospital has charged round 3 (wire round 2) to its ledger, before
        # the server records round 3: the resumption re-runs round 3, which that hospital must not charge twice
        _wait_for(lambda: len(repo.rounds_table(run_id)) >= 2, JOB_TIMEOUT, "round 2 recorded", poll=0.05)
        _wait_for(lambda: _charged_round(fed, job_id, 2), JOB_TIMEOUT, "a hospital charged round 3", poll=0.05)
        fed.stop_site("server", signal.SIGKILL)
        recorded = [r.round_num for r in repo.rounds_table(run_id)]
        assert repo.get_run(run_id).status == "running"  # what the dead server left behind
        fed.start_site("server", env=THREADS)
        fed.wait_registered(HOSPITALS, timeout=120)
        session = fed.session()
        assert session.get_job_meta(job_id)["status"] == "FINISHED:ABNORMAL"
        run = repo.get_run(run_id)
        assert run.status == "interrupted" and run.finished_at is not None
        assert [r.round_num for r in repo.rounds_table(run_id)] == recorded == [1, 2]
        # This scope's user-level noise (std 1.0 on every weight) can leave an aggregate whose outputs overflow: such
        # a round is alerted global_model_unusable and never best; the best round is among the usable ones, if any.
        unusable = {a["round"] for a in repo.alerts(run_id) if a["kind"] == "global_model_unusable"}
        usable = [r for r in recorded if r not in unusable]
        assert run.best_round in usable if usable else run.best_round is None
        assert repo.verify_audit() is None
        assert _log_has(fed.kit("server") / "log.txt", f"job {job_id} was running when the server stopped")
    finally:
        repo.close()
        session.close()
    fed.interrupted = (job_id, run_id, run.uid)


def _charged_round(fed, job_id: str, wire_round: int) -> bool:
    """Whether any hospital's ledger holds a charge of this job's wire round (read-only: the ledger's shared lock)."""
    from fedmed.privacy.ledger import LedgerError, PrivacyLedger

    for site in HOSPITALS:
        try:
            entries = PrivacyLedger(fed.kit(site) / "local" / "privacy_ledger.jsonl").entries()
        except LedgerError:
            continue  # its first key or head file being written right now: read it at the next poll
        if any(e.job_id == job_id and e.round == wire_round for e in entries):
            return True
    return False


def test_the_interrupted_run_resumes_from_round_3_without_spending_any_round_twice(federation_up, tmp_path, capsys):
    # fedmed-submit --resume: a new NVFlare job continues the same run from round 2's recorded global model.
    from fedmed.cli.submit_job import main as submit_main
    from fedmed.privacy.accounting import epsilon_of
    from fedmed.privacy.ledger import PrivacyLedger

    fed = federation_up
    if not hasattr(fed, "interrupted"):
        pytest.skip("needs the interrupted run of test_server_killed_mid_job_ends_the_run_interrupted_with_its_rounds")
    first_job, run_id, uid = fed.interrupted
    job_options = ["--rounds", "4", "--image-size", "64", "--batch-size", "4", "--min-clients", "2"]
    job_options += ["--straggler-wait", "30", "--scope", USER_DP_SCOPE, "--no-cross-site-eval"]
    admin = ["--kit", str(fed.kit(PROJECT_ADMIN)), "--user", PROJECT_ADMIN, "--db-url", fed.db_url]
    admin += ["--timeout", str(JOB_TIMEOUT), "--out", str(tmp_path / "results")]
    t0 = time.monotonic()
    assert submit_main([*admin, "--resume", uid[:8], "--", *job_options]) == 0
    resumed_s = time.monotonic() - t0
    printed = capsys.readouterr().out
    assert f"resuming run {uid} from round 3" in printed
    repo = Repository(fed.db_url, create_schema=False)
    try:
        run = repo.get_run(run_id)
        (resumption,) = repo.resumptions(run_id)
        second_job = resumption["job_id"]
        assert (resumption["from_round"], resumption["previous_status"]) == (3, "interrupted")
        assert repo.run_id_for_job(second_job) == run_id and second_job != first_job
        assert run.status == "finished"
        assert [r.round_num for r in repo.rounds_table(run_id)] == [1, 2, 3, 4]  # the same run, no round twice
        assert {u["site"] for u in repo.client_updates(run_id) if u["round"] == 4} == set(HOSPITALS)
        # rounds 3-4 were signed for the new job id and verified by the server; the record and every stored
        # signature verify offline
        from fedmed.security import signing

        assert all(u["signature"] for u in repo.client_updates(run_id) if u["round"] >= 3)
        report = repo.audit_report(signing.load_public_keys_dir(fed.kit("server") / "local" / signing.SITE_KEYS_DIR))
        assert not report.problems, report.problems
        last_sha = repo.run_history(uid).rounds[-1][1]
    finally:
        repo.close()
    # the final global model, saved where the admin's download finds it, is the one round 4 recorded
    from fedmed.models.hashing import model_sha256
    from fedmed.models.weights import load_state

    (final,) = (tmp_path / "results").rglob("global_model.pt")
    params, meta = load_state(final)
    assert meta["round"] == 4 and model_sha256(params) == last_sha
    replayed = 0
    for site in HOSPITALS:  # each hospital's ledger: rounds 1-4 of this run charged once each (wire rounds 0-3)
        ledger = PrivacyLedger(fed.kit(site) / "local" / "privacy_ledger.jsonl")
        mine = [e for e in ledger.entries() if e.job_id in (first_job, second_job)]
        charged = [e for e in mine if e.replay_of is None]
        assert sorted(e.round for e in charged) == [0, 1, 2, 3], [(e.job_id, e.round, e.replay_of) for e in mine]
        assert [e.round for e in mine if e.job_id == second_job] == [2, 3] and ledger.verify() is None
        # a hospital that charged round 3 before the server died wrote a zero-cost replay line when it re-ran it
        for e in mine:
            if e.replay_of is not None:
                assert (e.job_id, e.round, e.history) == (second_job, 2, ())
                assert ledger.entries()[e.replay_of - 1].job_id == first_job
                replayed += 1
        mine = charged
        history = [h for e in mine for h in e.history]
        assert epsilon_of(history, mine[0].delta) == pytest.approx(epsilon_of(mine[0].history * 4, mine[0].delta))
        assert epsilon_of(history, mine[0].delta) < epsilon_of(mine[0].history * 6, mine[0].delta)
    assert replayed >= 1  # the server was killed after a hospital charged round 3
    print(f"\nmeasured: resumed run (export, rounds 3-4, final model) {resumed_s:.0f}s")


def test_hospital_it_stops_its_site_without_nvflares_interactive_stop_script(federation_up):
    # Last: the server keeps listing a stopped hospital until its heartbeat times out (HEART_BEAT_TIMEOUT), so a
    # test after this one would see it "registered" while it is not.
    from fedmed.cli.site import main as site_main
    from fedmed.cli.site import stop_kit

    fed = federation_up
    if "hospital-a" not in fed.running():
        fed.start_site("hospital-a", env=THREADS)
    pid = fed.running()["hospital-a"]
    stopped = stop_kit(fed.kit("hospital-a"))
    assert pid in stopped and "hospital-a" not in fed.running()
    assert not (fed.kit("hospital-a") / "fedmed_site.pid").exists()
    assert site_main(["stop", str(fed.kit("hospital-a"))]) == 0  # again: nothing left to stop, and it says so


_RUNTIME_LOGS = {"log.txt", "log_fl.txt", "log.json", "error_log.txt", "console.log"}


def _kit_files(kits: Path) -> dict:
    """sha256 of every file of every kit, except the logs the running sites append to (a heartbeat may land there)
    and the server's job store (state/: NVFlare files an earlier job's late error logs there, not provisioning)."""
    import hashlib

    return {
        str(p.relative_to(kits)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in kits.rglob("*")
        if p.is_file() and p.name not in _RUNTIME_LOGS and "state" not in p.relative_to(kits).parts[1:2]
    }


def test_a_hospital_added_to_the_running_federation_trains_in_the_next_job(federation_up, tmp_path):
    # Last: hospital-d stays in the federation. The server keeps running: hospital-d's certificate is signed by the
    # same root CA, and the server reads its public signing key (local/site_keys/) when the next job starts.
    from dataclasses import replace

    from fedmed.data.synthetic import DEFAULT_HOSPITALS, generate_hospitals
    from fedmed.paths import SITE_CONFIGS

    fed = federation_up
    sites = ["hospital-b", "hospital-c"]  # hospital-a was stopped by its IT in the test before
    for site in ["server", *sites]:
        if site not in fed.running():
            fed.start_site(site, env=THREADS)
    fed.wait_registered(sites, timeout=120)
    server_pid = fed.running()["server"]
    data = tmp_path / "data" / "hospital-d"
    generate_hospitals(
        tmp_path / "data",
        [replace(DEFAULT_HOSPITALS[0], name="hospital-d", num_images=12)],
        num_test=1,
        seed=11,
        size=96,
    )
    files = tmp_path / "hospital-d"  # what hospital-d's IT hands over: its data location and privacy policy
    files.mkdir()
    cfg = {
        "site_name": "hospital-d",
        "data": {"format": "dicom", "root": str(data / "dicom"), "labels_csv": str(data / "labels.csv")},
        "resources": {"num_threads": 1},
        "synthetic_rehearsal": True,
    }
    (files / "fedmed_site.json").write_text(json.dumps(cfg))
    (files / "privacy.json").write_text((SITE_CONFIGS / "hospital-a" / "privacy.json").read_text())

    kits = fed.kit("server").parent
    before = _kit_files(kits)
    t0 = time.monotonic()
    kit = fed.add_site("hospital-d", files)
    fed.timings["add_site_s"] = time.monotonic() - t0
    after = _kit_files(kits)
    changed = sorted(p for p in before if after.get(p) != before[p])
    assert changed == [], changed  # every file of every other kit, byte for byte
    assert sorted(set(after) - set(before)) == ["server/local/site_keys/hospital-d.pub"]
    assert fed.running()["server"] == server_pid  # not restarted
    try:
        t0 = time.monotonic()
        fed.start(["hospital-d"], timeout=120, env=THREADS)  # only hospital-d starts: the others run already
        fed.timings["hospital_d_registered_s"] = time.monotonic() - t0
        assert fed.running()["server"] == server_pid
        job = _export(tmp_path / "job", num_rounds=1, straggler_wait=30, sites=(*sites, "hospital-d"))
        out = submit_and_follow(
            fed.kit(PROJECT_ADMIN),
            PROJECT_ADMIN,
            job,
            JOB_TIMEOUT,
            out=tmp_path / "results",
            db_url=fed.db_url,
            num_rounds=1,
        )
        assert out.status == COMPLETED
        repo = Repository(fed.db_url, create_schema=False)
        try:
            ups = {u["site"]: u for u in repo.client_updates(repo.run_id_for_job(out.job_id))}
        finally:
            repo.close()
        assert set(ups) == {*sites, "hospital-d"} and all(u["status"] == "accepted" for u in ups.values())
        new = ups["hospital-d"]
        assert new["num_samples"] > 0 and new["aggregation_weight"] > 0  # it trained and counted
        assert new["signature"] and new["signed_digest"]  # signed with the key add-site gave the server
        assert (kit / out.job_id).is_dir()  # the job ran in the new kit
        # the job's live view in the downloaded server workspace: TensorBoard events and the report, with hospital-d
        tb = list((out.result_dir / "workspace").rglob("events.out.tfevents.*"))
        assert tb and "hospital-d" in (next((out.result_dir / "workspace").rglob("report.html"))).read_text()
    finally:
        fed.stop_site("hospital-d")
    print(f"\nmeasured: {fed.timings}")
