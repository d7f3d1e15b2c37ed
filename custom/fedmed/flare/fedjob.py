"""The FedJob every fedmed job script builds: FedMedController + persistor on the server, FedMedTrainer at each
site, for one task (fedmed.job.tasks), configured by one fedmed.job.jobconfig.JobConfig. The job scripts under jobs/ only
name their JobConfig (job name, task and any default of their own).

Run in the simulator (NVFlare 2.9's recommended SimEnv, which replaces the deprecated `nvflare simulator` CLI), or
export a job folder for the admin console (`submit_job` / `nvflare job submit`). In an exported job each hospital
reads its own data location from its kit's local/fedmed_site.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import fields
from pathlib import Path
from typing import Optional

from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.default_component_policy import DEFAULT_CLASS_ALLOW_LIST
from nvflare.app_common.widgets.component_path_authorizer import CLASS_ALLOW_LIST
from nvflare.job_config.api import FedJob
from nvflare.recipe import SimEnv

from fedmed.display.console import full_output_to
from fedmed.flare.controller import FedMedController
from fedmed.flare.crosssite_eval import FedMedCrossSiteEval
from fedmed.flare.executor import FedMedTrainer
from fedmed.flare.live_metrics import LiveTBReceiver
from fedmed.flare.persistor import FedMedModelPersistor
from fedmed.flare.site_memory import SITE_MEMORY_ID, SiteMemoryRelease
from fedmed.job import constants as C
from fedmed.job.constants import ENV_DB_URL
from fedmed.job.jobconfig import RUN_PREFIX, JobConfig
from fedmed.models.network import HEAD_PREFIX
from fedmed.security import ckks
from fedmed.server.parallel import ENV_SITE_THREADS, simulated_site_threads
from fedmed.server.resume import RUNS_DIR

SIMULATOR_JOB_ID = "simulate_job"  # NVFlare's simulator gives every job this id


def build_job(
    config: JobConfig,
    *,
    data_root: Path | None = None,
    he_keys_dir: Path | None = None,
    signing_keys_dir: Path | None = None,
    server_components: dict | None = None,
    server_test_set: bool = True,
    **changes,
) -> FedJob:
    """The job as code, configured by `config` (with `changes`, JobConfig settings by name, applied on top).

    The server's workflows are FedMedController (training) then, when the job evaluates across sites,
    FedMedCrossSiteEval; each takes the job's settings whole (config.to_dict()), as does the model persistor, the
    hospitals' Executors the settings marked for sites (config.to_dict(site=True): never the server's database URL).

    With data_root (simulation) each site's executor is pointed at <data_root>/<site>/fedmed_site.json and the
    server at <data_root>/global_test (unless server_test_set is False: scored as deployed); without it (deployment) sites use their kit's local/fedmed_site.json and the
    server scores rounds by the sites' validation scores. With config.he_layers those parameters travel
    CKKS-encrypted; the keys come from the kits (installed from a hospital key
    custodian's set, scripts/he_keys.py), or in simulation from he_keys_dir/<site>/
    (see prepare_simulator_keys). With signing_keys_dir (simulation) each site signs its updates with the keys in
    signing_keys_dir/<site>/ (see prepare_simulator_signing). server_components: {id: component} added to the
    server beside the workflows, e.g. an event listener (the benchmarks' fedmed.flare.probes.RoundProbes)."""
    config = config.with_changes(**changes) if changes else config
    scope = {"scope": config.privacy_scope} if config.privacy_scope else None
    job = FedJob(name=config.name, min_clients=config.required_clients, meta_props=scope)
    # fedmed is installed at each site (site_configs/install.sh), not shipped inside the job: hospitals run only
    # code they installed and allow-listed.
    job.set_app_packages(["fedmed"])
    test_root = Path(data_root) / "global_test" if data_root and server_test_set else None
    job.to_server(
        FedMedController(
            job=config.to_dict(),
            test_dicom_root=str(test_root / "dicom") if test_root else None,
            test_labels_csv=str(test_root / "labels.csv") if test_root else None,
        )
    )
    if config.cross_site_eval or config.evaluates_only:
        job.to_server(FedMedCrossSiteEval(job=config.to_dict()), id="cross_site_eval")
    for cid, component in (server_components or {}).items():
        job.to_server(component, id=cid)
    add_persistor_and_trainers(job, config, data_root, he_keys_dir, signing_keys_dir)
    return job


def add_persistor_and_trainers(
    job: FedJob,
    config: JobConfig,
    data_root: Path | None = None,
    he_keys_dir: Path | None = None,
    signing_keys_dir: Path | None = None,
) -> None:
    """The server's model persistor (component id "persistor") and each site's FedMedTrainer, as build_job configures
    them; also used by the benchmark that runs the same trainers under NVFlare's own FedAvg."""
    job.to_server(FedMedModelPersistor(job=config.to_dict()), id="persistor")
    # The controller's per-round metrics, as TensorBoard event files in the server's run dir (fedmed.flare.live_metrics)
    job.to_server(LiveTBReceiver(), id="tb_receiver")
    for site in config.sites:
        site_config = str(Path(data_root) / site / "fedmed_site.json") if data_root else None
        he_context = (
            str(Path(he_keys_dir) / site / ckks.CLIENT_CONTEXT_FILE) if config.he_layers and he_keys_dir else None
        )
        trainer = FedMedTrainer(
            job=config.to_dict(site=True),
            site_config=site_config,
            he_context_file=he_context,
            signatures=signing_keys_dir is not None,
            signing_key_dir=str(Path(signing_keys_dir) / site) if signing_keys_dir else None,
        )
        tasks = ["train", C.TASK_FINAL_MODEL, AppConstants.TASK_VALIDATION, AppConstants.TASK_SUBMIT_MODEL]
        job.to(trainer, site, tasks=tasks)
        job.to(SiteMemoryRelease(), site, id=SITE_MEMORY_ID)  # the site's heap back to the OS after each task


def allow_fedmed_components(workspace: Path) -> None:
    """A simulated site's component policy: NVFlare's default allow-list plus the fedmed package (what
    site_configs/install.sh sets for a real hospital)."""
    local = workspace / "local"
    local.mkdir(parents=True, exist_ok=True)
    resources = {"format_version": 2, CLASS_ALLOW_LIST: sorted(set(DEFAULT_CLASS_ALLOW_LIST) | {"fedmed."})}
    (local / "resources.json").write_text(json.dumps(resources, indent=2))


def he_keys_dir_for(workspace_root: Path, job_name: str) -> Path:
    """Where a simulation keeps its hospitals' secret keys: beside the simulator workspace, never inside it."""
    return Path(workspace_root).resolve() / f"{job_name}_he_keys"


def prepare_simulator_keys(workspace_root: Path, sites, job_name: str) -> str:
    """What the key custodian does for a real federation (fedmed.security.he_keys), for the simulator: a fresh CKKS key
    set (the simulator has no hospitals to hand it to, so this process makes it); the secret-free
    server context goes into <workspace>/<job>/startup/ (the simulator copies that folder to every participant,
    which is harmless for a public context), each hospital's secret context and the key id into
    <workspace>/<job>_he_keys/<site>/. Returns the key id."""
    keys = ckks.generate_key_set()
    sim_root = Path(workspace_root).resolve() / job_name
    ckks.write_key_files(keys, sim_root / "startup", [he_keys_dir_for(workspace_root, job_name) / s for s in sites])
    return keys.key_id


def prepare_simulator_signing(workspace_root: Path, sites, job_name: str) -> Path:
    """What fedmed-federation does for a real federation (fedmed.security.signing), for the simulator: signing keys for the
    server and each hospital. The server's private key and every hospital's public key go into
    <workspace>/<job>/local/ (the simulator copies that folder to every participant; a server kit whose
    local/site_keys/ holds hospitals' keys requires signed updates), each hospital's private key and the server's
    public key into <workspace>/<job>_signing_keys/<site>/. Returns that folder (build_job's signing_keys_dir)."""
    from fedmed.security import signing

    local = Path(workspace_root).resolve() / job_name / "local"
    keys_dir = Path(workspace_root).resolve() / f"{job_name}_signing_keys"
    server_public = signing.generate_site_keys(local, "server")
    for site in sites:
        public = signing.generate_site_keys(keys_dir / site, site)
        (local / signing.SITE_KEYS_DIR).mkdir(parents=True, exist_ok=True)
        signing.site_key_path(local, site).write_text(public.to_json())
        (keys_dir / site / signing.SERVER_KEY_FILE).write_text(server_public.to_json())
    return keys_dir


def run_simulation(job: FedJob, sites, workspace_root: Path, threads: int, log_file: Optional[Path] = None) -> Path:
    """Run the job in NVFlare's simulator. log_file: send the whole output of the simulation (NVFlare's and
    Alembic's logs of the server and every site) there and show only fedmed.display.console's concise view: one line per
    round per site, one per round for the server, fedmed's warnings and every error."""
    workspace_root = Path(workspace_root).resolve()
    allow_fedmed_components(workspace_root / job.name)
    # The simulated sites import fedmed as installed in this Python (scripts/setup.sh: pip install -e .).
    env = SimEnv(clients=list(sites), num_threads=threads, workspace_root=str(workspace_root))
    # The sites trained at once share this machine's cores (fedmed.server.parallel): torch threads each = cores // threads,
    # unless the caller's environment or a site's config says otherwise. The site processes inherit it.
    previous = os.environ.get(ENV_SITE_THREADS)
    os.environ.setdefault(ENV_SITE_THREADS, str(simulated_site_threads(threads)))
    try:
        if log_file is None:
            env.deploy(job)
        else:
            with full_output_to(log_file):
                env.deploy(job)
    finally:
        if previous is None:
            os.environ.pop(ENV_SITE_THREADS, None)
    return workspace_root / job.name


def check_simulation_resume(db_url: Optional[str], config: JobConfig) -> None:
    """Before a simulator job resumes config.resume_run: no recovery component runs in the simulator, so a
    simulation that was killed leaves its run 'running'; the one this script is about to continue is marked
    interrupted (a simulation is one process, and this script starts the next). Then the record is checked as the
    server will check it (fedmed.server.resume.plan_resume); raises ValueError with the one-line reason."""
    if not db_url:
        raise ValueError(
            f"--resume in the simulator needs --db-url or ${ENV_DB_URL}: the simulator wipes the default database "
            "in its workspace at every run"
        )
    from fedmed.server.resume import FIXED_OPTIONS, find_run_uid, plan_resume
    from fedmed.store.repository import Repository

    run = config.resume_run
    repo = Repository(db_url)
    try:
        uid = find_run_uid(repo, run)
        history = repo.run_history(uid)
        if history.status == "running" and history.job_ids[-1] == SIMULATOR_JOB_ID:
            repo.mark_interrupted([SIMULATOR_JOB_ID], "the simulation stopped before the run ended", run_uids=[uid])
            print(f"run {uid}: its simulation had stopped mid-run; marked interrupted")
            history = repo.run_history(uid)
        plan = plan_resume(history, {k: getattr(config, k) for k in FIXED_OPTIONS})
    finally:
        repo.close()
    print(f"resuming run {uid} from round {plan.from_round} ({plan.previous_status})")


def check_simulation_evaluation(db_url: Optional[str], config: JobConfig) -> None:
    """Before a simulator job scores config.cross_site_eval_run's model: the record names the model and the file
    the server will load is checked by its sha256, as the server checks it (the simulation runs here, on the
    server's files); raises ValueError (EvaluationRefused) with the one-line reason, nothing written."""
    if not db_url:
        raise ValueError(
            f"--cross-site-eval-only RUN in the simulator needs --db-url or ${ENV_DB_URL}: the simulator wipes the "
            "default database in its workspace at every run"
        )
    from fedmed.flare.persistor import BEST_MODEL_FILE
    from fedmed.models.hashing import model_sha256
    from fedmed.models.weights import load_state
    from fedmed.server.resume import (
        find_model_file,
        find_run_uid,
        pick_recorded_model,
        round_model_path,
        run_models_dir,
    )
    from fedmed.store.repository import Repository

    purpose, run = "cross-site evaluation", config.cross_site_eval_run
    repo = Repository(db_url)
    try:
        history = repo.run_history(find_run_uid(repo, run, purpose))
    finally:
        repo.close()
    recorded = pick_recorded_model(history, config.cross_site_eval_model)
    models = run_models_dir(Path(config.models_dir), recorded.run_uid)
    kept = [models / BEST_MODEL_FILE] if recorded.which == "best" else []

    def sha_of(path: Path) -> str:
        params, meta = load_state(path)
        return model_sha256(params, None)

    path = find_model_file(recorded, [*kept, round_model_path(models, recorded.model_round)], sha_of, purpose)
    print(f"scoring run {recorded.run_uid}'s {recorded.which} model (round {recorded.model_round}, {path.name})")


def _names(text: str | None) -> tuple | None:
    return tuple(x.strip() for x in text.split(",") if x.strip()) if text else None


_OPTION_TYPES = {"int": int, "float": float, "str": str, "tuple": _names}


def add_setting_options(p: argparse.ArgumentParser, config: JobConfig) -> None:
    """One option per JobConfig setting, derived from the field: its flag, help text and group from the field's
    metadata (fedmed.job.jobconfig.setting), its type from the annotation, its default shown from `config` (the job
    script's JobConfig). An option not given is absent from the parsed arguments (argparse.SUPPRESS), so `config`'s
    own value stands; a bool setting is a switch that turns its default around (--no-cross-site-eval)."""
    groups: dict = {}
    for f in fields(type(config)):
        meta = f.metadata
        if not meta.get("cli", False) or meta.get("flag") == "":
            continue
        target = p
        if meta.get("group"):
            title, description = meta["group"]
            target = groups.get(title) or groups.setdefault(title, p.add_argument_group(title, description))
        name = meta.get("flag") or f.name.replace("_", "-")
        default = getattr(config, f.name)
        help_text = meta["help"].replace("%", "%%")
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        kind = kind.replace("typing.", "").removeprefix("Optional[").removesuffix("]")  # Optional[int] -> int
        if kind == "bool":
            flag = f"--no-{name}" if default else f"--{name}"
            target.add_argument(
                flag, dest=f.name, action="store_false" if default else "store_true", default=argparse.SUPPRESS,
                help=f"{'turn off' if default else 'turn on'}: {help_text}",
            )  # fmt: skip
            continue
        shown = ",".join(default) if isinstance(default, tuple) else default
        target.add_argument(
            f"--{name}",
            dest=f.name,
            type=_OPTION_TYPES[kind],
            default=argparse.SUPPRESS,
            help=help_text + (f" (default {shown})" if shown is not None else ""),
            **meta.get("option", {}),
        )


def job_main(argv, config: JobConfig, description: str, default_workspace: Path) -> int:
    """Command line of a job script: simulate on generated hospitals, or export the job folder. One option per
    JobConfig setting (add_setting_options), each defaulting to `config`'s (the job script's JobConfig).

    Args:
        argv: arguments (None = sys.argv).
        config: the job's settings (name, task and its defaults).
        description: the script's --help text.
        default_workspace: simulator workspace root when --workspace is not given.
    """
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", type=Path, help="hospitals generated by scripts/generate_hospitals.py")
    p.add_argument("--workspace", type=Path, default=default_workspace, help="simulator workspace root")
    p.add_argument(
        "--export-job",
        dest="export",
        type=Path,
        help="export the job folder here instead of simulating (NVFlare 2.9 consumes a bare --export)",
    )
    p.add_argument("--threads", type=int, help="sites trained concurrently in the simulator (default: all)")
    p.add_argument(
        "--log-file",
        type=Path,
        help="simulation: write the full NVFlare output there and show one line per round per site "
        "(default: everything on the console)",
    )
    p.add_argument(
        "--he",
        action="store_true",
        help=f"send the classifier head ({HEAD_PREFIX}*) CKKS-encrypted (--he-layers {HEAD_PREFIX}); the server "
        "aggregates it blind",
    )
    add_setting_options(p, config)
    a = p.parse_args(argv)
    changes = {f.name: getattr(a, f.name) for f in fields(type(config)) if hasattr(a, f.name)}
    if a.he and not changes.get("he_layers"):
        changes["he_layers"] = (HEAD_PREFIX,)
    if changes.get("initial_weights") is not None:
        if not Path(changes["initial_weights"]).is_file():
            p.error(f"--initial-weights {changes['initial_weights']}: no such file")
        changes["initial_weights"] = str(Path(changes["initial_weights"]).resolve())
    # --cross-site-eval-only names a model file on the server or a recorded run: two settings
    given = changes.pop("cross_site_eval_only", None)
    if given is not None:
        if Path(given).is_file():
            changes["cross_site_eval_only"] = str(Path(given).resolve())
        elif RUN_PREFIX.fullmatch(given):
            changes["cross_site_eval_run"] = given
        else:
            p.error(f"--cross-site-eval-only {given}: no such model file, nor a run uid (hex)")
    if "cross_site_eval_model" in changes and not changes.get("cross_site_eval_run"):
        p.error("--cross-site-eval-model goes with --cross-site-eval-only RUN (a recorded run, not a model file)")
    try:
        config = config.with_changes(**changes)
    except ValueError as e:
        p.error(str(e))
    sites = list(config.sites)
    if a.export is None and a.data_root is None:
        p.error(
            f"simulation needs --data-root (run scripts/generate_hospitals.py --task {config.task} first), or "
            "use --export-job"
        )
    if a.data_root is not None:
        missing = [s for s in sites if not (a.data_root / s / "fedmed_site.json").is_file()]
        if missing:
            p.error(f"no fedmed_site.json for {missing} under {a.data_root}; generate the hospitals first")
    if a.export is None and config.models_dir is None:  # the simulator wipes its workspace at each run
        config = config.with_changes(models_dir=str(Path(a.workspace).resolve() / RUNS_DIR))
    if a.export is None and config.resume_run:
        try:
            check_simulation_resume(config.db_url or os.environ.get(ENV_DB_URL), config)
        except ValueError as e:
            p.error(str(e))
    if a.export is None and config.cross_site_eval_run:
        try:
            check_simulation_evaluation(config.db_url or os.environ.get(ENV_DB_URL), config)
        except ValueError as e:  # EvaluationRefused: its one line; nothing written, no simulation started
            p.error(str(e))
    he_keys = he_keys_dir_for(a.workspace, config.name) if config.he_layers and a.export is None else None
    job = build_job(config, data_root=a.data_root.resolve() if a.data_root else None, he_keys_dir=he_keys)
    if a.export:
        job.export_job(str(a.export))
        print(f"job exported to {a.export / job.name}")
        return 0
    if config.he_layers:
        key_id = prepare_simulator_keys(a.workspace, sites, config.name)
        print(f"HE keys for the simulation: key set {key_id[:12]}, hospital keys in {he_keys}")
    if a.log_file:
        print(f"full simulator log: {a.log_file}")
    try:
        out = run_simulation(job, sites, a.workspace, a.threads or len(sites), log_file=a.log_file)
    except RuntimeError as e:  # SimEnv: "Simulation failed with return code N" after the run's own error lines
        db_url = config.db_url or os.environ.get(ENV_DB_URL)
        for line in simulation_causes(db_url, Path(a.workspace).resolve() / job.name):
            print(line, file=sys.stderr)
        where = f"the full log is {a.log_file}" if a.log_file else "NVFlare's output above has the details"
        print(f"{p.prog}: the simulation failed ({str(e).split('.')[0]}): {where}", file=sys.stderr)
        return 2
    print(f"simulation finished; workspace {out}")
    return 0


def simulation_causes(db_url: Optional[str], job_workspace: Path) -> list[str]:
    """Why sites did not count in the simulation's run, one line per cause with every site it covers, from the run
    record (the given database, else the one the simulated server wrote in its workspace); [] when none is found."""
    from fedmed.cli.reading import ReadError, open_reader
    from fedmed.cli.submit_job import Causes

    if not db_url:
        found = sorted(Path(job_workspace).rglob("fedmed.db"))
        db_url = f"sqlite:///{found[0]}" if found else None
    try:
        repo = open_reader(db_url)
    except ReadError:
        return []
    try:
        run_id = repo.run_id_for_job(SIMULATOR_JOB_ID)
        updates = repo.client_updates(run_id) if run_id is not None else []
    except Exception:  # a record the run never wrote: the log above is all there is
        updates = []
    finally:
        repo.close()
    causes = Causes()
    for u in updates:
        if u["status"] != "accepted":
            causes.add(u["round"], u["site"], u["status"], u["reason"])
    return causes.new_lines()
