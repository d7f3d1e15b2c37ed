"""The brain MRI job: the same FedJob builder, Executor and Controller as the chest job, configured by task."""

import json
import os
import subprocess
import sys

import pytest

from fedmed.flare.persistor import FedMedModelPersistor
from fedmed.job.tasks import BRAIN_CLASSES
from fedmed.store.repository import Repository
from jobscripts import REPO, load_job_script

JOB = REPO / "jobs" / "brain_mri_densenet" / "job.py"
SITES = ("hospital-a", "hospital-b", "hospital-c")  # the brain family's default hospitals


def test_exported_brain_job_configures_the_shared_components_with_its_task(tmp_path):
    job = load_job_script("brain_mri_densenet").build_job(num_rounds=2)
    job.export_job(str(tmp_path))
    root = tmp_path / "brain_mri_densenet"
    server = json.loads((root / "app_server" / "config" / "config_fed_server.json").read_text())
    by_path = {c["path"]: c["args"] for c in server["components"]}
    controller = next(w for w in server["workflows"] if w["path"].endswith("FedMedController"))["args"]["job"]
    assert controller["task"] == "brain_mri" and controller["image_size"] == 96 and controller["num_rounds"] == 2
    persistor = FedMedModelPersistor(**by_path["fedmed.flare.persistor.FedMedModelPersistor"])
    assert persistor.num_outputs == len(BRAIN_CLASSES)
    clients = list(root.rglob("config_fed_client.json"))
    assert len(clients) == 3
    for path in clients:
        executor = json.loads(path.read_text())["executors"][0]["executor"]
        assert (
            executor["path"] == "fedmed.flare.executor.FedMedTrainer" and executor["args"]["job"]["task"] == "brain_mri"
        )


@pytest.mark.integration
def test_brain_job_in_the_simulator_records_accuracy_per_round(tiny_brain_hospitals, tmp_path):
    for site in SITES:
        cfg = {
            "site_name": site,
            "data": {"format": "dicom", "root": "dicom", "labels_csv": "labels.csv"},
            "resources": {"num_threads": 1},
        }
        (tiny_brain_hospitals / site / "fedmed_site.json").write_text(json.dumps(cfg))
    db = tmp_path / "fedmed.db"
    env = dict(os.environ, FEDMED_DB_URL=f"sqlite:///{db}")
    proc = subprocess.run(
        [
            sys.executable,
            str(JOB),
            "--data-root",
            str(tiny_brain_hospitals),
            "--workspace",
            str(tmp_path / "ws"),
            "--image-size",
            "32",
            "--batch-size",
            "4",
            "--rounds",
            "2",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    repo = Repository(f"sqlite:///{db}", create_schema=False)
    run_id = repo.latest_run_id()
    run = repo.get_run(run_id)
    assert run.status == "finished" and run.name == "brain_mri_densenet"
    assert json.loads(run.config_json)["task"] == "brain_mri"
    rows = repo.rounds_table(run_id)
    assert [r.round_num for r in rows] == [1, 2]
    assert all(set(r.sites_accepted) == set(SITES) for r in rows)
    test = repo.round_metrics(run_id, "global_test")
    for r in rows:
        m = test[r.round_num]
        assert 0.0 <= m["accuracy"] <= 1.0 and 0.0 <= m["macro_f1"] <= 1.0
        assert {f"auroc/{c}" for c in BRAIN_CLASSES} <= set(m)  # one-vs-rest, every class is in the test set
        assert r.mean_auroc == pytest.approx(m["mean_auroc"])
        # The round's score is the task's (accuracy), named so, not the AUROC.
        assert (r.score, r.score_name, r.score_source) == (pytest.approx(m["accuracy"]), "accuracy", "global_test")
    # The best round is chosen by accuracy, the task's round score.
    assert run.best_metric == pytest.approx(max(test[r]["accuracy"] for r in test))
    site_metrics = repo.round_metrics(run_id, "hospital-a")
    assert {"val_accuracy", "val_macro_f1", "train_loss"} <= set(site_metrics[2])
    site_a = [u for u in repo.client_updates(run_id) if u["site"] == "hospital-a"]
    assert [u["val_score"] for u in site_a] == [pytest.approx(site_metrics[r]["val_accuracy"]) for r in (1, 2)]
    app = tmp_path / "ws" / "brain_mri_densenet" / "server" / "simulate_job" / "app_server"
    assert (app / "global_model.pt").is_file() and (app / "best_model.pt").is_file()
    # Cross-site: each hospital scored the global model by the task's score, with the per-class metrics.
    cross = {c["site"]: c for c in repo.cross_site_results(run_id) if c["model"] == "global"}
    assert set(cross) == set(SITES)
    for c in cross.values():
        assert c["status"] == "evaluated" and c["score_name"] == "accuracy"
        assert c["score"] == c["metrics"]["accuracy"] and 0.0 <= c["metrics"]["macro_f1"] <= 1.0
        assert {k for k in c["metrics"] if k.startswith("auroc/")} <= {f"auroc/{k}" for k in BRAIN_CLASSES}

    table = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "rounds_table.py"), "--db-url", f"sqlite:///{db}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert table.returncode == 0 and "accuracy" in table.stdout and "macro_f1" in table.stdout
    assert repo.verify_audit() is None
