"""One job's settings: the single place each setting's name, default and help live.

Every component of a job takes the job whole: build_job passes `JobConfig.to_dict()` to the Controller (all of it)
and to each Executor (the settings marked `site`, so the server's database URL never reaches a hospital); they parse
it back with `JobConfig.from_dict`, which refuses an unknown key naming it. The job scripts' options
(fedmed.flare.fedjob.job_main) are derived from the fields: flag, help text and option group come from each
field's metadata (`setting(...)`), the default from the job script's own JobConfig. Pure (no NVFlare import) and
frozen: a changed setting is a new, validated object (`with_changes`).

Adding a setting: one `name: type = setting(default, "help", ...)` line here (plus its check in __post_init__ if
it has a rule), and its use where it is read (`self.config.name` in the Controller or the Executor; `site=True` if
the hospitals read it). The option, the exported job and the components follow from that line.

Each job script names its own: jobs/cxr_densenet/job.py has JobConfig(name="cxr_densenet", task="chest_xray14"),
jobs/brain_mri_densenet/job.py JobConfig(name="brain_mri_densenet", task="brain_mri", image_size=96).
"""

from __future__ import annotations

import math
import re
from dataclasses import MISSING, dataclass, field, fields, replace
from typing import Any, Optional

from fedmed.job.tasks import get_task
from fedmed.learning.algorithms import SERVER_OPTIMIZERS, FedAlgorithm, ServerOptimizer
from fedmed.models.network import NORMS
from fedmed.server.aggregation import get_aggregator
from fedmed.server.robust.trust import TrustPolicy
from fedmed.server.rounds import default_min_clients
from fedmed.server.screening import DEFAULT_STATISTICS_FACTOR

DEFAULT_SITES = ("hospital-a", "hospital-b", "hospital-c")
RUN_PREFIX = re.compile(r"[0-9a-f]{1,64}")  # a run uid (uuid4 hex) or the start of one
_ALGORITHMS = (
    "federated algorithms",
    "on top of the robust round (fedmed.learning.algorithms): FedOpt at the server, FedProx and SCAFFOLD at the sites",
)
TRUST_GROUP = (
    "trust",
    "the trust rule (fedmed.server.robust.trust): each round a site scores 1 at or below ok-ratio x the median site "
    "distance to the aggregate, 0 at or above bad-ratio; trust is a moving average of the scores; below "
    "quarantine-below the site is left out of aggregation until readmit-after good rounds",
)


def setting(
    default: Any = MISSING,
    help: str = "",
    *,
    flag: Optional[str] = None,
    site: bool = False,
    cli: bool = True,
    group: Optional[tuple] = None,
    **option: Any,
):
    """A JobConfig field with what the job script's option needs.

    help: the option's help text (its default is appended); flag: the option's name when not --<name-with-dashes>
    ("" = no option of its own); site: the hospitals' Executors read it (it travels in config_fed_client.json);
    cli: False for a setting the job script names itself (name, task); group: (title, description) of an option
    group; option: more of argparse's add_argument keywords (choices, metavar)."""
    meta = {"help": help, "flag": flag, "site": site, "cli": cli, "group": group, "option": option}
    return field(default=default, metadata=meta)


def _names(value, what: str) -> Optional[tuple]:
    """A list or tuple of names as a tuple; None or empty as None."""
    if value is None:
        return None
    if isinstance(value, str) or not all(isinstance(x, str) and x for x in value):
        raise ValueError(f"{what} must be a list of non-empty names, got {value!r}")
    return tuple(value) or None


@dataclass(frozen=True)
class JobConfig:
    """Everything a fedmed job sets at the server and the sites; each field's help is in its metadata."""

    name: str = setting(help="job name: the exported folder and the run name in the database", site=True, cli=False)
    task: str = setting(
        help="what the job learns, a name in fedmed.job.tasks.TASKS; no default, so no job silently gets another's",
        site=True,
        cli=False,
    )
    sites: tuple = setting(DEFAULT_SITES, "comma-separated site names: the hospitals the job deploys to")
    num_rounds: int = setting(5, "federated rounds", flag="rounds")
    min_clients: Optional[int] = setting(
        None, "valid updates needed per round (none given: sites - 1 with 3 or more sites, else all)"
    )
    round_timeout: int = setting(0, "seconds before a round gives up on the sites still missing (0 = no limit)")
    straggler_wait: int = setting(600, "once --min-clients sites have answered, seconds to wait for the rest")
    aggregation: str = setting(
        "geometric_median",
        "a name in fedmed.server.aggregation.AGGREGATORS: geometric_median, fedavg, coordinate_median, trimmed_mean or krum",
    )
    image_size: int = setting(128, "square input size at the sites and the server", site=True)
    local_epochs: int = setting(1, "each site's local epochs per round", site=True)
    rounds_per_epoch: int = setting(
        1,
        "k > 1: each site trains one epoch over k rounds, a 1/k share of its images each round (shorter local work "
        "between aggregations; set rounds to k x the epochs; local_epochs must be 1)",
        site=True,
    )
    lr: float = setting(
        1e-3, "round 1's Adam learning rate at each site (cosine-decayed to 10% by the last)", site=True
    )
    batch_size: int = setting(16, "each site's training batch size", site=True)
    seed: int = setting(0, "base seed of the initial model and the sites' shuffling", site=True)
    norm: str = setting(
        "batch",
        "DenseNet-121 normalisation; 'group' is required where sites train with DP-SGD",
        site=True,
        choices=NORMS,
    )
    db_url: Optional[str] = setting(
        None, "the server's SQLAlchemy URL (none given: $FEDMED_DB_URL, else SQLite in the server workspace)"
    )
    privacy_scope: Optional[str] = setting(
        None,
        "NVFlare privacy scope of the job at each site (a site's local/privacy.json may give it a DP ceiling under "
        "properties.fedmed_privacy)",
        flag="scope",
    )
    he_layers: Optional[tuple] = setting(
        None,
        "comma-separated parameter names or prefixes ending in '.' sent CKKS-encrypted (the server aggregates them "
        "blind; --he: the classifier head); none = no HE",
        site=True,
    )
    dp_train_layers: Optional[tuple] = setting(
        None,
        "comma-separated parameter-name prefixes a site trains under DP-SGD (none = all), e.g. "
        "features.denseblock4.,features.norm5.,class_layers.",
        site=True,
    )
    initial_weights: Optional[str] = setting(
        None,
        "state-dict file (.pt) the global model starts from, e.g. one pretrained on public data (none: a fresh "
        "model from --seed); nothing is ever downloaded",
        metavar="FILE",
    )
    trust_smoothing: float = setting(
        TrustPolicy.smoothing, "weight of the newest round in a site's trust, in (0, 1]", group=TRUST_GROUP
    )
    trust_ok_ratio: float = setting(
        TrustPolicy.ok_ratio, "a site at or below this x the median distance scores 1", group=TRUST_GROUP
    )
    trust_bad_ratio: float = setting(
        TrustPolicy.bad_ratio, "a site at or above this x the median distance scores 0", group=TRUST_GROUP
    )
    quarantine_below: float = setting(
        TrustPolicy.quarantine_below,
        "trust below which a site is left out of aggregation",
        flag="trust-quarantine-below",
        group=TRUST_GROUP,
    )
    readmit_after: int = setting(
        TrustPolicy.readmit_after,
        "good rounds in a row that re-admit a quarantined site",
        flag="trust-readmit-after",
        group=TRUST_GROUP,
    )
    trust_head_cosine_bad: float = setting(
        TrustPolicy.head_cosine_bad,
        "a round whose classifier layers moved against the aggregate's with this cosine or lower scores 0 (the "
        "direction rule; between -1 and 0)",
        group=TRUST_GROUP,
    )
    trust_sign_balance_bad: float = setting(
        TrustPolicy.sign_balance_bad,
        "a round whose move's sign balance lies this far or more from the median site's scores 0 (the sign rule, "
        "fedmed.server.robust.sign_balance; half of it scores 1); above 2 turns the rule off",
        group=TRUST_GROUP,
    )
    centred_clipping: bool = setting(
        False,
        "combine the kept sites by centred clipping around the server's momentum (Karimireddy, He and Jaggi 2021; "
        "RoundRules.centred_clipping): the time-coupled answer to small, consistent attacks; not with HE (the server "
        "cannot form the momentum of encrypted layers)",
        group=TRUST_GROUP,
    )
    final_model_timeout: int = setting(120, "seconds the server waits for the sites to acknowledge the final model")
    statistics_factor: float = setting(
        DEFAULT_STATISTICS_FACTOR,
        "how far a site's BatchNorm running statistics may move from the global model's in one round before its "
        "update is rejected (fedmed.server.screening; > 1)",
    )
    validation_images: int = setting(
        0,
        "with a server test set and no HE, score each update on the first this many test images and reject one far "
        "below the median site's (0 = off: too noisy on small sets)",
    )
    resume_run: Optional[str] = setting(
        None,
        "continue this interrupted or failed run (its number, its uid or a unique prefix) from its last recorded "
        "round, with the same task, aggregation, HE layers, norm, image size and rounds (fedmed.server.resume)",
        flag="resume",
        metavar="RUN",
    )
    models_dir: Optional[str] = setting(
        None,
        "where the server keeps each run's recent global models for a resumption (none: the server workspace's "
        "fedmed_runs/; the simulator: <--workspace>/fedmed_runs, which it does not wipe)",
        cli=False,
    )
    cross_site_eval: bool = setting(
        True,
        "after training, every hospital scores the global model, and the local models hospitals lend, on its own "
        "validation data; the table goes into the run's record (fedmed.server.crosssite)",
    )
    cross_site_eval_only: Optional[str] = setting(
        None,
        "train nothing: every hospital scores this model file (on the server, e.g. a recorded run's "
        "global_model.pt), or this recorded run's model (its number, uid or a unique prefix; "
        "--cross-site-eval-model says which), on its own validation data; recorded as a run of its own. Not with "
        "HE nor --initial-weights",
        metavar="MODEL_OR_RUN",
    )
    cross_site_eval_run: Optional[str] = setting(
        None,
        "the recorded run (uid or unique prefix) whose model an evaluation-only job scores; the server finds it "
        "among its kept model files by the sha256 the record holds (given through --cross-site-eval-only RUN)",
        cli=False,
    )
    cross_site_eval_model: str = setting(
        "final",
        "with --cross-site-eval-only RUN: the run's last recorded global model (final) or its best scored "
        "round's (best)",
        choices=("final", "best"),
    )
    cross_site_timeout: int = setting(300, "seconds the server waits for the hospitals in each cross-site step")
    server_optimizer: str = setting(
        ServerOptimizer.kind,
        "FedOpt on the robust aggregate (fedmed.learning.algorithms): the aggregate read as a step along global - aggregate, "
        "with FedAdam's or FedYogi's moments, or fedavgm's server SGD (momentum server_beta1); 'none' takes the "
        "aggregate. Not with --resume (the moments are not "
        "kept with the run's model files)",
        choices=SERVER_OPTIMIZERS,
        group=_ALGORITHMS,
    )
    server_lr: float = setting(ServerOptimizer.lr, "FedOpt's server learning rate", group=_ALGORITHMS)
    server_beta1: float = setting(ServerOptimizer.beta1, "FedOpt's first-moment decay", group=_ALGORITHMS)
    server_beta2: float = setting(ServerOptimizer.beta2, "FedOpt's second-moment decay", group=_ALGORITHMS)
    server_tau: float = setting(ServerOptimizer.tau, "FedOpt's adaptivity tau", group=_ALGORITHMS)
    proximal_mu: float = setting(
        0.0,
        "FedProx at the sites: mu of mu/2 ||w - w_global||^2 (0 = off); under DP-SGD added after the noise, no extra "
        "epsilon",
        site=True,
        group=_ALGORITHMS,
    )
    scaffold: bool = setting(
        False,
        "SCAFFOLD's control variates at the server and the sites (fedmed.learning.algorithms). Not with signatures (no "
        "signature covers the control variates yet), nor --resume, nor a site's user-level noise filter (it "
        "refuses the round)",
        site=True,
        group=_ALGORITHMS,
    )

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
            from fedmed.server.rounds import check_encryption_compatible

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
            ("rounds_per_epoch", 1),
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
        if self.rounds_per_epoch > 1 and self.local_epochs != 1:
            raise ValueError(
                f"rounds_per_epoch {self.rounds_per_epoch} splits one epoch over that many rounds: local_epochs must "
                f"be 1, got {self.local_epochs}"
            )
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
        algorithm = self.algorithm()  # raises naming the bad setting
        if self.resume_run and (algorithm.server_optimizer.active or algorithm.scaffold):
            raise ValueError(
                "resume_run cannot continue a run with a server optimiser or SCAFFOLD: their state (FedOpt's moments, "
                "the control variates) is not kept with the run's model files, and restarting it at zero would "
                "change the algorithm mid-run"
            )
        try:
            self.trust_policy()
        except ValueError as e:
            raise ValueError(
                f"trust rule (trust_smoothing, trust_ok_ratio, trust_bad_ratio, quarantine_below, "
                f"readmit_after, trust_head_cosine_bad, trust_sign_balance_bad): {e}"
            ) from None

    @property
    def evaluates_only(self) -> bool:
        """The job trains nothing: the hospitals score a model file or a recorded run's model."""
        return self.cross_site_eval_only is not None or self.cross_site_eval_run is not None

    @property
    def required_clients(self) -> int:
        """min_clients, or its default (fedmed.server.rounds.default_min_clients)."""
        return self.min_clients if self.min_clients is not None else default_min_clients(len(self.sites))

    def trust_policy(self) -> TrustPolicy:
        return TrustPolicy(
            smoothing=self.trust_smoothing,
            ok_ratio=self.trust_ok_ratio,
            bad_ratio=self.trust_bad_ratio,
            quarantine_below=self.quarantine_below,
            readmit_after=self.readmit_after,
            head_cosine_bad=self.trust_head_cosine_bad,
            sign_balance_ok=self.trust_sign_balance_bad / 2,  # the default's ratio (0.1 / 0.2)
            sign_balance_bad=self.trust_sign_balance_bad,
        )

    def algorithm(self) -> FedAlgorithm:
        """The federated algorithm on top of the robust round (fedmed.learning.algorithms)."""
        return FedAlgorithm(
            ServerOptimizer(
                self.server_optimizer, self.server_lr, self.server_beta1, self.server_beta2, self.server_tau
            ),
            self.proximal_mu,
            self.scaffold,
        )

    def with_changes(self, **changes) -> "JobConfig":
        """A copy with these settings changed (validated again); an unknown setting is named in the error."""
        unknown = sorted(set(changes) - {f.name for f in fields(self)})
        if unknown:
            raise TypeError(f"unknown job setting(s) {unknown}; known: {[f.name for f in fields(self)]}")
        return replace(self, **changes)

    def to_dict(self, site: bool = False) -> dict:
        """The settings as JSON-safe values by name (tuples as lists), what a component's `job` argument holds in the
        exported job; site=True: only the settings the hospitals read (fields marked site)."""
        return {
            f.name: list(v) if isinstance(v, tuple) else v
            for f in fields(self)
            if not site or f.metadata.get("site")
            for v in (getattr(self, f.name),)
        }

    @classmethod
    def from_dict(cls, job) -> "JobConfig":
        """The JobConfig of a component's `job` argument (to_dict's output; a JobConfig passes through). Refuses, naming
        it, a key that is no setting (a misspelt or retired one must not be silently ignored) and a missing name or
        task; every value is checked as JobConfig checks it."""
        if isinstance(job, cls):
            return job
        if not isinstance(job, dict):
            raise ValueError(f"job must be a dict of job settings (JobConfig.to_dict()), got {type(job).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(job) - known)
        if unknown:
            raise ValueError(f"unknown job setting(s) {unknown} in the job's configuration; known: {sorted(known)}")
        missing = [k for k in ("name", "task") if k not in job]
        if missing:
            raise ValueError(f"the job's configuration lacks {missing}")
        return cls(**job)
