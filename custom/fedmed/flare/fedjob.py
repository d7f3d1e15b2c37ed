"""The FedJob every fedmed job script builds: FedMedController + persistor on the server, FedMedTrainer at each
site, for one task (fedmed.tasks), configured by one fedmed.jobconfig.JobConfig. The job scripts under jobs/ only
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
from pathlib import Path
from typing import Optional

from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.default_component_policy import DEFAULT_CLASS_ALLOW_LIST
from nvflare.app_common.widgets.component_path_authorizer import CLASS_ALLOW_LIST
from nvflare.job_config.api import FedJob
from nvflare.recipe import SimEnv

from fedmed import constants as C
from fedmed.console import full_output_to
from fedmed.constants import ENV_DB_URL
from fedmed.crypto import ckks
from fedmed.flare.controller import FedMedController
from fedmed.flare.executor import FedMedTrainer
from fedmed.flare.live_metrics import LiveTBReceiver
from fedmed.flare.persistor import FedMedModelPersistor
from fedmed.flare.site_memory import SITE_MEMORY_ID, SiteMemoryRelease
from fedmed.jobconfig import RUN_PREFIX, JobConfig
from fedmed.model import HEAD_PREFIX
from fedmed.parallel import ENV_SITE_THREADS, simulated_site_threads
from fedmed.resume import RUNS_DIR
from fedmed.tasks import get_task

SIMULATOR_JOB_ID = "simulate_job"  # NVFlare's simulator gives every job this id


def build_job(
    config: JobConfig,
    *,
    data_root: Path | None = None,
    he_keys_dir: Path | None = None,
    signing_keys_dir: Path | None = None,
    controller_class: type = FedMedController,
    controller_args: dict | None = None,
    **changes,
) -> FedJob:
    """The job as code, configured by `config` (with `changes`, JobConfig settings by name, applied on top).

    With data_root (simulation) each site's executor is pointed at <data_root>/<site>/fedmed_site.json and the
    server at <data_root>/global_test; without it (deployment) sites use their kit's local/fedmed_site.json and the
    server scores rounds by the sites' validation scores. With config.he_layers those parameters travel
    CKKS-encrypted; the keys come from the kits (installed from a hospital key
    custodian's set, scripts/he_keys.py), or in simulation from he_keys_dir/<site>/
    (see prepare_simulator_keys). With signing_keys_dir (simulation) each site signs its updates with the keys in
    signing_keys_dir/<site>/ (see prepare_simulator_signing). controller_class / controller_args: a FedMedController
    subclass and its extra arguments (the benchmarks' fedmed.flare.probes)."""
    config = config.with_changes(**changes) if changes else config
    spec = get_task(config.task)
    min_clients = config.required_clients
    scope = {"scope": config.privacy_scope} if config.privacy_scope else None
    job = FedJob(name=config.name, min_clients=min_clients, meta_props=scope)
    # fedmed is installed at each site (site_configs/install.sh), not shipped inside the job: hospitals run only
    # code they installed and allow-listed.
    job.set_app_packages(["fedmed"])
    he_layers = list(config.he_layers) if config.he_layers else None
    test_root = Path(data_root) / "global_test" if data_root else None
    controller_kwargs = dict(
        num_rounds=config.num_rounds,
        min_clients=min_clients,
        round_timeout=config.round_timeout,
        straggler_wait=config.straggler_wait,
        aggregation=config.aggregation,
        test_dicom_root=str(test_root / "dicom") if test_root else None,
        test_labels_csv=str(test_root / "labels.csv") if test_root else None,
        image_size=config.image_size,
        norm=config.norm,
        db_url=config.db_url,
        run_name=config.name,
        trust_smoothing=config.trust_smoothing,
        trust_ok_ratio=config.trust_ok_ratio,
        trust_bad_ratio=config.trust_bad_ratio,
        quarantine_below=config.quarantine_below,
        readmit_after=config.readmit_after,
        trust_head_cosine_bad=config.trust_head_cosine_bad,
        centred_clipping=config.centred_clipping,
        task=spec.name,
        he_layers=he_layers,
        final_model_timeout=config.final_model_timeout,
        statistics_factor=config.statistics_factor,
        validation_images=config.validation_images,
        resume_run=config.resume_run,
        models_dir=config.models_dir,
        cross_site_eval=config.cross_site_eval,
        evaluate_only=config.evaluates_only,
        cross_site_timeout=config.cross_site_timeout,
        evaluate_run=config.cross_site_eval_run,
        evaluate_model=config.cross_site_eval_model,
    )
    job.to_server(controller_class(**{**controller_kwargs, **(controller_args or {})}))
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
    spec = get_task(config.task)
    he_layers = list(config.he_layers) if config.he_layers else None
    job.to_server(
        FedMedModelPersistor(
            num_outputs=spec.num_outputs,
            initial_weights=config.cross_site_eval_only or config.initial_weights,
            seed=config.seed,
            norm=config.norm,
        ),
        id="persistor",
    )
    # The controller's per-round metrics, as TensorBoard event files in the server's run dir (fedmed.flare.live_metrics)
    job.to_server(LiveTBReceiver(), id="tb_receiver")
    for site in config.sites:
        site_config = str(Path(data_root) / site / "fedmed_site.json") if data_root else None
        he_context = str(Path(he_keys_dir) / site / ckks.CLIENT_CONTEXT_FILE) if he_layers and he_keys_dir else None
        trainer = FedMedTrainer(
            site_config=site_config,
            image_size=config.image_size,
            local_epochs=config.local_epochs,
            lr=config.lr,
            batch_size=config.batch_size,
            seed=config.seed,
            norm=config.norm,
            task=spec.name,
            he_layers=he_layers,
            he_context_file=he_context,
            dp_train_layers=list(config.dp_train_layers) if config.dp_train_layers else None,
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
    """What the key custodian does for a real federation (fedmed.crypto.keys), for the simulator: a fresh CKKS key
    set (the simulator has no hospitals to hand it to, so this process makes it); the secret-free
    server context goes into <workspace>/<job>/startup/ (the simulator copies that folder to every participant,
    which is harmless for a public context), each hospital's secret context and the key id into
    <workspace>/<job>_he_keys/<site>/. Returns the key id."""
    keys = ckks.generate_key_set()
    sim_root = Path(workspace_root).resolve() / job_name
    ckks.write_key_files(keys, sim_root / "startup", [he_keys_dir_for(workspace_root, job_name) / s for s in sites])
    return keys.key_id


def prepare_simulator_signing(workspace_root: Path, sites, job_name: str) -> Path:
    """What fedmed-federation does for a real federation (fedmed.signing), for the simulator: signing keys for the
    server and each hospital. The server's private key and every hospital's public key go into
    <workspace>/<job>/local/ (the simulator copies that folder to every participant; a server kit whose
    local/site_keys/ holds hospitals' keys requires signed updates), each hospital's private key and the server's
    public key into <workspace>/<job>_signing_keys/<site>/. Returns that folder (build_job's signing_keys_dir)."""
    from fedmed import signing

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
    Alembic's logs of the server and every site) there and show only fedmed.console's concise view: one line per
    round per site, one per round for the server, fedmed's warnings and every error."""
    workspace_root = Path(workspace_root).resolve()
    allow_fedmed_components(workspace_root / job.name)
    # The simulated sites import fedmed as installed in this Python (scripts/setup.sh: pip install -e .).
    env = SimEnv(clients=list(sites), num_threads=threads, workspace_root=str(workspace_root))
    # The sites trained at once share this machine's cores (fedmed.parallel): torch threads each = cores // threads,
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
    server will check it (fedmed.resume.plan_resume); raises ValueError with the one-line reason."""
    if not db_url:
        raise ValueError(
            f"--resume in the simulator needs --db-url or ${ENV_DB_URL}: the simulator wipes the default database "
            "in its workspace at every run"
        )
    from fedmed.resume import FIXED_OPTIONS, find_run_uid, plan_resume
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
    from fedmed.hashing import model_sha256
    from fedmed.resume import find_model_file, find_run_uid, pick_recorded_model, round_model_path, run_models_dir
    from fedmed.store.repository import Repository
    from fedmed.weights import load_state

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


def job_main(argv, config: JobConfig, description: str, default_workspace: Path) -> int:
    """Command line of a job script: simulate on generated hospitals, or export the job folder. Every option's
    default is `config`'s (the job script's JobConfig).

    Args:
        argv: arguments (None = sys.argv).
        config: the job's settings (name, task and its defaults).
        description: the script's --help text.
        default_workspace: simulator workspace root when --workspace is not given.
    """
    c = config
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
        "--sites", default=",".join(c.sites), help=f"comma-separated site names (default {','.join(c.sites)})"
    )
    p.add_argument("--rounds", dest="num_rounds", type=int, default=c.num_rounds, help=f"default {c.num_rounds}")
    p.add_argument(
        "--min-clients",
        type=int,
        default=c.min_clients,
        help="valid updates needed per round (default: sites - 1 with 3 or more sites, else all)",
    )
    p.add_argument(
        "--round-timeout",
        type=int,
        default=c.round_timeout,
        help=f"seconds before a round gives up (0 = no limit; default {c.round_timeout})",
    )
    p.add_argument(
        "--straggler-wait",
        type=int,
        default=c.straggler_wait,
        help=f"seconds to wait for the remaining sites once --min-clients have answered (default {c.straggler_wait})",
    )
    p.add_argument(
        "--aggregation",
        default=c.aggregation,
        help=f"geometric_median, fedavg, coordinate_median, trimmed_mean or krum (default {c.aggregation})",
    )
    p.add_argument("--image-size", type=int, default=c.image_size, help=f"default {c.image_size}")
    p.add_argument("--local-epochs", type=int, default=c.local_epochs, help=f"default {c.local_epochs}")
    p.add_argument("--lr", type=float, default=c.lr, help=f"default {c.lr}")
    p.add_argument("--batch-size", type=int, default=c.batch_size, help=f"default {c.batch_size}")
    p.add_argument("--seed", type=int, default=c.seed, help=f"default {c.seed}")
    p.add_argument(
        "--norm",
        choices=("batch", "group"),
        default=c.norm,
        help=f"DenseNet normalisation; 'group' is required when sites train with DP-SGD (default {c.norm})",
    )
    p.add_argument(
        "--db-url",
        default=c.db_url,
        help="SQLAlchemy URL (default $FEDMED_DB_URL, else SQLite in the server workspace)",
    )
    p.add_argument(
        "--scope",
        dest="privacy_scope",
        default=c.privacy_scope,
        help="NVFlare privacy scope of the job (a site's local/privacy.json may give it a DP ceiling under "
        "properties.fedmed_privacy)",
    )
    p.add_argument(
        "--he",
        action="store_true",
        help=f"send the classifier head ({HEAD_PREFIX}*) CKKS-encrypted; the server aggregates it blind",
    )
    p.add_argument(
        "--he-layers",
        default=",".join(c.he_layers or ()) or None,
        help="comma-separated parameter names or prefixes ending in '.' to encrypt "
        "(implies --he; default the classifier head)",
    )
    p.add_argument(
        "--dp-train-layers",
        default=",".join(c.dp_train_layers or ()) or None,
        help="comma-separated parameter-name prefixes a site trains under DP-SGD (default all), e.g. "
        "features.denseblock4.,features.norm5.,class_layers.",
    )
    p.add_argument(
        "--initial-weights",
        type=Path,
        default=c.initial_weights,
        help="state-dict file (.pt) the global model starts from, e.g. one pretrained on public data; "
        "nothing is ever downloaded",
    )
    p.add_argument(
        "--final-model-timeout",
        type=int,
        default=c.final_model_timeout,
        help=f"seconds the server waits for the sites to acknowledge the final model (default {c.final_model_timeout})",
    )
    p.add_argument(
        "--statistics-factor",
        type=float,
        default=c.statistics_factor,
        help=f"how far a site's BatchNorm statistics may move from the global model's in one round before "
        f"its update is rejected (default {c.statistics_factor:g})",
    )
    p.add_argument(
        "--validation-images",
        type=int,
        default=c.validation_images,
        help=f"score each update on this many server test images and reject one far below the median "
        f"site's; needs a test set and no HE (default {c.validation_images} = off)",
    )
    p.add_argument(
        "--resume",
        metavar="RUN",
        help="continue this interrupted or failed run (its number, its uid or a unique prefix) from its last "
        "recorded round, with the same task, aggregation, HE layers, norm, image size and rounds (fedmed.resume)",
    )
    p.add_argument(
        "--no-cross-site-eval",
        dest="cross_site_eval",
        action="store_false",
        default=c.cross_site_eval,
        help="skip the cross-site evaluation after training (every hospital scores the global model, and the local "
        "models hospitals lend, on its own validation data)",
    )
    p.add_argument(
        "--cross-site-eval-only",
        default=c.cross_site_eval_only or c.cross_site_eval_run,
        metavar="MODEL_OR_RUN",
        help="train nothing: every hospital scores this model file (on the server, e.g. a recorded run's "
        "global_model.pt), or this recorded run's model (its number, uid or a unique prefix; --cross-site-eval-model "
        "says which), on its own validation data; recorded as a run of its own",
    )
    p.add_argument(
        "--cross-site-eval-model",
        choices=("final", "best"),
        default=None,
        help="with --cross-site-eval-only RUN: the run's last recorded global model (final, the default) or its "
        "best scored round's (best), found among the server's kept model files by the sha256 the record holds",
    )
    p.add_argument(
        "--cross-site-timeout",
        type=int,
        default=c.cross_site_timeout,
        help=f"seconds to wait for the hospitals in each cross-site step (default {c.cross_site_timeout})",
    )
    trust = p.add_argument_group(
        "trust",
        "the trust rule (fedmed.robust.trust): each round a site scores 1 at or "
        "below ok-ratio x the median site distance to the aggregate, 0 at or above "
        "bad-ratio; trust is a moving average of the scores; below quarantine-below the "
        "site is left out of aggregation until readmit-after good rounds",
    )
    trust.add_argument(
        "--trust-smoothing",
        type=float,
        default=c.trust_smoothing,
        help=f"weight of the newest round, in (0, 1] (default {c.trust_smoothing})",
    )
    trust.add_argument("--trust-ok-ratio", type=float, default=c.trust_ok_ratio, help=f"default {c.trust_ok_ratio}")
    trust.add_argument("--trust-bad-ratio", type=float, default=c.trust_bad_ratio, help=f"default {c.trust_bad_ratio}")
    trust.add_argument(
        "--trust-quarantine-below",
        dest="quarantine_below",
        type=float,
        default=c.quarantine_below,
        help=f"default {c.quarantine_below}",
    )
    trust.add_argument(
        "--trust-readmit-after",
        dest="readmit_after",
        type=int,
        default=c.readmit_after,
        help=f"default {c.readmit_after}",
    )
    trust.add_argument(
        "--trust-head-cosine-bad",
        dest="trust_head_cosine_bad",
        type=float,
        default=c.trust_head_cosine_bad,
        help="a round whose classifier layers moved against the aggregate's with this cosine or lower "
        f"scores 0 (the direction rule; between -1 and 0; default {c.trust_head_cosine_bad})",
    )
    trust.add_argument(
        "--centred-clipping",
        action="store_true",
        default=c.centred_clipping,
        help="combine the kept sites by centred clipping around the server's momentum (Karimireddy, He and Jaggi "
        "2021): bounds small, consistent attacks that win over rounds; not with --he (default off)",
    )
    a = p.parse_args(argv)
    he_layers = _names(a.he_layers) or ((HEAD_PREFIX,) if a.he else None)
    if a.initial_weights is not None and not a.initial_weights.is_file():
        p.error(f"--initial-weights {a.initial_weights}: no such file")
    eval_file, eval_run = None, None
    if a.cross_site_eval_only is not None:
        if Path(a.cross_site_eval_only).is_file():
            eval_file = str(Path(a.cross_site_eval_only).resolve())
        elif RUN_PREFIX.fullmatch(a.cross_site_eval_only):
            eval_run = a.cross_site_eval_only
        else:
            p.error(f"--cross-site-eval-only {a.cross_site_eval_only}: no such model file, nor a run uid (hex)")
    if a.cross_site_eval_model is not None and eval_run is None:
        p.error("--cross-site-eval-model goes with --cross-site-eval-only RUN (a recorded run, not a model file)")
    try:
        config = c.with_changes(
            sites=_names(a.sites) or (),
            num_rounds=a.num_rounds,
            min_clients=a.min_clients,
            round_timeout=a.round_timeout,
            straggler_wait=a.straggler_wait,
            aggregation=a.aggregation,
            image_size=a.image_size,
            local_epochs=a.local_epochs,
            lr=a.lr,
            batch_size=a.batch_size,
            seed=a.seed,
            norm=a.norm,
            db_url=a.db_url,
            privacy_scope=a.privacy_scope,
            he_layers=he_layers,
            dp_train_layers=_names(a.dp_train_layers),
            initial_weights=str(Path(a.initial_weights).resolve()) if a.initial_weights else None,
            trust_smoothing=a.trust_smoothing,
            trust_ok_ratio=a.trust_ok_ratio,
            trust_bad_ratio=a.trust_bad_ratio,
            quarantine_below=a.quarantine_below,
            readmit_after=a.readmit_after,
            trust_head_cosine_bad=a.trust_head_cosine_bad,
            centred_clipping=a.centred_clipping,
            final_model_timeout=a.final_model_timeout,
            statistics_factor=a.statistics_factor,
            validation_images=a.validation_images,
            resume_run=a.resume,
            cross_site_eval=a.cross_site_eval,
            cross_site_eval_only=eval_file,
            cross_site_eval_run=eval_run,
            cross_site_eval_model=a.cross_site_eval_model or c.cross_site_eval_model,
            cross_site_timeout=a.cross_site_timeout,
        )
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
