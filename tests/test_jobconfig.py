"""fedmed.jobconfig.JobConfig: the one source of a job's defaults, from the job scripts' options to the components
the exported job configures; bad settings are refused naming what is wrong, before anything is built or written."""

import dataclasses
import inspect
import json
import re

import pytest

from fedmed.flare.controller import FedMedController
from fedmed.flare.executor import FedMedTrainer
from fedmed.flare.persistor import FedMedModelPersistor
from fedmed.jobconfig import DEFAULT_SITES, JobConfig
from fedmed.robust.trust import TrustPolicy
from jobscripts import load_job_script

TRUST = {
    "trust_smoothing": "smoothing",
    "trust_ok_ratio": "ok_ratio",
    "trust_bad_ratio": "bad_ratio",
    "quarantine_below": "quarantine_below",
    "readmit_after": "readmit_after",
    "trust_head_cosine_bad": "head_cosine_bad",
}


def _defaults(cls) -> dict:
    return {
        n: p.default
        for n, p in inspect.signature(cls.__init__).parameters.items()
        if p.default is not inspect.Parameter.empty
    }


def test_config_defaults_are_the_components_defaults():
    """A component constructed without the job (e.g. in a hand-written config) behaves as the job's default."""
    config = JobConfig(name="x", task="chest_xray14")
    # min_clients: the job derives it from its sites; the task is the job's own choice, never a silent default.
    derived = {"min_clients", "task"}
    for cls in (FedMedController, FedMedTrainer, FedMedModelPersistor):
        shared = {n: d for n, d in _defaults(cls).items() if hasattr(config, n) and n not in derived}
        assert shared, cls
        assert {n: getattr(config, n) for n in shared} == shared, cls.__name__
    policy = TrustPolicy()
    assert {k: getattr(config, k) for k in TRUST} == {k: getattr(policy, v) for k, v in TRUST.items()}
    assert config.sites == DEFAULT_SITES and config.required_clients == 2


def test_config_is_frozen_and_changes_make_a_validated_copy():
    config = JobConfig(name="x", task="brain_mri", sites=["a", "b"], he_layers=["class_layers.out."])
    assert config.sites == ("a", "b") and config.he_layers == ("class_layers.out.",)  # lists become tuples
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.num_rounds = 9
    changed = config.with_changes(num_rounds=9, readmit_after=4)
    assert (changed.num_rounds, changed.readmit_after, config.num_rounds) == (9, 4, 5)
    assert changed.trust_policy().readmit_after == 4
    with pytest.raises(TypeError, match=r"unknown job setting\(s\) \['rounds'\]"):
        config.with_changes(rounds=3)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"task": "lung_ct"}, "unknown task 'lung_ct'"),
        ({"sites": []}, "sites is empty"),
        ({"sites": "hospital-a"}, "sites must be a list"),
        ({"sites": ["a", "a"]}, "names a hospital twice"),
        ({"min_clients": 4}, r"min_clients must be in 1\.\.3"),
        ({"num_rounds": 0}, "num_rounds must be an integer >= 1"),
        ({"image_size": 16}, "image_size must be an integer >= 32"),
        ({"lr": float("nan")}, "lr must be a positive number"),
        ({"norm": "layer"}, "norm must be one of"),
        ({"aggregation": "bulyan"}, "unknown aggregation 'bulyan'"),
        ({"trust_ok_ratio": 5.0}, r"trust rule .*ok_ratio < bad_ratio"),
        ({"quarantine_below": 1.5}, "quarantine_below must be in"),
        ({"readmit_after": 0}, "readmit_after must be >= 1"),
        ({"statistics_factor": 1.0}, "statistics_factor must be a number > 1"),
        ({"validation_images": -1}, "validation_images must be an integer >= 0"),
        ({"he_layers": ["class_layers.out.", ""]}, "he_layers must be a list of non-empty names"),
    ],
)
def test_bad_settings_are_refused_naming_the_setting(changes, message):
    with pytest.raises(ValueError, match=message):
        JobConfig(**{"name": "x", "task": "chest_xray14", **changes})


def test_a_job_without_a_task_is_refused():
    with pytest.raises(TypeError, match="task"):
        JobConfig(name="x")


def _server_args(root):
    """The arguments the server's components are constructed with (NVFlare exports only non-default ones)."""
    server = json.loads((root / "app_server" / "config" / "config_fed_server.json").read_text())
    controller = next(w for w in server["workflows"] if w["path"].endswith("FedMedController"))["args"]
    persistor = next(c for c in server["components"] if c["path"].endswith("FedMedModelPersistor"))["args"]
    return {**_defaults(FedMedController), **controller}, {**_defaults(FedMedModelPersistor), **persistor}


@pytest.mark.parametrize("job_name", ["cxr_densenet", "brain_mri_densenet"])
def test_job_script_defaults_come_from_its_config(job_name, tmp_path):
    job = load_job_script(job_name)
    assert job.main(["--export-job", str(tmp_path)]) == 0
    controller, persistor = _server_args(tmp_path / job_name)
    c = job.CONFIG
    assert controller["task"] == c.task and controller["run_name"] == c.name
    for key in (
        "num_rounds",
        "round_timeout",
        "straggler_wait",
        "aggregation",
        "image_size",
        "norm",
        "final_model_timeout",
        "statistics_factor",
        "validation_images",
        *TRUST,
    ):
        assert controller[key] == getattr(c, key), key
    assert controller["min_clients"] == c.required_clients and persistor["seed"] == c.seed
    client = json.loads(next((tmp_path / job_name).rglob("config_fed_client.json")).read_text())
    trainer = {**_defaults(FedMedTrainer), **client["executors"][0]["executor"]["args"]}
    assert {k: trainer[k] for k in ("image_size", "local_epochs", "lr", "batch_size", "seed", "norm")} == {
        k: getattr(c, k) for k in ("image_size", "local_epochs", "lr", "batch_size", "seed", "norm")
    }


def test_trust_options_reach_the_controller(tmp_path):
    job = load_job_script("cxr_densenet")
    rc = job.main(
        [
            "--export-job",
            str(tmp_path),
            "--trust-smoothing",
            "0.25",
            "--trust-ok-ratio",
            "1.5",
            "--trust-bad-ratio",
            "3",
            "--trust-quarantine-below",
            "0.4",
            "--trust-readmit-after",
            "3",
            "--trust-head-cosine-bad",
            "-0.6",
            "--final-model-timeout",
            "30",
            "--statistics-factor",
            "20",
            "--validation-images",
            "50",
        ]
    )
    assert rc == 0
    controller, _ = _server_args(tmp_path / "cxr_densenet")
    keys = (*TRUST, "final_model_timeout", "statistics_factor", "validation_images")
    assert {k: controller[k] for k in keys} == {
        "trust_smoothing": 0.25,
        "trust_ok_ratio": 1.5,
        "trust_bad_ratio": 3.0,
        "quarantine_below": 0.4,
        "readmit_after": 3,
        "trust_head_cosine_bad": -0.6,
        "final_model_timeout": 30,
        "statistics_factor": 20.0,
        "validation_images": 50,
    }


def test_centred_clipping_option_reaches_the_round_rules(tmp_path):
    # Off by default (the defaults test above); --centred-clipping reaches the controller and its RoundRules.
    job = load_job_script("cxr_densenet")
    assert job.main(["--export-job", str(tmp_path), "--centred-clipping"]) == 0
    controller, _ = _server_args(tmp_path / "cxr_densenet")
    assert controller["centred_clipping"] is True
    args = {k: v for k, v in controller.items() if k in inspect.signature(FedMedController.__init__).parameters}
    assert FedMedController(**args)._rules.centred_clipping is True
    assert JobConfig(name="x", task="chest_xray14").centred_clipping is False


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--trust-bad-ratio", "1.0"], "need 0 < ok_ratio < bad_ratio"),
        (["--trust-head-cosine-bad", "0.5"], "head_cosine_bad"),
        (["--sites", " , "], "sites is empty"),
        (["--min-clients", "5"], r"min_clients must be in 1\.\.3"),
        (["--aggregation", "bulyan"], "unknown aggregation 'bulyan'"),
        (["--he", "--centred-clipping"], "centred_clipping cannot be used with he_layers"),
    ],
)
def test_bad_job_options_exit_naming_the_problem_and_export_nothing(argv, message, tmp_path, capsys):
    job = load_job_script("cxr_densenet")
    with pytest.raises(SystemExit) as exit_info:
        job.main(["--export-job", str(tmp_path / "out"), *argv])
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_build_job_takes_settings_by_name_only(tmp_path):
    job = load_job_script("brain_mri_densenet")
    with pytest.raises(TypeError):
        job.build_job(["hospital-a"], tmp_path)  # the old positional call style
    with pytest.raises(TypeError, match="unknown job setting"):
        job.build_job(rounds=2)
    built = job.build_job(sites=["hospital-a", "hospital-b"], num_rounds=2)
    built.export_job(str(tmp_path))
    controller, _ = _server_args(tmp_path / "brain_mri_densenet")
    assert controller["num_rounds"] == 2 and controller["min_clients"] == 2 and controller["image_size"] == 96


def test_the_admin_follows_as_many_rounds_as_the_exported_job_runs(tmp_path):
    from fedmed.cli.submit_job import exported_num_rounds

    job = load_job_script("cxr_densenet")
    assert job.main(["--export-job", str(tmp_path / "default")]) == 0
    assert job.main(["--export-job", str(tmp_path / "three"), "--rounds", "3"]) == 0
    assert exported_num_rounds(tmp_path / "default" / "cxr_densenet") == job.CONFIG.num_rounds == 5
    assert exported_num_rounds(tmp_path / "three" / "cxr_densenet") == 3
