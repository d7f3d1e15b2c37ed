"""Resuming a run (fedmed.server.resume): the plan from the record, the model file found by its recorded sha256 (a
tampered or foreign file refused), the resumption in the audited record, and fedmed-submit's refusals."""

import dataclasses
import json

import numpy as np
import pytest

from fedmed.job.jobconfig import JobConfig
from fedmed.models.hashing import model_sha256
from fedmed.models.weights import load_state, save_state
from fedmed.server.resume import (
    EvaluationRefused,
    ResumeRefused,
    find_model_file,
    finished_run_leftovers,
    pick_recorded_model,
    plan_resume,
    resolve_run_uid,
    round_model_path,
    run_models_dir,
    stale_round_files,
)
from fedmed.store.repository import Repository, RoundRecord, RunHistory, UpdateRecord

UID = "0123456789abcdef0123456789abcdef"
CONFIG = {
    "task": "chest_xray14",
    "aggregation": "geometric_median",
    "he_layers": None,
    "norm": "batch",
    "image_size": 64,
    "num_rounds": 4,
    "min_clients": 2,
}
JOB = {k: CONFIG[k] for k in ("task", "aggregation", "he_layers", "norm", "image_size", "num_rounds")}


def _history(status="interrupted", rounds=((1, "a" * 64, 0.6), (2, "b" * 64, 0.55)), **config):
    return RunHistory(UID, "cxr_densenet", status, 4, {**CONFIG, **config}, ("job-1",), tuple(rounds))


def test_a_run_interrupted_after_round_2_continues_at_round_3_from_round_2s_model():
    plan = plan_resume(_history(), JOB)
    assert (plan.from_round, plan.first_wire_round) == (3, 2)  # rounds from 1 in the record, 0-based on the wire
    assert (plan.model_round, plan.model_sha256) == (2, "b" * 64)
    assert (plan.best_round, plan.best_score) == (1, 0.6)  # the Controller's rule: highest score, earliest round
    assert plan.previous_status == "interrupted" and plan.job_ids == ("job-1",)


def test_a_round_that_aggregated_nothing_is_not_run_again_and_the_model_before_it_stands():
    # round 2 recorded every site quarantined (no global model): the next round is 3, from round 1's model
    plan = plan_resume(_history(status="failed", rounds=((1, "a" * 64, 0.6), (2, None, None))), JOB)
    assert (plan.from_round, plan.model_round, plan.model_sha256) == (3, 1, "a" * 64)


def test_equal_scores_keep_the_earliest_best_round():
    plan = plan_resume(_history(rounds=((1, "a" * 64, 0.7), (2, "b" * 64, 0.7))), JOB)
    assert plan.best_round == 1


@pytest.mark.parametrize(
    "history, job, reason",
    [
        # a run that ended normally has nothing left to run
        (_history(status="finished"), JOB, "is finished; nothing to resume"),
        # a run whose job may still be running (its server was never restarted)
        (_history(status="running"), JOB, "is recorded as running .job job-1."),
        # the admin stopped it on purpose
        (_history(status="aborted"), JOB, "is aborted; only an interrupted or failed run"),
        # each option the record's meaning hangs on, named
        (_history(), {**JOB, "task": "brain_mri"}, "the job's task 'brain_mri' differs from run"),
        (_history(), {**JOB, "aggregation": "fedavg"}, "the job's aggregation 'fedavg' differs"),
        (_history(), {**JOB, "he_layers": ["classifier."]}, r"the job's he_layers \['classifier.'\] differs"),
        (_history(), {**JOB, "num_rounds": 5}, "the job's num_rounds 5 differs from run .*'s 4"),
        (_history(), {**JOB, "image_size": 128}, "the job's image_size 128 differs"),
        # no round recorded: a new job is the same thing
        (_history(rounds=()), JOB, "recorded no round; submit the job anew"),
        # every round already recorded (a crash between the last round and the run's end)
        (_history(rounds=[(r, "a" * 64, 0.5) for r in (1, 2, 3, 4)]), JOB, "recorded all its 4 rounds"),
        # rounds that never produced a global model
        (_history(rounds=((1, None, None),)), JOB, "recorded no global model"),
    ],
)
def test_a_resumption_that_would_make_the_record_meaningless_is_refused_naming_why(history, job, reason):
    with pytest.raises(ResumeRefused, match=reason):
        plan_resume(history, job)


def test_no_he_is_no_he_however_it_is_spelled():
    assert plan_resume(_history(he_layers=[]), {**JOB, "he_layers": None}).from_round == 3
    assert plan_resume(_history(he_layers=["classifier."]), {**JOB, "he_layers": ("classifier.",)}).from_round == 3


@pytest.mark.parametrize(
    "given, uids, expected",
    [
        ("0123", [UID, "ffff" + UID[4:]], UID),  # a unique prefix
        (UID, [UID, UID + "00"], UID),  # the whole uid, even if it prefixes another
        (" 0123 ", [UID], UID),  # pasted with blanks
    ],
)
def test_a_run_is_named_by_its_uid_or_a_unique_prefix(given, uids, expected):
    assert resolve_run_uid(given, uids) == expected


@pytest.mark.parametrize(
    "given, uids, reason",
    [
        ("0123", [UID, "0123" + "f" * 28], "is the start of 2 runs"),  # ambiguous
        ("abc", [UID], "no run 'abc' in the database"),
        ("", [UID], "no run given"),
    ],
)
def test_an_unknown_or_ambiguous_run_is_refused(given, uids, reason):
    with pytest.raises(ResumeRefused, match=reason):
        resolve_run_uid(given, uids)


def _params(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {"features.w": rng.normal(size=(3, 4)).astype(np.float32), "n": np.array(7, dtype=np.int64)}


def _sha_of(path):
    params, meta = load_state(path)
    return model_sha256(params, meta.get("he_encrypted"))


def _saved(tmp_path, seed=0, round_num=2):
    params = _params(seed)
    path = round_model_path(run_models_dir(tmp_path / "fedmed_runs", UID), round_num)
    save_state(params, path, {"round": round_num, "task": "chest_xray14"})
    return path, model_sha256(params)


def test_the_saved_model_round_trips_to_the_recorded_sha(tmp_path):
    path, sha = _saved(tmp_path)
    plan = plan_resume(_history(rounds=((1, "a" * 64, 0.6), (2, sha, 0.5))), JOB)
    assert find_model_file(plan, [tmp_path / "absent.pt", path], _sha_of) == path
    params, meta = load_state(path)
    assert meta["round"] == 2 and params["n"].dtype == np.int64


def test_a_missing_model_file_is_refused(tmp_path):
    plan = plan_resume(_history(), JOB)
    with pytest.raises(ResumeRefused, match=r"global model of round 2 \(sha256 bbbbbbbbbbbbbbbb...\) is missing"):
        find_model_file(plan, [round_model_path(run_models_dir(tmp_path / "fedmed_runs", UID), 2)], _sha_of)


@pytest.mark.parametrize(
    "tamper",
    [
        # a server operator swaps in other weights, saved in the right format
        lambda path: save_state(_params(1), path, {"round": 2}),
        # one weight nudged in place
        lambda path: save_state({**load_state(path)[0], "n": np.array(8, dtype=np.int64)}, path, load_state(path)[1]),
    ],
)
def test_a_model_file_changed_since_it_was_recorded_is_refused(tmp_path, tamper):
    path, sha = _saved(tmp_path)
    tamper(path)
    plan = plan_resume(_history(rounds=((1, "a" * 64, 0.6), (2, sha, 0.5))), JOB)
    with pytest.raises(ResumeRefused, match=r"no saved file matches .*edited or swapped.*refusing to resume"):
        find_model_file(plan, [path], _sha_of)


@pytest.mark.parametrize(
    "content",
    [
        b"not a model at all",  # garbage where the model was
        # a pickle that would run code if loaded without torch's weights-only guard
        b"cos\nsystem\n(S'touch /tmp/fedmed_pwned'\ntR.",
    ],
)
def test_a_hostile_file_in_place_of_the_model_is_refused_without_running_it(tmp_path, content):
    path, sha = _saved(tmp_path)
    path.write_bytes(content)
    plan = plan_resume(_history(rounds=((1, "a" * 64, 0.6), (2, sha, 0.5))), JOB)
    with pytest.raises(ResumeRefused, match=r"round_2.pt: unreadable \(round_2.pt is not a readable model file"):
        find_model_file(plan, [path], _sha_of)


def test_only_the_two_newest_round_files_are_kept(tmp_path):
    models = run_models_dir(tmp_path / "fedmed_runs", UID)
    for r in (1, 2, 3):
        save_state(_params(r), round_model_path(models, r))
    (models / "best_model.pt").write_bytes(b"kept")
    assert [p.name for p in stale_round_files(models, 3)] == ["round_1.pt"]
    assert stale_round_files(tmp_path / "none", 3) == []
    with pytest.raises(ValueError, match="run uid must be hex"):
        run_models_dir(tmp_path, "../etc")


# --- the record -----------------------------------------------------------------------------------------------------


def _round(n, sha):
    return RoundRecord(
        n,
        (UpdateRecord("hospital-a", "accepted", 10), UpdateRecord("hospital-b", "accepted", 12)),
        score=0.5 + n / 100,
        score_name="mean_auroc",
        score_source="site_validation",
        global_model_sha256=sha,
    )


def test_a_resumption_is_recorded_in_the_same_run_and_covered_by_the_audit_chain(db_url):
    repo = Repository(db_url)
    try:
        run_id = repo.start_run(UID, "cxr_densenet", "job-1", "geometric_median", 4, CONFIG)
        for n in (1, 2):
            repo.record_round(UID, _round(n, f"{n}" * 64))
        assert repo.mark_interrupted(["job-1"], "server stopped") == [UID]
        history = repo.run_history(UID)
        assert (history.status, history.job_ids, [r[0] for r in history.rounds]) == ("interrupted", ("job-1",), [1, 2])
        assert history.config["image_size"] == 64
        plan = plan_resume(history, JOB)
        repo.resume_run(UID, "job-2", plan.from_round, plan.model_sha256)
        repo.resume_run(UID, "job-2", plan.from_round, plan.model_sha256)  # a replayed journal line: once
        assert repo.get_run(run_id).status == "running" and repo.get_run(run_id).finished_at is None
        assert repo.run_id_for_job("job-2") == run_id == repo.run_id_for_job("job-1")
        (resumption,) = repo.resumptions(run_id)
        assert {k: resumption[k] for k in ("job_id", "from_round", "model_sha256", "previous_status")} == {
            "job_id": "job-2",
            "from_round": 3,
            "model_sha256": "2" * 64,
            "previous_status": "interrupted",
        }
        for n in (3, 4):
            repo.record_round(UID, _round(n, f"{n}" * 64))
        assert [r.round_num for r in repo.rounds_table(run_id)] == [1, 2, 3, 4]
        assert repo.run_history(UID).job_ids == ("job-1", "job-2")
        from fedmed.cli.rounds_table import format_table

        table = format_table(repo, run_id)  # what the admin reads to find the uid --resume takes
        assert f"uid {UID}" in table.splitlines()[0] and "resumed by job job-2 from round 3 at " in table
        # the resumption's server dies too: its job id marks the run interrupted again (run_uids: only those runs)
        assert repo.mark_interrupted(["job-2"], "server stopped", run_uids=["f" * 32]) == []
        assert repo.mark_interrupted(["job-2"], "server stopped") == [UID]
        assert repo.get_run(run_id).status == "interrupted"
        assert repo.verify_audit() is None
        # an edit of the resumption row (which round it claims to start from) is found
        with repo.engine.begin() as c:
            from sqlalchemy import text

            c.execute(text("UPDATE run_resumptions SET from_round = 1"))
        problem = repo.verify_audit()
        assert problem is not None and problem.table == "run_resumptions" and "edited" in problem.reason
    finally:
        repo.close()


def test_fedmed_submit_refuses_a_resumption_before_submitting_anything(tmp_path):
    from fedmed.cli.submit_job import SubmitError, check_resume

    url = f"sqlite:///{tmp_path / 'fedmed.db'}"
    repo = Repository(url)
    try:
        repo.start_run(UID, "cxr_densenet", "job-1", "geometric_median", 4, CONFIG)
        repo.record_round(UID, _round(1, "1" * 64))
        repo.finish_run(UID, "failed", 1, 0.51)
        entries = repo.audit_rows()
    finally:
        repo.close()
    job = tmp_path / "job"
    server = job / "app_server" / "config" / "config_fed_server.json"
    server.parent.mkdir(parents=True)

    def export(**settings):  # the exported server config, as build_job writes it (the job's settings whole)
        job_settings = JobConfig(name="j", task="chest_xray14", **settings).to_dict()
        workflow = {"path": "fedmed.flare.controller.FedMedController", "args": {"job": job_settings}}
        server.write_text(json.dumps({"workflows": [workflow]}))
        return job

    with pytest.raises(SubmitError, match="the job's aggregation 'fedavg' differs from run"):
        check_resume(url, UID[:6], export(num_rounds=4, image_size=64, aggregation="fedavg"))
    with pytest.raises(SubmitError, match="the job's num_rounds 5 differs"):  # JobConfig's default
        check_resume(url, UID[:6], export(image_size=64))
    with pytest.raises(SubmitError, match="no run 'feed' in the database"):
        check_resume(url, "feed", export(num_rounds=4, image_size=64))
    assert check_resume(url, UID[:6], export(num_rounds=4, image_size=64)) == UID
    repo = Repository(url, create_schema=False)
    try:
        assert repo.audit_rows() == entries and repo.run_history(UID).status == "failed"  # nothing written
    finally:
        repo.close()


def test_the_options_a_resumption_keeps_are_job_settings():
    # fedmed-submit and the server compare these by name in the job's settings (JobConfig.to_dict()).
    from fedmed.job.jobconfig import JobConfig
    from fedmed.server.resume import FIXED_OPTIONS

    assert set(FIXED_OPTIONS) <= set(JobConfig(name="j", task="chest_xray14").to_dict())


def test_the_servers_refusal_is_found_in_the_jobs_downloaded_log(tmp_path):
    # what fedmed-submit prints when the server refuses (e.g. a model file that no longer matches its sha256)
    from fedmed.cli.submit_job import refusal_in

    log = tmp_path / "job" / "workspace" / "log.txt"
    log.parent.mkdir(parents=True)
    reason = f"resume: no saved file matches run {UID}'s global model of round 2 (sha256 ...): refusing to resume"
    log.write_text(
        "2026-11-30 00:47:26,763 - FedMedController - INFO - [identity=fedmed, run=x] - Beginning model controller\n"
        f"2026-11-30 00:47:26,764 - FedMedController - ERROR - [identity=fedmed, run=x] - {reason}\n"
    )
    assert refusal_in(tmp_path / "job") == reason
    assert refusal_in(None) is None and refusal_in(tmp_path / "nothing") is None
    # an evaluation-only job's refusal of a recorded run's model; the controller's ordinary cross-site lines are not
    refusal = f"cross-site evaluation: run {UID}'s global model of round 2 (sha256 ...) is missing"
    log.write_text(
        "2026-11-30 00:47:26,763 - FedMedController - WARNING - [identity=fedmed, run=x] - cross-site evaluation: "
        "hospital-c is not asked to lend or to score\n"
        f"2026-11-30 00:47:26,764 - FedMedController - ERROR - [identity=fedmed, run=x] - {refusal}\n"
    )
    assert refusal_in(tmp_path / "job") == refusal


# --- a recorded run's model scored in a cross-site evaluation of its own (--cross-site-eval-only RUN) ----------------


@pytest.mark.parametrize(
    "which, rounds, expected",
    [
        ("final", ((1, "a" * 64, 0.6), (2, "b" * 64, 0.55)), (2, "b" * 64)),  # the last recorded global model
        ("best", ((1, "a" * 64, 0.6), (2, "b" * 64, 0.55)), (1, "a" * 64)),  # the best scored round's
        # a last round that aggregated nothing left the global model as it stood: that is the final model
        ("final", ((1, "a" * 64, 0.6), (2, None, None)), (1, "a" * 64)),
    ],
)
def test_a_recorded_runs_final_or_best_model_is_named_by_the_record(which, rounds, expected):
    recorded = pick_recorded_model(_history(status="finished", rounds=rounds), which)
    assert (recorded.run_uid, recorded.which, recorded.model_round, recorded.model_sha256) == (UID, which, *expected)


@pytest.mark.parametrize(
    "history, which, reason",
    [
        (_history(rounds=((1, None, None),)), "final", "recorded no global model"),
        (_history(rounds=((1, "a" * 64, None),)), "best", "recorded no scored round: it has no best model"),
        # an HE run's head is encrypted: an evaluation-only job would send it in clear
        (_history(he_layers=["class_layers."]), "final", r"kept layers encrypted \(HE\)"),
    ],
)
def test_a_recorded_model_that_cannot_be_scored_is_refused_naming_why(history, which, reason):
    with pytest.raises(EvaluationRefused, match=f"^cross-site evaluation: run {UID} .*{reason}"):
        pick_recorded_model(history, which)


def test_a_finished_run_keeps_its_final_and_best_models(tmp_path):
    models = run_models_dir(tmp_path / "fedmed_runs", UID)
    for r in (2, 3):
        save_state(_params(r), round_model_path(models, r))
    (models / "best_model.pt").write_bytes(b"kept")
    assert [p.name for p in finished_run_leftovers(models)] == ["round_2.pt"]
    assert finished_run_leftovers(tmp_path / "none") == []


def _recorded_simulation(tmp_path):
    """A finished run recorded in a database, its models kept where the simulator's server keeps them."""
    url = f"sqlite:///{tmp_path / 'fedmed.db'}"
    models = run_models_dir(tmp_path / "fedmed_runs", UID)
    shas = {}
    for n in (1, 2):
        save_state(_params(n), round_model_path(models, n), {"round": n})
        shas[n] = model_sha256(_params(n))
    save_state(_params(1), models / "best_model.pt", {"round": 1})
    repo = Repository(url)
    try:
        repo.start_run(UID, "cxr_densenet", "simulate_job", "geometric_median", 2, CONFIG)
        for n, score in ((1, 0.6), (2, 0.55)):  # round 1 the best, round 2 the final model
            repo.record_round(UID, dataclasses.replace(_round(n, shas[n]), score=score))
        repo.finish_run(UID, "finished", 1, 0.6)
        entries = repo.audit_rows()
    finally:
        repo.close()
    return url, models, entries


def test_the_simulators_evaluation_of_a_recorded_run_checks_its_model_file_before_anything_runs(tmp_path, capsys):
    """What job.py checks before a simulation that scores a recorded run's model: the server's own rule (the record
    names the model, the kept file must hash to it); each refusal one line, nothing written."""
    from fedmed.flare.fedjob import check_simulation_evaluation
    from fedmed.job.jobconfig import JobConfig

    url, models, entries = _recorded_simulation(tmp_path)
    config = JobConfig(name="cxr_densenet", task="chest_xray14", models_dir=str(tmp_path / "fedmed_runs"))
    check_simulation_evaluation(url, config.with_changes(cross_site_eval_run=UID[:6]))
    check_simulation_evaluation(url, config.with_changes(cross_site_eval_run=UID[:6], cross_site_eval_model="best"))
    out = capsys.readouterr().out
    assert f"scoring run {UID}'s final model (round 2, round_2.pt)" in out
    assert f"scoring run {UID}'s best model (round 1, best_model.pt)" in out
    with pytest.raises(EvaluationRefused, match="cross-site evaluation: no run 'feed' in the database"):
        check_simulation_evaluation(url, config.with_changes(cross_site_eval_run="feed"))
    with pytest.raises(ValueError, match="needs --db-url"):
        check_simulation_evaluation(None, config.with_changes(cross_site_eval_run=UID[:6]))
    save_state(_params(7), round_model_path(models, 2), {"round": 2})  # swapped since it was recorded
    with pytest.raises(EvaluationRefused, match=r"no saved file matches .* round 2 .*refusing to evaluate it"):
        check_simulation_evaluation(url, config.with_changes(cross_site_eval_run=UID[:6]))
    round_model_path(models, 2).unlink()
    with pytest.raises(EvaluationRefused, match="global model of round 2 .* is missing"):
        check_simulation_evaluation(url, config.with_changes(cross_site_eval_run=UID[:6]))
    repo = Repository(url, create_schema=False)
    try:
        assert repo.audit_rows() == entries  # nothing written
    finally:
        repo.close()


def test_fedmed_submit_refuses_the_evaluation_of_an_unknown_run_before_submitting_anything(tmp_path, capsys):
    from fedmed.cli.submit_job import SubmitError, check_evaluation

    url, _, entries = _recorded_simulation(tmp_path)
    server = tmp_path / "job" / "app_server" / "config" / "config_fed_server.json"
    server.parent.mkdir(parents=True)

    def export(**settings):  # the exported server config, as build_job writes it (the job's settings whole)
        job_settings = JobConfig(name="j", task="chest_xray14", **settings).to_dict()
        workflow = {"path": "fedmed.flare.controller.FedMedController", "args": {"job": job_settings}}
        server.write_text(json.dumps({"workflows": [workflow]}))
        return tmp_path / "job"

    with pytest.raises(SubmitError, match="cross-site evaluation: no run 'feed' in the database"):
        check_evaluation(url, export(cross_site_eval_run="feed"))
    check_evaluation(url, export(cross_site_eval_run=UID[:8], cross_site_eval_model="best"))
    assert f"scoring run {UID}'s best model (round 1, sha256 " in capsys.readouterr().out
    check_evaluation(None, export(cross_site_eval_run=UID[:8]))  # no database here: the server checks
    assert "no --db-url, so the server checks the run and its model file" in capsys.readouterr().out
    repo = Repository(url, create_schema=False)
    try:
        assert repo.audit_rows() == entries  # nothing written
    finally:
        repo.close()
