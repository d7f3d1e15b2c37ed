"""One job's settings, and the single source of their defaults: the job scripts' options (jobs/*/job.py, through
fedmed.flare.fedjob.job_main) take their defaults from here, and build_job configures the Controller, persistor
and Executors from it. Pure (no NVFlare import) and frozen: a changed setting is a new object (`with_changes`).

Each job script names its own: jobs/cxr_densenet/job.py has JobConfig(name="cxr_densenet", task="chest_xray14"),
jobs/brain_mri_densenet/job.py JobConfig(name="brain_mri_densenet", task="brain_mri", image_size=96).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields, replace
from typing import Optional

from fedmed.aggregation import get_aggregator
from fedmed.model import NORMS
from fedmed.robust.trust import TrustPolicy
from fedmed.screening import DEFAULT_STATISTICS_FACTOR
from fedmed.tasks import get_task

DEFAULT_SITES = ("hospital-a", "hospital-b", "hospital-c")
RUN_PREFIX = re.compile(r"[0-9a-f]{1,64}")  # a run uid (uuid4 hex) or the start of one


def _names(value, what: str) -> Optional[tuple]:
    """A list or tuple of names as a tuple; None or empty as None."""
    if value is None:
        return None
    if isinstance(value, str) or not all(isinstance(x, str) and x for x in value):
        raise ValueError(f"{what} must be a list of non-empty names, got {value!r}")
    return tuple(value) or None


@dataclass(frozen=True)
class JobConfig:
    """Everything a fedmed job sets at the server and the sites.

    Args:
        name: job name: the exported folder and the run name in the database.
        task: what the job learns, a name in fedmed.tasks.TASKS; no default, so no job silently gets another's.
        sites: the hospitals the job deploys to.
        num_rounds: federated rounds.
        min_clients: valid updates needed per round; None = all sites but one (at least 3 sites), else all.
        round_timeout: seconds before a round gives up on the sites still missing (0 = no limit).
        straggler_wait: once min_clients sites have answered, seconds to wait for the rest.
        aggregation: name in fedmed.aggregation.AGGREGATORS.
        image_size: square input size at the sites and the server.
        local_epochs / lr / batch_size: each site's local training per round (Adam; lr is round 1's).
        seed: base seed of the initial model and the sites' shuffling.
        norm: DenseNet-121 normalisation, "batch" or "group" (required where sites train with DP-SGD).
        db_url: the server's SQLAlchemy URL; None = $FEDMED_DB_URL, else SQLite in the server workspace.
        privacy_scope: the NVFlare privacy scope the job runs under at each site.
        he_layers: parameter names or prefixes ending in '.' sent CKKS-encrypted; None = no HE.
        dp_train_layers: parameter-name prefixes a DP site trains; None = all.
        initial_weights: state-dict file the server starts round 1 from; None = a fresh model (seed).
        trust_smoothing / trust_ok_ratio / trust_bad_ratio / quarantine_below / readmit_after: the trust rule
            (fedmed.robust.trust.TrustPolicy, whose defaults these are); trust_head_cosine_bad: the direction rule's
            cosine at or below which a site's classifier moved against the aggregate's (TrustPolicy.head_cosine_bad).
        centred_clipping: combine the sites the trust rule kept by centred clipping around the server's momentum
            (Karimireddy, He and Jaggi 2021; RoundRules.centred_clipping), the time-coupled answer to small, consistent
            attacks; not with he_layers (the server cannot form the momentum of encrypted layers).
        final_model_timeout: seconds the server waits for the sites to acknowledge the final model.
        statistics_factor: how far a site's BatchNorm running statistics may move from the global model's in one
            round before its update is rejected (fedmed.screening; > 1).
        validation_images: with a server test set and no HE, score each update on the first this many test images
            and reject one far below the median site's (0 = off, the default: too noisy on small sets).
        resume_run: continue this interrupted or failed run (its uid in the database, or a unique prefix) from its
            last recorded round instead of starting a new run (fedmed.resume); None = a new run.
        models_dir: where the server keeps each run's recent global models for a resumption; None = the server
            workspace's fedmed_runs/ (the simulator's job script: <--workspace>/fedmed_runs, which it does not wipe).
        cross_site_eval: after training, every hospital scores the global model (and each local model a hospital
            lends) on its own validation data; the table goes into the run's record (fedmed.crosssite).
        cross_site_eval_only: a model file on the server (e.g. a recorded run's global_model.pt): train nothing, the
            hospitals score this model; recorded as a run of its own. Not with he_layers (the server would send in
            clear a head the federation keeps encrypted) nor with initial_weights.
        cross_site_eval_run: the same on a recorded run's model instead of a file: the run's uid or a unique
            prefix; the server finds its cross_site_eval_model among the model files it keeps of the run by the
            sha256 the record holds, and refuses, with the reason and nothing written, when it cannot
            (fedmed.resume.pick_recorded_model).
        cross_site_eval_model: which model of cross_site_eval_run: "final" (its last recorded global model, the
            default) or "best" (its best scored round's).
        cross_site_timeout: seconds the server waits for the hospitals' answers in each cross-site step.
    """

    name: str
    task: str
    sites: tuple = DEFAULT_SITES
    num_rounds: int = 5
    min_clients: Optional[int] = None
    round_timeout: int = 0
    straggler_wait: int = 600
    aggregation: str = "geometric_median"
    image_size: int = 128
    local_epochs: int = 1
    lr: float = 1e-3
    batch_size: int = 16
    seed: int = 0
    norm: str = "batch"
    db_url: Optional[str] = None
    privacy_scope: Optional[str] = None
    he_layers: Optional[tuple] = None
    dp_train_layers: Optional[tuple] = None
    initial_weights: Optional[str] = None
    trust_smoothing: float = TrustPolicy.smoothing
    trust_ok_ratio: float = TrustPolicy.ok_ratio
    trust_bad_ratio: float = TrustPolicy.bad_ratio
    quarantine_below: float = TrustPolicy.quarantine_below
    readmit_after: int = TrustPolicy.readmit_after
    trust_head_cosine_bad: float = TrustPolicy.head_cosine_bad
    centred_clipping: bool = False
    final_model_timeout: int = 120
    statistics_factor: float = DEFAULT_STATISTICS_FACTOR
    validation_images: int = 0
    resume_run: Optional[str] = None
    models_dir: Optional[str] = None
    cross_site_eval: bool = True
    cross_site_eval_only: Optional[str] = None
    cross_site_eval_run: Optional[str] = None
    cross_site_eval_model: str = "final"
    cross_site_timeout: int = 300

    def __post_init__(self):
        if not self.name:
            raise ValueError("name must be a non-empty job name")
        get_task(self.task)  # raises naming the valid tasks
        sites = _names(self.sites, "sites")
        if not sites:
            raise ValueError("sites is empty: a job needs at least one hospital")
        if len(set(sites)) != len(sites):
            raise ValueError(f"sites names a hospital twice: {list(sites)}")
        object.__setattr__(self, "sites", sites)
        object.__setattr__(self, "he_layers", _names(self.he_layers, "he_layers"))
        if self.he_layers:
            from fedmed.rounds import check_encryption_compatible

            check_encryption_compatible(self.aggregation)  # an HE job with a non-linear aggregator: refused here
            if self.centred_clipping:
                raise ValueError(
                    "centred_clipping cannot be used with he_layers: it clips around the server's momentum, which "
                    "the server cannot form for the encrypted layers"
                )
        object.__setattr__(self, "dp_train_layers", _names(self.dp_train_layers, "dp_train_layers"))
        for key, low in (
            ("num_rounds", 1),
            ("image_size", 32),
            ("local_epochs", 1),
            ("batch_size", 1),
            ("round_timeout", 0),
            ("straggler_wait", 0),
            ("final_model_timeout", 0),
            ("validation_images", 0),
            ("cross_site_timeout", 1),
        ):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{key} must be an integer >= {low}, got {value!r}")
        if not isinstance(self.cross_site_eval, bool):
            raise ValueError(f"cross_site_eval must be true or false, got {self.cross_site_eval!r}")
        if self.cross_site_eval_only is not None:
            if not isinstance(self.cross_site_eval_only, str) or not self.cross_site_eval_only:
                raise ValueError(f"cross_site_eval_only must be a model file path, got {self.cross_site_eval_only!r}")
        if self.cross_site_eval_run is not None:
            if not isinstance(self.cross_site_eval_run, str) or not RUN_PREFIX.fullmatch(self.cross_site_eval_run):
                raise ValueError(
                    f"cross_site_eval_run must be a run uid or a prefix of one (hex), got {self.cross_site_eval_run!r}"
                )
            if self.cross_site_eval_only is not None:
                raise ValueError("give cross_site_eval_only (a model file) or cross_site_eval_run, not both")
        if self.cross_site_eval_model not in ("final", "best"):
            raise ValueError(f"cross_site_eval_model must be 'final' or 'best', got {self.cross_site_eval_model!r}")
        if self.evaluates_only:
            what = "cross_site_eval_only" if self.cross_site_eval_only is not None else "cross_site_eval_run"
            if self.he_layers:
                raise ValueError(
                    f"{what} cannot run with he_layers: the server would send in clear a head the "
                    "federation keeps encrypted; HE runs are evaluated across sites at the end of training"
                )
            if self.initial_weights:
                raise ValueError(f"give {what} or initial_weights, not both: the model evaluated is the first")
            if self.resume_run:
                raise ValueError(f"give {what} or resume_run, not both: an evaluation-only job trains no round")
        if self.min_clients is not None and not 1 <= self.min_clients <= len(sites):
            raise ValueError(f"min_clients must be in 1..{len(sites)} (the number of sites), got {self.min_clients}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if not (
            isinstance(self.statistics_factor, (int, float))
            and math.isfinite(self.statistics_factor)
            and self.statistics_factor > 1
        ):
            raise ValueError(f"statistics_factor must be a number > 1, got {self.statistics_factor!r}")
        if self.resume_run is not None and not (isinstance(self.resume_run, str) and self.resume_run.strip()):
            raise ValueError(f"resume_run must be a run uid or a prefix of one, got {self.resume_run!r}")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        get_aggregator(self.aggregation)  # raises naming the valid choices
        try:
            self.trust_policy()
        except ValueError as e:
            raise ValueError(
                f"trust rule (trust_smoothing, trust_ok_ratio, trust_bad_ratio, quarantine_below, "
                f"readmit_after, trust_head_cosine_bad): {e}"
            ) from None

    @property
    def evaluates_only(self) -> bool:
        """The job trains nothing: the hospitals score a model file or a recorded run's model."""
        return self.cross_site_eval_only is not None or self.cross_site_eval_run is not None

    @property
    def required_clients(self) -> int:
        """min_clients, or its default: one site may fail, refuse or be quarantined without stopping the job."""
        if self.min_clients is not None:
            return self.min_clients
        return len(self.sites) - 1 if len(self.sites) >= 3 else len(self.sites)

    def trust_policy(self) -> TrustPolicy:
        return TrustPolicy(
            smoothing=self.trust_smoothing,
            ok_ratio=self.trust_ok_ratio,
            bad_ratio=self.trust_bad_ratio,
            quarantine_below=self.quarantine_below,
            readmit_after=self.readmit_after,
            head_cosine_bad=self.trust_head_cosine_bad,
        )

    def with_changes(self, **changes) -> "JobConfig":
        """A copy with these settings changed (validated again); an unknown setting is named in the error."""
        unknown = sorted(set(changes) - {f.name for f in fields(self)})
        if unknown:
            raise TypeError(f"unknown job setting(s) {unknown}; known: {[f.name for f in fields(self)]}")
        return replace(self, **changes)
