"""Cross-site evaluation's pure parts and its record: what a hospital may release, which answers the server refuses
(hostile ones sent through the controller), the heatmap matrix, the table in the database and the report."""

import json
import math

import numpy as np
import pytest
from nvflare.app_common.abstract.fl_model import FLModel
from nvflare.app_common.app_constant import AppConstants
from sqlalchemy import text

from fedmed.flare import wire
from fedmed.job import constants as C
from fedmed.job.tasks import BRAIN_MRI, CHEST_XRAY14
from fedmed.server.crosssite import (
    GLOBAL_MODEL,
    CrossSiteRecord,
    allowed_metrics,
    asked_sites,
    error_answer_reason,
    evaluation_cell,
    find_result_problem,
    heatmap_matrix,
    local_model_refusal,
    quarantine_reasons,
    released_scores,
    scores_refusal,
)
from fedmed.server.robust.trust import SiteTrust
from fedmed.site.site_config import parse_site_config
from fedmed.store.journal import op_from_json, op_to_json
from fedmed.store.repository import Repository, RoundRecord, UpdateRecord

GOOD_CXR = {"auroc/Mass": 0.71, "auroc/Nodule": 0.64, "mean_auroc": 0.675}
GOOD_BRAIN = {"accuracy": 0.8, "macro_f1": 0.75, "mean_auroc": 0.9, "auroc/glioma": 0.88}


def test_a_good_result_passes_for_either_task():
    assert find_result_problem(GOOD_CXR, "global", "global", 40, CHEST_XRAY14) is None
    assert find_result_problem(GOOD_BRAIN, "hospital-a", "hospital-a", 12, BRAIN_MRI) is None
    assert "accuracy" in allowed_metrics(BRAIN_MRI) and "accuracy" not in allowed_metrics(CHEST_XRAY14)


@pytest.mark.parametrize(
    "metrics, reported, num_samples, why",
    [
        ({**GOOD_CXR, "auroc/Mass": 1.7}, "global", 40, "auroc/Mass is 1.7, outside [0, 1]"),
        ({**GOOD_CXR, "mean_auroc": -0.2}, "global", 40, "mean_auroc is -0.2, outside [0, 1]"),
        ({**GOOD_CXR, "auroc/Mass": float("nan")}, "global", 40, "auroc/Mass is nan, outside [0, 1]"),
        ({**GOOD_CXR, "auroc/Mass": float("inf")}, "global", 40, "auroc/Mass is inf"),
        ({**GOOD_CXR, "auroc/Covid": 0.9}, "global", 40, "class 'Covid', which task chest_xray14 does not have"),
        ({**GOOD_CXR, "accuracy": 0.9}, "global", 40, "metric 'accuracy', which task chest_xray14 does not have"),
        ({**GOOD_CXR, "auroc/Mass": True}, "global", 40, "auroc/Mass must be a number, got bool"),
        ({**GOOD_CXR, "auroc/Mass": "0.7"}, "global", 40, "auroc/Mass must be a number, got str"),
        (GOOD_CXR, "hospital-b", 40, "reports scores for model 'hospital-b', but was asked about 'global'"),
        (GOOD_CXR, None, 40, "reports scores for model None, but was asked about 'global'"),
        ({"auroc/Mass": 0.7}, "global", 40, "sent no mean_auroc"),
        ({}, "global", 40, "sent no scores"),
        ([0.7], "global", 40, "sent no scores"),
        (GOOD_CXR, "global", 0, "num_samples must be a positive integer, got 0"),
        (GOOD_CXR, "global", True, "num_samples must be a positive integer, got True"),
        (GOOD_CXR, "global", "many", "num_samples must be a positive integer"),
        ({**GOOD_CXR, "x" * 90: 0.5}, "global", 40, "must match"),
    ],
)
def test_hostile_results_are_refused_with_the_reason(metrics, reported, num_samples, why):
    problem = find_result_problem(metrics, reported, "global", num_samples, CHEST_XRAY14)
    assert problem is not None and why in problem
    cell = evaluation_cell("global", "hospital-c", metrics, reported, num_samples, CHEST_XRAY14)
    assert cell.status == "rejected" and cell.reason.startswith("hospital-c ") and why in cell.reason
    assert cell.score is None and cell.metrics == {}


def test_released_scores_drop_loss_and_classes_without_an_auroc():
    out = released_scores(
        {"auroc/Mass": 0.7, "auroc/Hernia": float("nan"), "mean_auroc": 0.7, "loss": 3.2}, CHEST_XRAY14
    )
    assert out == {"auroc/Mass": 0.7, "mean_auroc": 0.7}
    assert find_result_problem(out, "global", "global", 5, CHEST_XRAY14) is None


def test_an_evaluated_cell_keeps_the_tasks_score_and_a_refusal_its_reason():
    cell = evaluation_cell("global", "hospital-a", GOOD_BRAIN, "global", 12, BRAIN_MRI, model_sha256="ab" * 32)
    assert (cell.status, cell.score, cell.num_samples) == ("evaluated", 0.8, 12)  # accuracy, the brain task's score
    refused = evaluation_cell("global", "hospital-b", {}, "global", None, BRAIN_MRI, refused="policy says no")
    assert (refused.status, refused.reason) == ("refused", "policy says no")
    with pytest.raises(ValueError, match="needs its reason"):
        CrossSiteRecord("global", "hospital-a", "missing")
    with pytest.raises(ValueError, match="status must be one of"):
        CrossSiteRecord("global", "hospital-a", "fine", "x")


@pytest.mark.parametrize(
    "share, trained, he_on, update_noise, why",
    [
        (False, True, False, False, "share_local_model is off"),
        (True, False, False, False, "trained no local model"),
        (True, True, True, False, "HE is on"),
        (True, True, False, True, "update-noise filter"),
        (True, True, False, False, None),  # a DP-SGD site's local model is the update it already released
    ],
)
def test_what_a_hospital_lends(share, trained, he_on, update_noise, why):
    refusal = local_model_refusal(share, trained, he_on, update_noise)
    assert refusal is None if why is None else why in refusal


def test_a_dp_site_that_keeps_its_metrics_home_keeps_its_scores_home():
    assert scores_refusal(True) is None
    assert "release_metrics false" in scores_refusal(False) and "epsilon" in scores_refusal(False)


def test_share_local_model_is_a_strict_site_key(tmp_path):
    base = {"site_name": "hospital-a", "data": {"format": "chestxray14", "root": "d"}}
    assert parse_site_config(base, tmp_path / "s.json").share_local_model is False  # off unless turned on
    assert parse_site_config({**base, "share_local_model": True}, tmp_path / "s.json").share_local_model is True
    with pytest.raises(ValueError, match="share_local_model must be true or false"):
        parse_site_config({**base, "share_local_model": "yes"}, tmp_path / "s.json")
    with pytest.raises(ValueError, match="did you mean 'share_local_model'"):
        parse_site_config({**base, "share_local_modle": True}, tmp_path / "s.json")


def _cells():
    return [
        CrossSiteRecord("global", "hospital-a", "evaluated", score=0.7, num_samples=10, metrics={"mean_auroc": 0.7}),
        CrossSiteRecord("global", "hospital-b", "evaluated", score=0.6, num_samples=8, metrics={"mean_auroc": 0.6}),
        CrossSiteRecord("global", "hospital-c", "refused", "release_metrics false"),
        CrossSiteRecord(
            "hospital-a", "hospital-b", "evaluated", score=0.55, num_samples=8, metrics={"auroc/Mass": 0.5}
        ),
        CrossSiteRecord("hospital-a", "hospital-a", "evaluated", score=0.8, num_samples=10),
        CrossSiteRecord("hospital-a", "hospital-c", "missing", "no answer within 300s"),
        CrossSiteRecord("hospital-b", "hospital-b", "not_shared", "share_local_model is off"),
    ]


def _rows(cells):
    return [{"model": c.model, "site": c.site, "status": c.status, "score": c.score} for c in cells]


def test_heatmap_matrix_rows_are_sites_columns_the_global_model_first():
    m = heatmap_matrix(_rows(_cells()))
    assert m.sites == ("hospital-a", "hospital-b", "hospital-c")
    assert m.models == (GLOBAL_MODEL, "hospital-a")  # hospital-b lent nothing: no column
    assert m.values == ((0.7, 0.8), (0.6, 0.55), (None, None))
    assert m.cell("hospital-b", "hospital-a") == 0.55


def _recorded_run(repo):
    repo.start_run("run-x", "demo", "job", "fedavg", 1, {})
    repo.record_round(
        "run-x",
        RoundRecord(
            1,
            (UpdateRecord("hospital-a", "accepted", 10),),
            score=0.6,
            score_name="mean_auroc",
            score_source="site_validation",
            mean_auroc=0.6,
        ),
    )
    repo.finish_run("run-x", "finished", 1, 0.6)
    repo.record_cross_site("run-x", _cells(), score_name="mean_auroc")


def test_the_table_is_recorded_audited_and_replaced_whole(db_url):
    repo = Repository(db_url)
    try:
        _recorded_run(repo)
        run_id = repo.latest_run_id()
        rows = repo.cross_site_results(run_id)
        assert len(rows) == 7 and {(r["model"], r["site"]) for r in rows} == {(c.model, c.site) for c in _cells()}
        a_on_b = next(r for r in rows if (r["model"], r["site"]) == ("hospital-a", "hospital-b"))
        assert a_on_b["metrics"] == {"auroc/Mass": 0.5} and a_on_b["score_name"] == "mean_auroc"
        assert next(r for r in rows if r["status"] == "refused")["score_name"] is None
        assert repo.verify_audit() is None
        repo.record_cross_site("run-x", _cells()[:2], score_name="mean_auroc")  # a replay replaces, never adds
        assert len(repo.cross_site_results(run_id)) == 2 and repo.verify_audit() is None
        # An insider raises hospital-b's score of the global model: the keyed chain names the row.
        with repo.engine.begin() as conn:
            conn.execute(text("UPDATE cross_site_results SET score = 0.99 WHERE score = 0.6"))
        problem = repo.verify_audit()
        assert problem.table == "cross_site_results" and "run-x, global, hospital-b" in problem.reason
        assert "edited" in problem.reason
        with pytest.raises(ValueError, match="names a \\(model, site\\) cell twice"):
            repo.record_cross_site("run-x", _cells()[:1] * 2)
        bad = CrossSiteRecord("global", "hospital-a", "evaluated", score=0.7, metrics={"auroc/Mass": math.nan})
        with pytest.raises(ValueError, match="must be finite"):
            repo.record_cross_site("run-x", [bad])
    finally:
        repo.close()


def test_cross_site_writes_survive_the_journal():
    line = op_to_json("record_cross_site", {"run_uid": "r", "records": _cells(), "score_name": "accuracy"})
    op, args = op_from_json(line)
    assert op == "record_cross_site" and args["records"] == _cells() and args["score_name"] == "accuracy"


def test_report_draws_the_heatmap(tmp_path):
    from PIL import Image

    from fedmed.display.report import CROSS_SITE_FIGURE, write_report

    repo = Repository(f"sqlite:///{tmp_path / 'r.db'}")
    try:
        _recorded_run(repo)
        page = write_report(repo, repo.latest_run_id(), tmp_path / "out").read_text()
    finally:
        repo.close()
    assert "<h2>Cross-site evaluation</h2>" in page and f'src="{CROSS_SITE_FIGURE}"' in page
    assert "hospital-a&#x27;s local model" in page and "share_local_model is off" in page
    img = np.asarray(Image.open(tmp_path / "out" / CROSS_SITE_FIGURE).convert("L"), dtype=float)
    assert img.std() > 10  # drawn, not blank


def _answer(site, metrics=None, owner="global", n=10, **meta):
    return FLModel(
        metrics=metrics if metrics is not None else dict(GOOD_CXR),
        meta={"client_name": site, AppConstants.MODEL_OWNER: owner, C.META_NUM_SAMPLES: n, **meta},
    )


def test_the_controller_refuses_hostile_answers_sent_to_it():
    """Real FLModels as NVFlare hands them to the controller (client_name from the connection): a site lying about
    the model, scoring outside [0, 1], NaN or an unknown class is recorded rejected with the reason; a silent
    site missing; an answer from a site that was not asked is ignored."""
    from fedmed.flare.crosssite_eval import FedMedCrossSiteEval

    controller = FedMedCrossSiteEval({"name": "j", "task": "chest_xray14", "cross_site_timeout": 5})
    answers = [
        _answer("hospital-a"),
        _answer("hospital-b", owner="hospital-a"),
        _answer("hospital-c", {**GOOD_CXR, "auroc/Mass": 3.0}),
        _answer("hospital-d", {**GOOD_CXR, "auroc/Mass": float("nan")}),
        _answer("hospital-e", {**GOOD_CXR, "auroc/Dragon": 0.5}),
        _answer("hospital-f", {}, **{C.META_REFUSED: "release_metrics false"}),
        _answer("intruder"),
        _answer("hospital-a", {**GOOD_CXR, "mean_auroc": 0.01}),  # a second answer from one site: the first counts
    ]
    targets = ["hospital-a", "hospital-b", "hospital-c", "hospital-d", "hospital-e", "hospital-f", "hospital-g"]
    cells = {c.site: c for c in controller._evaluation_cells("global", "ab" * 32, targets, answers)}
    assert set(cells) == set(targets)
    assert (cells["hospital-a"].status, cells["hospital-a"].score) == ("evaluated", 0.675)
    assert "asked about 'global'" in cells["hospital-b"].reason and cells["hospital-b"].status == "rejected"
    assert "outside [0, 1]" in cells["hospital-c"].reason and "nan" in cells["hospital-d"].reason
    assert "class 'Dragon'" in cells["hospital-e"].reason
    assert (cells["hospital-f"].status, cells["hospital-f"].reason) == ("refused", "release_metrics false")
    assert cells["hospital-g"].status == "missing" and "5s" in cells["hospital-g"].reason


def test_the_controller_relays_no_broken_local_model():
    from fedmed.flare.crosssite_eval import FedMedCrossSiteEval
    from fedmed.models.network import build_densenet121, state_to_numpy

    controller = FedMedCrossSiteEval({"name": "j", "task": "brain_mri"})
    good = state_to_numpy(build_densenet121(4))
    assert controller._local_model_problem(FLModel(params=good)) is None
    poisoned = {**good, "class_layers.out.weight": np.full_like(good["class_layers.out.weight"], np.nan)}
    assert "non-finite values in class_layers.out.weight" in controller._local_model_problem(FLModel(params=poisoned))
    assert "does not fit" in controller._local_model_problem(FLModel(params=state_to_numpy(build_densenet121(14))))
    encrypted = FLModel(params=good, meta={C.META_ENCRYPTED: {"chunks": []}})
    assert "encrypted" in controller._local_model_problem(encrypted)


def test_job_settings_for_cross_site_evaluation():
    from fedmed.job.jobconfig import JobConfig

    c = JobConfig(name="j", task="chest_xray14")
    assert c.cross_site_eval is True and c.cross_site_eval_only is None
    with pytest.raises(ValueError, match="cannot run with he_layers"):
        c.with_changes(cross_site_eval_only="/m.pt", he_layers=("class_layers.",))
    with pytest.raises(ValueError, match="not both"):
        c.with_changes(cross_site_eval_only="/m.pt", initial_weights="/w.pt")
    with pytest.raises(ValueError, match="cross_site_timeout must be an integer >= 1"):
        c.with_changes(cross_site_timeout=0)
    # a recorded run's model instead of a file: named by its uid or a prefix, its final or best model
    assert c.with_changes(cross_site_eval_run="3fa2").evaluates_only and not c.evaluates_only
    with pytest.raises(ValueError, match="cross_site_eval_run must be a run uid or a prefix of one"):
        c.with_changes(cross_site_eval_run="../runs")
    with pytest.raises(ValueError, match="not both"):
        c.with_changes(cross_site_eval_run="3fa2", cross_site_eval_only="/m.pt")
    with pytest.raises(ValueError, match="cross_site_eval_run cannot run with he_layers"):
        c.with_changes(cross_site_eval_run="3fa2", he_layers=("class_layers.",))
    with pytest.raises(ValueError, match="give cross_site_eval_run or resume_run, not both"):
        c.with_changes(cross_site_eval_run="3fa2", resume_run="3fa2")
    with pytest.raises(ValueError, match="cross_site_eval_model must be 'final' or 'best', got 'last'"):
        c.with_changes(cross_site_eval_model="last")
    assert json.dumps(c.with_changes(cross_site_eval=False).cross_site_eval) == "false"


def test_fedmed_submit_prints_the_table():
    from fedmed.cli.submit_job import cross_site_lines

    rows = [{**r, "score_name": "mean_auroc", "reason": c.reason} for r, c in zip(_rows(_cells()), _cells())]
    lines = cross_site_lines(rows)
    assert lines[0].startswith("cross-site evaluation (mean_auroc;")
    assert "global model" in lines[1] and "hospital-a's local model" in lines[1]
    assert lines[2].split() == ["hospital-a", "0.700", "0.800"] and lines[4].split() == ["hospital-c", "-", "-"]
    assert "  hospital-c on global model: refused: release_metrics false" in lines
    assert cross_site_lines([]) == []


def _site_trainer(tiny_hospitals, tmp_path, monkeypatch, **site_keys):
    """The real FedMedTrainer of hospital-a, set up as at START_RUN (job arguments, as under the simulator)."""
    from nvflare.apis.fl_context import FLContextManager

    import fedmed.flare.executor as executor_module
    from fedmed.flare.executor import FedMedTrainer

    monkeypatch.setattr(executor_module, "running_in_simulator", lambda fl_ctx: True)
    site = "hospital-a"
    cfg = tmp_path / "fedmed_site.json"
    data = {"format": "dicom", "root": "dicom", "labels_csv": "labels.csv"}
    cfg.write_text(json.dumps({"site_name": site, "data": data, **site_keys}))
    (tmp_path / "dicom").symlink_to(tiny_hospitals / site / "dicom")
    (tmp_path / "labels.csv").symlink_to(tiny_hospitals / site / "labels.csv")
    norm = "group" if "privacy" in site_keys else "batch"
    job = {"name": "j", "task": "chest_xray14", "image_size": 32, "batch_size": 4, "norm": norm}
    ex = FedMedTrainer(job, site_config=str(cfg))
    ctx = FLContextManager(identity_name=site, job_id="job-1").new_context()
    ex._setup(ctx)
    return ex, ctx


def _ask(ex, ctx, task, model=None):
    from nvflare.apis.signal import Signal
    from nvflare.app_common.utils.fl_model_utils import FLModelUtils

    from conftest import over_the_wire

    shareable = FLModelUtils.to_shareable(model if model is not None else FLModel(params={}))
    return over_the_wire(FLModelUtils.from_shareable(ex.execute(task, shareable, ctx, Signal())))


def test_a_hospital_scores_a_model_and_lends_its_local_model_only_when_it_may(tiny_hospitals, tmp_path, monkeypatch):
    from fedmed.models.network import build_densenet121, state_to_numpy

    ex, ctx = _site_trainer(tiny_hospitals, tmp_path, monkeypatch, share_local_model=True)
    params = state_to_numpy(build_densenet121(14))
    asked = FLModel(params=params, meta={AppConstants.MODEL_OWNER: "hospital-b"})
    reply = _ask(ex, ctx, AppConstants.TASK_VALIDATION, asked)
    assert reply.meta[AppConstants.MODEL_OWNER] == "hospital-b" and reply.meta[C.META_NUM_SAMPLES] == len(ex._val_ds)
    assert find_result_problem(reply.metrics, "hospital-b", "hospital-b", len(ex._val_ds), CHEST_XRAY14) is None
    refused = _ask(ex, ctx, AppConstants.TASK_SUBMIT_MODEL)  # nothing trained yet in this job
    assert "trained no local model" in refused.meta[C.META_REFUSED] and not refused.params
    ex._state.last_local = params  # what a round leaves (the executor keeps the update it released)
    lent = _ask(ex, ctx, AppConstants.TASK_SUBMIT_MODEL)
    assert lent.meta[AppConstants.MODEL_OWNER] == "hospital-a" and set(lent.params) == set(params)


def test_a_dp_hospital_that_keeps_metrics_home_sends_no_scores(tiny_hospitals, tmp_path, monkeypatch):
    from fedmed.models.network import build_densenet121, state_to_numpy

    ex, ctx = _site_trainer(
        tiny_hospitals,
        tmp_path,
        monkeypatch,
        privacy={"preset": "weak", "release_metrics": False},
        privacy_ledger=str(tmp_path / "ledger.jsonl"),
    )
    model = FLModel(params=state_to_numpy(build_densenet121(14, norm="group")), meta={})
    reply = _ask(ex, ctx, AppConstants.TASK_VALIDATION, model)
    assert "release_metrics false" in reply.meta[C.META_REFUSED] and not reply.metrics
    assert reply.meta[AppConstants.MODEL_OWNER] == GLOBAL_MODEL
    lent = _ask(ex, ctx, AppConstants.TASK_SUBMIT_MODEL)
    assert "share_local_model is off" in lent.meta[C.META_REFUSED]


def test_a_model_whose_outputs_are_not_finite_gets_an_answer_with_the_reason_not_an_error(
    tiny_hospitals, tmp_path, monkeypatch
):
    """Seen on loopback: heavy user-level noise left a global model whose outputs were NaN; the hospitals' scoring
    raised, every validate task failed, and NVFlare aborted the finished job before the final model went out."""
    import numpy as np

    from fedmed.models.network import build_densenet121, state_to_numpy

    ex, ctx = _site_trainer(tiny_hospitals, tmp_path, monkeypatch)
    params = state_to_numpy(build_densenet121(14))
    head = next(k for k in params if k.endswith("out.weight"))
    params[head] = np.full_like(params[head], np.nan)
    reply = _ask(ex, ctx, AppConstants.TASK_VALIDATION, FLModel(params=params, meta={}))
    assert "not finite" in reply.meta[C.META_REFUSED] and "cannot be scored" in reply.meta[C.META_REFUSED]
    assert not reply.metrics


@pytest.mark.parametrize(
    "events, why",
    [
        # quarantined in round 2 of this job: the round and the trust rule's reason
        (
            [(2, "hospital-c", "quarantined", "hospital-c quarantined: a round scoring 0")],
            "since round 2: a round scoring 0",
        ),
        # re-admitted, then quarantined again: the latest quarantine counts
        (
            [
                (1, "hospital-c", "quarantined", "hospital-c quarantined: trust 0.400 < 0.5"),
                (3, "hospital-c", "readmitted", "hospital-c re-admitted after 2 good rounds"),
                (4, "hospital-c", "quarantined", "hospital-c quarantined: a round scoring 0"),
            ],
            "since round 4: a round scoring 0",
        ),
        # quarantined before this job (trust carried over from the record): no round of this job to name
        ([], "quarantined by an earlier job (trust 0.200)"),
    ],
)
def test_why_a_quarantined_hospital_is_not_asked(events, why):
    trust = {"hospital-a": SiteTrust(0.9), "hospital-c": SiteTrust(0.2, quarantined=True)}
    reasons = quarantine_reasons(trust, events)
    assert set(reasons) == {"hospital-c"} and why in reasons["hospital-c"]


def test_a_quarantined_hospital_is_neither_asked_to_lend_nor_to_score_and_its_model_is_relayed_to_no_one():
    """A quarantined hospital's model, sent anyway, reaches no other hospital: it is not a target of submit_model, so
    the controller drops its answer; its cells (its own model's, the global model's, every lent model's) say why."""
    from fedmed.flare.crosssite_eval import FedMedCrossSiteEval
    from fedmed.models.network import build_densenet121, state_to_numpy

    quarantined = quarantine_reasons(
        {"hospital-c": SiteTrust(0.1, quarantined=True)},
        [(1, "hospital-c", "quarantined", "hospital-c quarantined: a round scoring 0")],
    )
    connected = ["hospital-a", "hospital-b", "hospital-c", "hospital-d"]
    gone = {"hospital-d": "NVFlare dropped the site"}
    targets, not_asked = asked_sites(connected, gone, connected, None, quarantined)
    assert targets == ["hospital-a", "hospital-b"]
    assert not_asked == {
        "hospital-c": "not asked: quarantined since round 1: a round scoring 0",
        "hospital-d": "not asked: NVFlare dropped the site",
    }
    controller = FedMedCrossSiteEval({"name": "j", "task": "brain_mri"})
    params = state_to_numpy(build_densenet121(4))
    answers = [
        FLModel(params=params, meta={"client_name": "hospital-c", AppConstants.MODEL_OWNER: "hospital-c"}),
        FLModel(params=params, meta={"client_name": "hospital-a", AppConstants.MODEL_OWNER: "hospital-a"}),
        FLModel(params={}, meta={"client_name": "hospital-b", C.META_REFUSED: "share_local_model is off"}),
    ]
    lent, cells = controller._lent_models(targets, answers)
    assert [site for site, _ in lent] == ["hospital-a"]
    assert [(c.model, c.site, c.status) for c in cells] == [("hospital-b", "hospital-b", "not_shared")]


@pytest.mark.parametrize(
    "code, why",
    [
        ("EXECUTION_EXCEPTION", "the site answered with an error: EXECUTION_EXCEPTION"),  # its executor raised
        ("TASK_UNKNOWN", "the site answered with an error: TASK_UNKNOWN"),  # a site that does not score
        ("x\nFAKE LOG LINE " * 20, "an unknown return code 'x\\nFAKE LOG LINE"),  # hostile: one line, cut short
        (42, "an unknown return code '42'"),
    ],
)
def test_an_error_answer_is_named_from_its_return_code(code, why):
    reason = error_answer_reason(code)
    assert reason.startswith("the site answered with an error: ") and why in reason
    assert "\n" not in reason and len(reason) < 120


def test_a_site_that_answers_with_an_error_is_not_called_silent():
    """Answers as NVFlare hands them to the controller's result callback (BaseModelController._process_result, in
    resilient mode as every cross-site step runs): a site whose executor raised answers at once with an error code,
    which NVFlare drops from the results; its cell says its error, and only a site that never answered gets
    "no answer within Ns"."""
    from nvflare.apis.client import Client
    from nvflare.apis.controller_spec import ClientTask
    from nvflare.apis.fl_constant import ReturnCode
    from nvflare.apis.fl_context import FLContextManager
    from nvflare.apis.shareable import make_reply
    from nvflare.app_common.utils.fl_model_utils import FLModelUtils

    from fedmed.flare.crosssite_eval import FedMedCrossSiteEval

    controller = FedMedCrossSiteEval({"name": "j", "task": "chest_xray14", "cross_site_timeout": 7})
    ctx = FLContextManager(identity_name="server", job_id="job-1").new_context()
    controller.fl_ctx = ctx
    asked = FLModel(params={}, meta={AppConstants.MODEL_OWNER: "global"})
    task = controller._prepare_task(data=asked, task_name=AppConstants.TASK_VALIDATION, timeout=7, callback=None)
    answers = {
        "hospital-a": FLModelUtils.to_shareable(_answer("hospital-a")),
        "hospital-b": make_reply(ReturnCode.EXECUTION_EXCEPTION),
        "hospital-c": make_reply(ReturnCode.TASK_UNKNOWN),
    }
    controller._ignore_result_error, controller._answer_errors = True, {}  # as _broadcast_advisory sets them
    for site, shareable in answers.items():
        client_task = ClientTask(Client(site, None), task)
        client_task.result = shareable
        controller._process_result(client_task, ctx)
    assert [wire.site_of(r) for r in controller._results] == ["hospital-a"]  # NVFlare kept only the good answer
    targets = ["hospital-a", "hospital-b", "hospital-c", "hospital-d"]
    cells = {
        c.site: c
        for c in controller._evaluation_cells(
            "global", "ab" * 32, targets, controller._results, controller._answer_errors
        )
    }
    assert cells["hospital-a"].status == "evaluated"
    assert (cells["hospital-b"].status, cells["hospital-b"].reason) == (
        "missing",
        "the site answered with an error: EXECUTION_EXCEPTION",
    )
    assert cells["hospital-c"].reason == "the site answered with an error: TASK_UNKNOWN"
    assert cells["hospital-d"].reason == "no answer within 7s"
    # A local model asked for and answered with an error: not lent, with the site's error as the reason.
    _, lent_cells = controller._lent_models(["hospital-b"], [], {"hospital-b": ReturnCode.EXECUTION_EXCEPTION})
    assert lent_cells[0].reason == "the site answered with an error: EXECUTION_EXCEPTION"


def test_the_job_script_takes_a_model_file_or_a_recorded_run(tmp_path, capsys):
    """--cross-site-eval-only: an existing file is scored as before (the persistor loads it on the server); anything
    else must look like a run uid, which the exported controller resolves on the server (its kept models)."""
    from fedmed.cli.submit_job import exported_controller_args
    from fedmed.flare.fedjob import job_main
    from fedmed.flare.persistor import FedMedModelPersistor
    from fedmed.job.jobconfig import JobConfig
    from fedmed.models.network import build_densenet121, state_to_numpy
    from fedmed.models.weights import save_state

    config = JobConfig(name="cxr_densenet", task="chest_xray14")
    model = tmp_path / "global_model.pt"
    save_state(state_to_numpy(build_densenet121(14)), model)

    def export(*argv):
        out = tmp_path / f"job{len(list(tmp_path.iterdir()))}"
        assert job_main([*argv, "--export-job", str(out)], config, "d", tmp_path / "ws") == 0
        folder = out / config.name
        persistor = json.loads((folder / "app_server" / "config" / "config_fed_server.json").read_text())
        persistor = next(c for c in persistor["components"] if c["id"] == "persistor")
        return exported_controller_args(folder), persistor.get("args", {})

    controller, persistor = export("--cross-site-eval-only", str(model))
    assert controller["cross_site_eval_only"] == str(model.resolve()) and controller["cross_site_eval_run"] is None
    assert FedMedModelPersistor(**persistor).initial_weights == str(model.resolve())
    controller, persistor = export("--cross-site-eval-only", "3fa2c1", "--cross-site-eval-model", "best")
    assert (controller["cross_site_eval_only"], controller["cross_site_eval_run"]) == (None, "3fa2c1")
    assert controller["cross_site_eval_model"] == "best"
    assert FedMedModelPersistor(**persistor).initial_weights is None  # the Controller resolves the run's model
    for argv, why in (
        (["--cross-site-eval-only", str(tmp_path / "gone.pt")], "no such model file, nor a run uid"),
        (
            ["--cross-site-eval-only", str(model), "--cross-site-eval-model", "best"],
            "goes with --cross-site-eval-only RUN",
        ),
    ):
        with pytest.raises(SystemExit) as e:
            job_main([*argv, "--export-job", str(tmp_path / "never")], config, "d", tmp_path / "ws")
        assert e.value.code == 2 and why in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


def test_the_summary_line_says_a_model_that_was_not_lent_stays_home():
    from fedmed.server.crosssite import summary_line

    line = summary_line(_cells(), "mean_auroc")
    assert "hospital-b's local model: not lent (it stays at hospital-b)" in line
    assert "hospital-b not_shared" not in line  # was: "hospital-b's local model: hospital-b not_shared"
    assert "global model: hospital-a 0.700, hospital-b 0.600, hospital-c refused" in line
