"""The FedJob every fedmed job script builds: FedMedController + persistor on the server, FedMedTrainer at each
site, for one task (fedmed.tasks). The job scripts under jobs/ only name their task, job name and defaults.

Run in the simulator (NVFlare 2.9's recommended SimEnv, which replaces the deprecated `nvflare simulator` CLI), or
export a job folder for the admin console (`submit_job` / `nvflare job submit`). In an exported job each hospital
reads its own data location from its kit's local/fedmed_site.json.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Optional

from nvflare.app_common.default_component_policy import DEFAULT_CLASS_ALLOW_LIST
from nvflare.app_common.widgets.component_path_authorizer import CLASS_ALLOW_LIST
from nvflare.job_config.api import FedJob
from nvflare.recipe import SimEnv

import fedmed
from fedmed import constants as C
from fedmed.crypto import ckks
from fedmed.flare.controller import FedMedController
from fedmed.flare.executor import FedMedTrainer
from fedmed.flare.persistor import FedMedModelPersistor
from fedmed.model import HEAD_PREFIX
from fedmed.tasks import DEFAULT_TASK, get_task

DEFAULT_SITES = ("hospital-a", "hospital-b", "hospital-c")
# Where the fedmed package lives (custom/): simulated sites find it through PYTHONPATH, as an installed site would.
PACKAGE_ROOT = Path(fedmed.__file__).resolve().parents[1]


def build_job(
    sites=DEFAULT_SITES,
    data_root: Path | None = None,
    num_rounds: int = 5,
    min_clients: int | None = None,
    round_timeout: int = 0,
    straggler_wait: int = 600,
    aggregation: str = "geometric_median",
    image_size: int = 128,
    local_epochs: int = 1,
    lr: float = 1e-3,
    batch_size: int = 16,
    seed: int = 0,
    norm: str = "batch",
    db_url: str | None = None,
    name: str = "cxr_densenet",
    task: str = DEFAULT_TASK,
    he_layers: list | None = None,
    he_keys_dir: Path | None = None,
    privacy_scope: str | None = None,
    dp_train_layers: list | None = None,
    initial_weights: str | None = None,
) -> FedJob:
    """The job as code. With data_root (simulation) each site's executor is pointed at
    <data_root>/<site>/fedmed_site.json and the server at <data_root>/global_test; without it (deployment) sites use
    their kit's local/fedmed_site.json and the server evaluates by the sites' validation scores.
    With he_layers those parameters travel CKKS-encrypted; the keys come from the kits (installed from a hospital key
    custodian's set, scripts/he_keys.py), or
    in simulation from he_keys_dir/<site>/ (see prepare_simulator_keys). privacy_scope names the NVFlare privacy
    scope the job runs under at each site (its local/privacy.json may set a DP ceiling for that scope).
    dp_train_layers: parameter-name prefixes sites train under DP-SGD (None = all); initial_weights: a state-dict
    file the server starts round 1 from (e.g. a model pretrained on public data), read on the server."""
    spec = get_task(task)  # fail here, naming the valid tasks, not in a site process
    sites = list(sites)
    # Default: one site may fail, refuse or be quarantined without stopping the job (all are still waited for).
    min_clients = (len(sites) - 1 if len(sites) >= 3 else len(sites)) if min_clients is None else min_clients
    job = FedJob(name=name, min_clients=min_clients, meta_props={"scope": privacy_scope} if privacy_scope else None)
    # fedmed is installed at each site (site_configs/install.sh), not shipped inside the job: hospitals run only
    # code they installed and allow-listed.
    job.set_app_packages(["fedmed"])
    test_root = Path(data_root) / "global_test" if data_root else None
    controller = FedMedController(
        num_rounds=num_rounds,
        min_clients=min_clients,
        round_timeout=round_timeout,
        straggler_wait=straggler_wait,
        aggregation=aggregation,
        test_dicom_root=str(test_root / "dicom") if test_root else None,
        test_labels_csv=str(test_root / "labels.csv") if test_root else None,
        image_size=image_size,
        norm=norm,
        db_url=db_url,
        run_name=name,
        task=spec.name,
        he_layers=he_layers,
    )
    job.to_server(controller)
    job.to_server(FedMedModelPersistor(num_outputs=spec.num_outputs, initial_weights=initial_weights, seed=seed,
                                       norm=norm), id="persistor")
    for site in sites:
        site_config = str(Path(data_root) / site / "fedmed_site.json") if data_root else None
        he_context = str(Path(he_keys_dir) / site / ckks.CLIENT_CONTEXT_FILE) if he_layers and he_keys_dir else None
        trainer = FedMedTrainer(site_config=site_config, image_size=image_size, local_epochs=local_epochs, lr=lr,
                                batch_size=batch_size, seed=seed, norm=norm, task=spec.name, he_layers=he_layers,
                                he_context_file=he_context, dp_train_layers=dp_train_layers)
        job.to(trainer, site, tasks=["train", C.TASK_FINAL_MODEL])
    return job


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


def run_simulation(job: FedJob, sites, workspace_root: Path, threads: int) -> Path:
    workspace_root = Path(workspace_root).resolve()
    allow_fedmed_components(workspace_root / job.name)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(PACKAGE_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    SimEnv(clients=list(sites), num_threads=threads, workspace_root=str(workspace_root)).deploy(job)
    return workspace_root / job.name


def job_main(argv, name: str, task: str, description: str, default_workspace: Path,
             defaults: Optional[dict] = None) -> int:
    """Command line of a job script: simulate on generated hospitals, or export the job folder.

    Args:
        argv: arguments (None = sys.argv).
        name: job name (the exported folder and the run name in the database).
        task: name in fedmed.tasks.TASKS.
        description: the script's --help text.
        default_workspace: simulator workspace root when --workspace is not given.
        defaults: per-job defaults of the options below, by argparse dest (e.g. {"rounds": 5, "image_size": 96}).
    """
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", type=Path, help="hospitals generated by scripts/generate_hospitals.py")
    p.add_argument("--workspace", type=Path, default=default_workspace, help="simulator workspace root")
    p.add_argument("--export-job", dest="export", type=Path,
                   help="export the job folder here instead of simulating (NVFlare 2.9 consumes a bare --export)")
    p.add_argument("--sites", default=",".join(DEFAULT_SITES), help="comma-separated site names")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--min-clients", type=int, help="valid updates needed per round (default: sites - 1, min 1)")
    p.add_argument("--round-timeout", type=int, default=0, help="seconds before a round gives up (0 = no limit)")
    p.add_argument("--straggler-wait", type=int, default=600,
                   help="seconds to wait for the remaining sites once --min-clients have answered")
    p.add_argument("--aggregation", default="geometric_median",
                   help="geometric_median, fedavg, coordinate_median, trimmed_mean or krum")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--norm", choices=("batch", "group"), default="batch",
                   help="DenseNet normalisation; 'group' is required when sites train with DP-SGD")
    p.add_argument("--threads", type=int, help="sites trained concurrently in the simulator (default: all)")
    p.add_argument("--db-url", help="SQLAlchemy URL (default $FEDMED_DB_URL, else SQLite in the server workspace)")
    p.add_argument("--scope", help="NVFlare privacy scope of the job (a site's local/privacy.json may give it a "
                                   "DP ceiling under properties.fedmed_privacy)")
    p.add_argument("--he", action="store_true",
                   help=f"send the classifier head ({HEAD_PREFIX}*) CKKS-encrypted; the server aggregates it blind")
    p.add_argument("--he-layers", help="comma-separated parameter names or prefixes ending in '.' to encrypt "
                                       "(implies --he; default the classifier head)")
    p.add_argument("--dp-train-layers",
                   help="comma-separated parameter-name prefixes a site trains under DP-SGD (default all), e.g. "
                        "features.denseblock4.,features.norm5.,class_layers.")
    p.add_argument("--initial-weights", type=Path,
                   help="state-dict file (.pt) the global model starts from, e.g. one pretrained on public data; "
                        "nothing is ever downloaded")
    p.set_defaults(**(defaults or {}))
    a = p.parse_args(argv)
    sites = [s.strip() for s in a.sites.split(",") if s.strip()]
    if not sites:
        p.error("--sites is empty")
    if a.export is None and a.data_root is None:
        p.error(f"simulation needs --data-root (run scripts/generate_hospitals.py --task {task} first), or use "
                "--export-job")
    if a.data_root is not None:
        missing = [s for s in sites if not (a.data_root / s / "fedmed_site.json").is_file()]
        if missing:
            p.error(f"no fedmed_site.json for {missing} under {a.data_root}; generate the hospitals first")
    he_layers = [x.strip() for x in a.he_layers.split(",") if x.strip()] if a.he_layers else None
    dp_train_layers = [x.strip() for x in a.dp_train_layers.split(",") if x.strip()] if a.dp_train_layers else None
    if a.initial_weights is not None and not a.initial_weights.is_file():
        p.error(f"--initial-weights {a.initial_weights}: no such file")
    if a.he and not he_layers:
        he_layers = [HEAD_PREFIX]
    he_keys = he_keys_dir_for(a.workspace, name) if he_layers and a.export is None else None
    job = build_job(
        sites, a.data_root.resolve() if a.data_root else None, a.rounds, a.min_clients, a.round_timeout,
        a.straggler_wait, a.aggregation, a.image_size, a.local_epochs, a.lr, a.batch_size, a.seed, a.norm, a.db_url,
        name=name, task=task, he_layers=he_layers, he_keys_dir=he_keys, privacy_scope=a.scope,
        dp_train_layers=dp_train_layers,
        initial_weights=str(a.initial_weights.resolve()) if a.initial_weights else None,
    )
    if a.export:
        job.export_job(str(a.export))
        print(f"job exported to {a.export / job.name}")
        return 0
    if he_layers:
        key_id = prepare_simulator_keys(a.workspace, sites, name)
        print(f"HE keys for the simulation: key set {key_id[:12]}, hospital keys in {he_keys}")
    out = run_simulation(job, sites, a.workspace, a.threads or len(sites))
    print(f"simulation finished; workspace {out}")
    return 0
