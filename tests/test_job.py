"""The job as NVFlare sees it: exported config and a real simulator run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fedmed.job.constants import CXR14_FINDINGS
from fedmed.models.network import build_densenet121, state_to_numpy
from fedmed.store.repository import Repository
from jobscripts import load_job_script

REPO = Path(__file__).resolve().parents[1]
JOB = REPO / "jobs" / "cxr_densenet" / "job.py"
SITES = ("hospital-a", "hospital-b", "hospital-c")


def _job_module():
    return load_job_script("cxr_densenet")


def test_exported_job_names_fedmed_components_and_ships_no_code(tmp_path):
    job = _job_module().build_job(num_rounds=3, min_clients=2)
    job.export_job(str(tmp_path))
    root = tmp_path / "cxr_densenet"
    meta = json.loads((root / "meta.json").read_text())
    assert meta["min_clients"] == 2
    server = (root / "app_server" / "config" / "config_fed_server.json").read_text()
    assert "fedmed.flare.controller.FedMedController" in server and "fedmed.flare.persistor" in server
    client_cfgs = list(root.rglob("config_fed_client.json"))
    assert client_cfgs and all("fedmed.flare.executor.FedMedTrainer" in p.read_text() for p in client_cfgs)
    # fedmed is installed at each hospital; the job carries no code (no BYOC needed).
    assert not list(root.rglob("custom/*.py"))


def test_bad_controller_arguments_fail_at_construction():
    from fedmed.flare.controller import FedMedController

    job = {"name": "j", "task": "chest_xray14"}
    with pytest.raises(ValueError, match="num_rounds must be an integer >= 1"):
        FedMedController({**job, "num_rounds": 0})
    with pytest.raises(ValueError, match="unknown aggregation 'bulyan'"):
        FedMedController({**job, "aggregation": "bulyan"})
    with pytest.raises(ValueError, match="given together"):
        FedMedController(job, test_dicom_root="/x")


def _write_site_configs(root, hostile=None, privacy=None, share=()):
    for site in SITES:
        cfg = {
            "site_name": site,
            "data": {"format": "dicom", "root": "dicom", "labels_csv": "labels.csv"},
            "resources": {"num_threads": 1},
        }
        if site in share:
            cfg["share_local_model"] = True
        if hostile and site in hostile:
            cfg["hostile"] = hostile[site]
        if privacy and site in privacy:
            cfg["privacy"] = privacy[site]
        (root / site / "fedmed_site.json").write_text(json.dumps(cfg))


def _run_job(data_root, workspace, db, *extra, sites=SITES, check=True):
    env = dict(os.environ, FEDMED_DB_URL=f"sqlite:///{db}")
    proc = subprocess.run(
        [
            sys.executable,
            str(JOB),
            "--data-root",
            str(data_root),
            "--workspace",
            str(workspace),
            "--image-size",
            "64",
            "--batch-size",
            "4",
            "--sites",
            ",".join(sites),
            *extra,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0 or not check, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def write_report_for(db, run_id, out) -> str:
    from fedmed.display.report import write_report

    repo = Repository(f"sqlite:///{db}", create_schema=False)
    try:
        return write_report(repo, run_id, out).read_text()
    finally:
        repo.close()


def _simulate(data_root, workspace, db, *extra, sites=SITES):
    _run_job(data_root, workspace, db, *extra, sites=sites)
    repo = Repository(f"sqlite:///{db}", create_schema=False)
    return repo, repo.latest_run_id()


@pytest.mark.integration
def test_simulator_two_rounds_three_sites(tiny_hospitals, tmp_path):
    _write_site_configs(tiny_hospitals, share={"hospital-a"})  # hospital-a lends its local model for evaluation
    db = tmp_path / "fedmed.db"
    log = tmp_path / "sim.log"
    try:
        proc = _run_job(tiny_hospitals, tmp_path / "ws", db, "--rounds", "2", "--log-file", str(log))
    finally:
        _write_site_configs(tiny_hospitals)
    # The concise live view: one line per round per site, one per round for the server, the run's end; NVFlare's
    # full output (thousands of lines in a real run) is in the log file the job names.
    console = (proc.stdout + proc.stderr).splitlines()
    assert console[0] == f"full simulator log: {log}" and console[-1].startswith("simulation finished")
    site_lines = [line for line in console if line.startswith("  round ")]
    assert sorted((line.split()[1], line.split()[2]) for line in site_lines) == sorted(
        (str(r), s) for r in (1, 2) for s in SITES
    )
    assert [line.split(" done")[0] for line in console if " done in " in line] == ["round 1/2", "round 2/2"]
    cross_line = [line for line in console if line.startswith("cross-site evaluation done (mean_auroc): ")]
    assert len(cross_line) == 1 and "hospital-a's local model: " in cross_line[0], console
    # header, sites, rounds, cross-site, run end, finished
    assert len(console) == 1 + len(site_lines) + 2 + 1 + 2, console
    full = log.read_text()
    assert all(line.split(None, 3)[3] in full for line in site_lines) and "sending the global model" in full
    assert len(full.splitlines()) > 3 * len(console)

    repo = Repository(f"sqlite:///{db}", create_schema=False)
    run_id = repo.latest_run_id()
    rows = repo.rounds_table(run_id)
    assert [r.round_num for r in rows] == [1, 2]  # numbered as the logs number them
    for r in rows:
        assert set(r.sites_accepted) == set(SITES) and r.sites_other == ()  # every site, every round
        assert r.score is not None and 0.0 <= r.score <= 1.0 and r.score == r.mean_auroc
        assert (r.score_name, r.score_source) == ("mean_auroc", "global_test")
    assert repo.get_run(run_id).status == "finished"
    # Cross-site evaluation: every hospital scored the final global model on its own validation data, and
    # hospital-a's lent local model; the others keep theirs (share_local_model is off by default).
    cross = {(c["model"], c["site"]): c for c in repo.cross_site_results(run_id)}
    for model in ("global", "hospital-a"):
        for site in SITES:
            cell = cross[(model, site)]
            assert cell["status"] == "evaluated" and 0.0 <= cell["score"] <= 1.0 and cell["num_samples"] > 0, cell
            assert cell["score_name"] == "mean_auroc" and cell["score"] == cell["metrics"]["mean_auroc"]
            assert {k for k in cell["metrics"] if k != "mean_auroc"} <= {f"auroc/{f}" for f in CXR14_FINDINGS}
    for site in ("hospital-b", "hospital-c"):
        assert (
            cross[(site, site)]["status"] == "not_shared"
            and "share_local_model is off" in cross[(site, site)]["reason"]
        )
    assert len(cross) == 8
    test_metrics = repo.round_metrics(run_id, "global_test")
    assert set(test_metrics) == {1, 2} and any(k.startswith("auroc/") for k in test_metrics[2])
    updates = repo.client_updates(run_id)
    assert len(updates) == 6 and all(u["num_samples"] > 0 and u["update_norm"] > 0 for u in updates)
    assert abs(sum(u["aggregation_weight"] for u in updates if u["round"] == 2) - 1.0) < 1e-6

    app = tmp_path / "ws" / "cxr_densenet" / "server" / "simulate_job" / "app_server"
    final = torch.load(app / "global_model.pt", weights_only=True)["state_dict"]
    torch.manual_seed(0)
    initial = state_to_numpy(build_densenet121(14))  # what the persistor starts from (seed 0)
    changed = [k for k in initial if not np.allclose(initial[k], final[k].numpy())]
    assert len(changed) > len(initial) // 2
    best = torch.load(app / "best_model.pt", weights_only=True)["meta"]
    assert best["round"] == repo.get_run(run_id).best_round  # the model file says the round the record and log say
    # The model card says what the run did: the sites' data is generated (their configs do not declare it; the
    # images' Manufacturer does), no DP, no HE.
    card = torch.load(app / "global_model.pt", weights_only=True)["meta"]["model_card"]
    assert set(card["hospitals"]) == set(SITES)
    assert card["rounds"] == 2 and card["synthetic_data"] is True and set(card["synthetic_sites"]) == set(SITES)
    assert card["dp_epsilon"] == {s: None for s in SITES} and card["he_layers"] == [] and card["task"] == "chest_xray14"
    assert card["aggregation"] == "geometric_median" and card["intended_use"]
    # both files carry OOD statistics of the server's own test set (16 images), calibrated at the end of the run
    for name in ("global_model.pt", "best_model.pt"):
        ood = torch.load(app / name, weights_only=True)["meta"]["ood"]
        assert ood["calibration"]["data"] == "server global test set, 16 images" and ood["threshold"] > 0

    # Watched live: TensorBoard event files in the server's run dir hold every round, as recorded; the report there
    # was drawn after round 1 (then at most every 60 s) and once more at the end with the run's final status.
    run_dir = app.parent
    scalars = _tensorboard_scalars(run_dir / "tb_events")
    assert scalars["global/mean_auroc"] == pytest.approx({r.round_num: r.score for r in rows}, rel=1e-6)
    assert scalars["global/test_loss"] == pytest.approx({r.round_num: r.test_loss for r in rows}, rel=1e-6)
    for key, tag in (
        ("val_score", "site_validation"),
        ("trust", "trust"),
        ("aggregation_weight", "aggregation_weight"),
    ):
        for site in SITES:
            recorded = {u["round"]: u[key] for u in updates if u["site"] == site}
            assert scalars[f"{tag}/{site}"] == pytest.approx(recorded, rel=1e-6, abs=1e-7), (tag, site)
    assert not [t for t in scalars if t.startswith("epsilon/")]  # no DP in this run: no epsilon is made up
    live = (run_dir / "report" / "report.html").read_text()
    assert "status finished" in live and all(f"<tr><td>{n}</td>" in live for n in (1, 2))

    report = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "report.py"),
            "--db-url",
            f"sqlite:///{db}",
            "--out",
            str(tmp_path / "report"),
            "--model",
            str(app / "best_model.pt"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert report.returncode == 0, report.stderr
    page = (tmp_path / "report" / "report.html").read_text()
    assert "NOT FOR CLINICAL USE: trained on synthetic data" in page and "Model card" in page
    assert (tmp_path / "report" / "global_score.png").stat().st_size > 10_000
    assert "<h2>Cross-site evaluation</h2>" in page and (tmp_path / "report" / "cross_site.png").stat().st_size > 5_000
    assert repo.verify_audit() is None

    # The finished run keeps its final and best models where the server keeps its runs' models (the simulator's:
    # <--workspace>/fedmed_runs, which it does not wipe); the older round's file is gone.
    uid = repo.get_run(run_id).uid
    kept = sorted(p.name for p in (tmp_path / "ws" / "fedmed_runs" / uid).iterdir())
    assert kept == ["best_model.pt", "round_2.pt"], kept

    # The recorded run's final global model scored again in a job of its own (two hospitals), the run named by a
    # prefix of its uid: a run that trains nothing, whose cells match what the same hospitals' same validation data
    # gave at the end of training.
    eval_log = tmp_path / "eval.log"
    proc = _run_job(
        tiny_hospitals,
        tmp_path / "ws",
        db,
        "--cross-site-eval-only",
        uid[:10],
        "--log-file",
        str(eval_log),
        sites=SITES[:2],
    )
    assert f"scoring run {uid}'s final model (round 2, round_2.pt)" in proc.stdout
    eval_run = repo.latest_run_id()
    assert eval_run != run_id and repo.rounds_table(eval_run) == [] and repo.get_run(eval_run).num_rounds == 0
    assert repo.get_run(eval_run).status == "finished" and "cross-site evaluation only" in repo.get_run(eval_run).name
    again = repo.cross_site_results(eval_run)
    assert [(c["model"], c["site"], c["status"]) for c in again] == [("global", s, "evaluated") for s in SITES[:2]]
    for c in again:
        assert c["score"] == pytest.approx(cross[("global", c["site"])]["score"], abs=1e-6)
        assert c["model_sha256"] == cross[("global", c["site"])]["model_sha256"]
    assert f"the global model of run {run_id} round 2" in eval_log.read_text()
    assert f"run {uid}'s final model (round 2, sha256 {cross[('global', 'hospital-a')]['model_sha256'][:16]}" in (
        eval_log.read_text()
    )
    assert any(line.startswith("cross-site evaluation done") for line in proc.stdout.splitlines())
    page = write_report_for(db, eval_run, tmp_path / "eval_report")
    assert "<h2>Cross-site evaluation</h2>" in page
    assert repo.verify_audit() is None


def _tensorboard_scalars(tb_events: Path) -> dict:
    """{tag: {step: value}} of every scalar the server wrote under tb_events/<its name>/, read by TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    senders = [p for p in tb_events.iterdir() if p.is_dir()]
    assert len(senders) == 1, senders  # the server ("simulator_server" in the simulator) and no one else
    acc = EventAccumulator(str(senders[0]))
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


@pytest.mark.integration
def test_hostile_site_is_quarantined_and_recorded(tiny_hospitals, tmp_path):
    # hospital-c sends updates scaled 50x; the geometric median discounts it, trust falls, it is quarantined.
    # Its policy would lend its local model, as hospital-a's does: quarantined, it is not asked to.
    _write_site_configs(
        tiny_hospitals, hostile={"hospital-c": {"kind": "scale", "factor": 50}}, share={"hospital-a", "hospital-c"}
    )
    try:
        repo, run_id = _simulate(
            tiny_hospitals,
            tmp_path / "ws",
            tmp_path / "h.db",
            "--rounds",
            "3",
            "--aggregation",
            "geometric_median",
            "--min-clients",
            "2",
        )
    finally:
        _write_site_configs(tiny_hospitals)
    ups = {(u["round"], u["site"]): u for u in repo.client_updates(run_id)}
    first = ups[(1, "hospital-c")]  # left out of the very round it turned hostile
    assert first["status"] == "rejected" and "far outlier" in first["reason"] and first["aggregation_weight"] == 0.0
    assert ups[(1, "hospital-c")]["trust"] < ups[(1, "hospital-a")]["trust"]
    quarantined_by = min(a["round"] for a in repo.alerts(run_id) if a["kind"] == "quarantined")
    assert quarantined_by == 1  # a clearly hostile first round quarantines at once
    later = ups[(quarantined_by + 1, "hospital-c")]
    assert later["status"] == "quarantined" and "quarantined (trust" in later["reason"]
    assert later["aggregation_weight"] == 0.0
    assert all(ups[(r, s)]["status"] == "accepted" for r in (1, 2, 3) for s in ("hospital-a", "hospital-b"))
    kinds = [(a["round"], a["site"], a["kind"]) for a in repo.alerts(run_id)]
    assert (1, "hospital-c", "rejected") in kinds and (quarantined_by, "hospital-c", "quarantined") in kinds
    assert {s for _, s, _ in kinds} == {"hospital-c"}
    # Trust outlives the job: the next job of this federation starts with hospital-c still quarantined.
    trust = repo.load_trust()
    assert trust["hospital-c"].quarantined and not trust["hospital-a"].quarantined
    # Cross-site: quarantined hospital-c neither lends its model (which would run on the others' validation data)
    # nor scores any: its cells say why; the others score the global model and hospital-a's.
    cross = {(c["model"], c["site"]): c for c in repo.cross_site_results(run_id)}
    why = f"not asked: quarantined since round {quarantined_by}: "
    for model, status in (("global", "missing"), ("hospital-a", "missing"), ("hospital-c", "not_shared")):
        assert cross[(model, "hospital-c")]["status"] == status and cross[(model, "hospital-c")]["reason"].startswith(
            why
        ), cross[(model, "hospital-c")]
    assert all(cross[(m, s)]["status"] == "evaluated" for m in ("global", "hospital-a") for s in SITES[:2])
    assert not [c for c in cross.values() if c["model"] == "hospital-c" and c["status"] == "evaluated"]


@pytest.mark.integration
def test_dp_sites_report_epsilon_and_a_spent_site_refuses(tiny_hospitals, tmp_path):
    # hospital-c's own policy (sigma 1.0, ceiling 5.5) allows one round, not two: it refuses round 2 itself.
    # hospital-b keeps its losses and AUROCs home: only DP-trained weights and epsilon leave it.
    privacy = {
        "hospital-a": {"preset": "moderate"},
        "hospital-b": {"preset": "weak", "release_metrics": False},
        "hospital-c": {"epsilon": 5.5, "noise_multiplier": 1.0},
    }
    _write_site_configs(tiny_hospitals, privacy=privacy, share={"hospital-a", "hospital-b"})
    # Start from "pretrained" weights (another seed than the persistor's) and DP-train only the top of the network.
    from fedmed.flare.persistor import save_state

    torch.manual_seed(123)
    pretrained = state_to_numpy(build_densenet121(14, norm="group"))
    save_state(pretrained, tmp_path / "public.pt", {"pretrained_on": "test"})
    trained = ("features.denseblock4.denselayer16.", "features.norm5.", "class_layers.")
    try:
        repo, run_id = _simulate(
            tiny_hospitals,
            tmp_path / "ws",
            tmp_path / "dp.db",
            "--rounds",
            "2",
            "--norm",
            "group",
            "--min-clients",
            "2",
            "--initial-weights",
            str(tmp_path / "public.pt"),
            "--dp-train-layers",
            ",".join(trained),
        )
    finally:
        _write_site_configs(tiny_hospitals)
    assert repo.get_run(run_id).status == "finished"
    final = torch.load(
        tmp_path / "ws" / "cxr_densenet" / "server" / "simulate_job" / "app_server" / "global_model.pt",
        weights_only=True,
    )["state_dict"]
    moved = {k for k in pretrained if not np.allclose(pretrained[k], final[k].numpy(), atol=1e-6)}
    assert "class_layers.out.weight" in moved and all(k.startswith(trained) for k in moved)
    spend = {(p["round"], p["site"]): p for p in repo.privacy_spend(run_id)}
    for r in (1, 2):
        for site in ("hospital-a", "hospital-b"):
            assert 0 < spend[(r, site)]["epsilon"] <= spend[(r, site)]["epsilon_budget"] * 1.000001
    assert spend[(2, "hospital-a")]["epsilon"] == pytest.approx(3.0, rel=0.02)  # calibrated to the ceiling
    assert spend[(1, "hospital-c")]["epsilon"] < 5.5
    tb = _tensorboard_scalars(tmp_path / "ws" / "cxr_densenet" / "server" / "simulate_job" / "tb_events")
    for site in ("hospital-a", "hospital-b"):  # the epsilon each site reported, per round, on the live dashboard
        assert tb[f"epsilon/{site}"] == pytest.approx({r: spend[(r, site)]["epsilon"] for r in (1, 2)}, rel=1e-6)
    ups = {(u["round"], u["site"]): u for u in repo.client_updates(run_id)}
    assert ups[(2, "hospital-c")]["status"] == "refused" and "privacy budget" in ups[(2, "hospital-c")]["reason"]
    assert ups[(2, "hospital-a")]["status"] == "accepted" and ups[(2, "hospital-b")]["status"] == "accepted"
    assert all(ups[(r, "hospital-a")]["val_score"] is not None for r in (1, 2))
    assert all(ups[(r, "hospital-b")]["val_score"] is None for r in (1, 2))
    assert ("hospital-c", "refused") in [(a["site"], a["kind"]) for a in repo.alerts(run_id)]
    # Cross-site: hospital-a's DP-SGD-trained local model is the update it already released, so it lends it;
    # hospital-b keeps every score home (release_metrics false), of the global model and of hospital-a's.
    cross = {(c["model"], c["site"]): c for c in repo.cross_site_results(run_id)}
    assert {cross[(m, s)]["status"] for m in ("global", "hospital-a") for s in ("hospital-a", "hospital-c")} == {
        "evaluated"
    }
    for m in ("global", "hospital-a"):
        assert (
            cross[(m, "hospital-b")]["status"] == "refused" and "release_metrics" in cross[(m, "hospital-b")]["reason"]
        )
    # hospital-b lends its DP-trained model too (its policy allows it): the others score it, it keeps its own score
    assert cross[("hospital-b", "hospital-a")]["status"] == "evaluated"
    assert cross[("hospital-b", "hospital-b")]["status"] == "refused"
    assert cross[("hospital-c", "hospital-c")]["status"] == "not_shared"


@pytest.mark.integration
def test_a_simulation_every_site_refuses_ends_in_one_line_per_cause_without_a_traceback(tiny_hospitals, tmp_path):
    # Every hospital's policy demands DP-SGD and the job keeps batch normalisation: each refuses the job (its own
    # start-up rule, recorded as a refusal, not as a set-up failure) and no site takes part.
    _write_site_configs(tiny_hospitals, privacy={s: {"preset": "moderate"} for s in SITES})
    log = tmp_path / "sim.log"
    try:
        proc = _run_job(
            tiny_hospitals, tmp_path / "ws", tmp_path / "r.db", "--rounds", "1", "--log-file", str(log), check=False
        )
    finally:
        _write_site_configs(tiny_hospitals)
    console = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "Traceback" not in console, console
    reason = "the job must use norm='group'"
    summary = [line for line in proc.stderr.splitlines() if reason in line]
    assert summary == [
        next(line for line in summary if line.startswith(", ".join(SITES) + " refused (from round 1): "))
    ]  # one line for the three hospitals, with the fix
    assert summary[0].endswith("fix: submit with -- --norm group")
    assert proc.stdout.count(reason) == 1  # the live view shows the reason once, not once per site and round
    assert proc.stderr.strip().splitlines()[-1].startswith("job.py: the simulation failed")
