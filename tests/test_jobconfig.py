"""fedmed.job.jobconfig.JobConfig: the one source of a job's defaults, from the job scripts' options to the components
the exported job configures; bad settings are refused naming what is wrong, before anything is built or written."""

import dataclasses
import json
import re
from pathlib import Path

import pytest

from fedmed.flare.controller import FedMedController
from fedmed.flare.executor import FedMedTrainer
from fedmed.flare.persistor import FedMedModelPersistor
from fedmed.job.jobconfig import DEFAULT_SITES, JobConfig
from fedmed.server.robust.trust import TrustPolicy
from fedmed.server.rounds import RoundRules, default_min_clients
from jobscripts import load_job_script

REPO = Path(__file__).resolve().parents[1]
TRUST = {
    "trust_smoothing": "smoothing",
    "trust_ok_ratio": "ok_ratio",
    "trust_bad_ratio": "bad_ratio",
    "quarantine_below": "quarantine_below",
    "readmit_after": "readmit_after",
    "trust_head_cosine_bad": "head_cosine_bad",
    "trust_sign_balance_bad": "sign_balance_bad",
}


def test_trust_and_min_clients_defaults_live_in_one_place():
    """JobConfig's trust settings default to TrustPolicy's; min_clients has one default (fedmed.server.rounds.
    default_min_clients), which the round engine's rules do not restate."""
    config = JobConfig(name="x", task="chest_xray14")
    policy = TrustPolicy()
    assert {k: getattr(config, k) for k in TRUST} == {k: getattr(policy, v) for k, v in TRUST.items()}
    assert config.trust_policy() == policy
    assert config.sites == DEFAULT_SITES and config.required_clients == default_min_clients(3) == 2
    assert default_min_clients(2) == 2 and default_min_clients(5) == 4
    with pytest.raises(TypeError, match="min_clients"):
        RoundRules()


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
        ({"rounds_per_epoch": 0}, "rounds_per_epoch must be an integer >= 1"),
        ({"rounds_per_epoch": 4, "local_epochs": 2}, "local_epochs must be 1"),
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
    """The job settings the Controller is constructed with, and the persistor's arguments."""
    server = json.loads((root / "app_server" / "config" / "config_fed_server.json").read_text())
    controller = next(w for w in server["workflows"] if w["path"].endswith("FedMedController"))["args"]["job"]
    persistor = next(c for c in server["components"] if c["path"].endswith("FedMedModelPersistor"))["args"]
    return controller, persistor


def _exported(root):
    """({workflow or component class: its arguments}, [each site's FedMedTrainer arguments]) of an exported job
    folder."""
    server = json.loads((root / "app_server" / "config" / "config_fed_server.json").read_text())
    workflows = {w["path"].rsplit(".", 1)[-1]: w.get("args", {}) for w in server["workflows"] + server["components"]}
    clients = [json.loads(p.read_text()) for p in sorted(root.rglob("config_fed_client.json"))]
    trainers = [c["executors"][0]["executor"] for c in clients]
    assert {t["path"] for t in trainers} == {"fedmed.flare.executor.FedMedTrainer"}
    return workflows, [t["args"] for t in trainers]


CHANGED = dict(
    sites=("h1", "h2", "h3", "h4"),
    num_rounds=3,
    min_clients=2,
    round_timeout=9,
    straggler_wait=7,
    aggregation="fedavg",
    image_size=64,
    local_epochs=2,
    lr=0.01,
    batch_size=8,
    seed=3,
    norm="group",
    db_url="sqlite:////srv/fedmed.db",
    privacy_scope="strict",
    he_layers=("class_layers.out.",),
    dp_train_layers=("class_layers.",),
    initial_weights="/srv/w.pt",
    trust_smoothing=0.25,
    trust_ok_ratio=1.5,
    trust_bad_ratio=3.0,
    quarantine_below=0.4,
    readmit_after=3,
    trust_head_cosine_bad=-0.6,
    trust_sign_balance_bad=0.3,
    final_model_timeout=30,
    statistics_factor=20.0,
    validation_images=5,
    resume_run="3fa2",
    models_dir="/srv/runs",
    cross_site_eval=False,
    cross_site_eval_model="best",
    server_lr=0.1,
    server_beta1=0.8,
    server_beta2=0.9,
    server_tau=0.01,
    proximal_mu=0.05,
    cross_site_timeout=9,
)


# A server optimiser or SCAFFOLD cannot resume a run (their state is not kept), centred clipping cannot run with HE,
# rounds_per_epoch > 1 not with the local_epochs 2 above:
# changed in a case of their own.
ALGORITHMS = dict(server_optimizer="fedyogi", scaffold=True, centred_clipping=True, rounds_per_epoch=4)


@pytest.mark.parametrize(
    "changes",
    [{}, CHANGED, {"cross_site_eval_run": "3fa2"}, ALGORITHMS],
    ids=["defaults", "changed", "eval", "algorithms"],
)
def test_every_setting_reaches_the_controller_and_the_executors_of_an_exported_job(changes, tmp_path):
    """build_job + FedJob.export_job: the exported server config holds every JobConfig setting for each workflow,
    each site's config the settings marked for sites (never the server's database URL); the components constructed
    from that JSON, as NVFlare constructs them, hold the same values (and so the same defaults) as the JobConfig."""
    from fedmed.flare.crosssite_eval import FedMedCrossSiteEval
    from fedmed.flare.fedjob import build_job

    config = JobConfig(name="every", task="brain_mri", **changes)
    if changes is CHANGED:  # every setting but the job's name and task and the evaluation-only ones differs
        default = JobConfig(name="every", task="brain_mri")
        same = {f.name for f in dataclasses.fields(JobConfig) if getattr(config, f.name) == getattr(default, f.name)}
        assert same == {"name", "task", "cross_site_eval_only", "cross_site_eval_run", *ALGORITHMS}
    build_job(config).export_job(str(tmp_path))
    workflows, trainers = _exported(tmp_path / "every")
    names = {f.name for f in dataclasses.fields(JobConfig)}
    site_names = {f.name for f in dataclasses.fields(JobConfig) if f.metadata.get("site")}
    assert set(workflows["FedMedController"]) == {"job"} and set(workflows["FedMedController"]["job"]) == names
    assert FedMedController(**workflows["FedMedController"]).config == config
    assert set(workflows["FedMedModelPersistor"]) == {"job"} and set(workflows["FedMedModelPersistor"]["job"]) == names
    assert FedMedModelPersistor(**workflows["FedMedModelPersistor"]).config == config
    if config.cross_site_eval or config.evaluates_only:
        assert FedMedCrossSiteEval(**workflows["FedMedCrossSiteEval"]).config == config
    else:
        assert "FedMedCrossSiteEval" not in workflows
    assert len(trainers) == len(config.sites)
    for args in trainers:
        assert set(args["job"]) == site_names and "db_url" not in args["job"]
        trainer = FedMedTrainer(**args)
        assert {n: getattr(trainer.config, n) for n in site_names} == {n: getattr(config, n) for n in site_names}


def test_the_executor_reads_only_the_settings_sent_to_the_sites():
    """A setting the Executor reads must travel to the sites (metadata site=True): otherwise it would silently hold
    the default there, whatever the job says."""
    source = (REPO / "custom" / "fedmed" / "flare" / "executor.py").read_text()
    read = set(re.findall(r"self\.config\.(\w+)", source))
    site_names = {f.name for f in dataclasses.fields(JobConfig) if f.metadata.get("site")}
    assert read and read <= site_names, read - site_names


def test_a_job_configuration_with_an_unknown_or_missing_setting_is_refused_naming_it():
    job = JobConfig(name="x", task="chest_xray14").to_dict()
    assert JobConfig.from_dict(json.loads(json.dumps(job))) == JobConfig(name="x", task="chest_xray14")
    with pytest.raises(ValueError, match=r"unknown job setting\(s\) \['rounds'\]"):
        FedMedController({**job, "rounds": 3})
    with pytest.raises(ValueError, match=r"unknown job setting\(s\) \['trust_tau'\]"):
        FedMedTrainer({"name": "x", "task": "chest_xray14", "trust_tau": 1.0})
    with pytest.raises(ValueError, match=r"lacks \['task'\]"):
        JobConfig.from_dict({"name": "x"})
    with pytest.raises(ValueError, match="job must be a dict"):
        JobConfig.from_dict([("name", "x")])


NOT_OPTIONS = {"name", "task", "models_dir", "cross_site_eval_run"}  # named by the job script, or derived


def test_every_setting_is_declared_with_its_help():
    """A field declared without setting(...) would have no option, no help and would never reach the sites."""
    plain = [f.name for f in dataclasses.fields(JobConfig) if not f.metadata.get("help")]
    assert not plain, f"declare {plain} with fedmed.job.jobconfig.setting(default, help, ...)"


def test_the_job_scripts_options_are_derived_from_the_settings():
    """One option per setting (but the few the job script names itself), its help the field's, its default shown
    from the job script's JobConfig; a new field with a default and help is all a new option takes."""
    import argparse

    from fedmed.flare.fedjob import add_setting_options
    from fedmed.job.jobconfig import setting

    config = JobConfig(name="x", task="brain_mri", image_size=96)
    p = argparse.ArgumentParser()
    add_setting_options(p, config)
    options = {a.dest: a for a in p._actions if a.dest != "help"}
    fields_ = {f.name: f for f in dataclasses.fields(JobConfig)}
    assert set(options) == set(fields_) - NOT_OPTIONS
    for name, action in options.items():
        assert fields_[name].metadata["help"].replace("%", "%%") in action.help, name
    assert options["image_size"].help.endswith("(default 96)") and options["num_rounds"].option_strings == ["--rounds"]
    assert options["cross_site_eval"].option_strings == ["--no-cross-site-eval"]
    assert vars(p.parse_args([])) == {}  # an option not given leaves the JobConfig's value
    parsed = vars(p.parse_args(["--sites", "a,b", "--no-cross-site-eval", "--lr", "0.5", "--he-layers", "x.,y"]))
    assert parsed == {"sites": ("a", "b"), "cross_site_eval": False, "lr": 0.5, "he_layers": ("x.", "y")}

    @dataclasses.dataclass(frozen=True)
    class WithOneMore(JobConfig):
        centred_clipping_tau: float = setting(1.0, "radius of centred clipping")

    p = argparse.ArgumentParser()
    add_setting_options(p, WithOneMore(name="x", task="brain_mri"))
    assert p.parse_args(["--centred-clipping-tau", "0.5"]).centred_clipping_tau == 0.5
    assert "radius of centred clipping (default 1.0)" in p.format_help()


@pytest.mark.parametrize("job_name", ["cxr_densenet", "brain_mri_densenet"])
def test_job_script_defaults_come_from_its_config(job_name, tmp_path):
    job = load_job_script(job_name)
    assert job.main(["--export-job", str(tmp_path)]) == 0
    controller, _ = _server_args(tmp_path / job_name)
    assert controller == job.CONFIG.to_dict()


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
            "--trust-sign-balance-bad",
            "0.3",
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
        "trust_sign_balance_bad": 0.3,
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
    assert FedMedController(controller)._rules.centred_clipping is True
    assert JobConfig(name="x", task="chest_xray14").centred_clipping is False


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--trust-bad-ratio", "1.0"], "need 0 < ok_ratio < bad_ratio"),
        (["--trust-head-cosine-bad", "0.5"], "head_cosine_bad"),
        (["--trust-sign-balance-bad", "0"], "need 0 < sign_balance_ok < sign_balance_bad"),
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
    assert controller["num_rounds"] == 2 and controller["image_size"] == 96
    assert JobConfig.from_dict(controller).required_clients == 2


def test_the_admin_follows_as_many_rounds_as_the_exported_job_runs(tmp_path):
    from fedmed.cli.submit_job import exported_num_rounds

    job = load_job_script("cxr_densenet")
    assert job.main(["--export-job", str(tmp_path / "default")]) == 0
    assert job.main(["--export-job", str(tmp_path / "three"), "--rounds", "3"]) == 0
    assert exported_num_rounds(tmp_path / "default" / "cxr_densenet") == job.CONFIG.num_rounds == 5
    assert exported_num_rounds(tmp_path / "three" / "cxr_densenet") == 3
