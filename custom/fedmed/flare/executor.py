"""NVFlare Executor run at each hospital: receive the global model, train locally, validate, return the update.

Thin adapter: converts Shareable <-> FLModel <-> numpy params and calls fedmed.learning.training; no math here.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional

import torch
from nvflare.apis.event_type import EventType
from nvflare.apis.executor import Executor
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.apis.signal import Signal
from nvflare.apis.workspace import Workspace
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.utils.fl_model_utils import FLModelUtils
from nvflare.security.logging import secure_format_exception

from fedmed.data.loading import load_items, load_train_val
from fedmed.flare import signatures as wire_sig
from fedmed.flare import site_privacy
from fedmed.flare.persistor import save_state
from fedmed.flare.site_privacy import SiteSettingsRefused, scope_in_privacy_file  # noqa: F401 (the Executor's API)
from fedmed.job import constants as C
from fedmed.job.jobconfig import JobConfig
from fedmed.job.tasks import get_task
from fedmed.learning.training import NonFinitePredictions, TrainingAborted, evaluate
from fedmed.models.model_card import data_is_synthetic
from fedmed.models.network import build_densenet121, load_numpy_state, set_trainable
from fedmed.privacy.dp_sgd import SitePrivacy
from fedmed.privacy.ledger import LedgerBinding
from fedmed.security import ckks, signing
from fedmed.server.crosssite import GLOBAL_MODEL, local_model_refusal, released_scores, scores_refusal
from fedmed.server.parallel import site_torch_threads
from fedmed.site import site_round
from fedmed.site.site_config import JobRefused, SiteConfig, check_job_for_site, load_site_config
from fedmed.site.site_round import GlobalModelRejected

SITE_CONFIG_FILENAME = "fedmed_site.json"
FINAL_MODEL_FILE = "final_global_model.pt"  # a hospital's own usable copy of the federation's result


def is_deployed_kit(workspace: Optional[Workspace]) -> bool:
    """True in a provisioned client kit: its startup/ folder holds fed_client.json (NVFlare's public
    Workspace.get_client_startup_file_path(), WorkspaceConstants.CLIENT_STARTUP_CONFIG), which a deployed client reads
    to start at all; NVFlare's simulator gives each site a workspace whose startup/ it creates empty. The kit's files
    are fixed by provisioning, never by a job, so a job submitter cannot make a hospital honour job-supplied site
    settings. No workspace to look at counts as deployed: the stricter answer."""
    return workspace is None or os.path.isfile(workspace.get_client_startup_file_path())


def running_in_simulator(fl_ctx: FLContext) -> bool:
    """True only for a site run by NVFlare's simulator (or the tests), which has no kit (is_deployed_kit)."""
    engine = fl_ctx.get_engine()
    return not is_deployed_kit(engine.get_workspace() if engine is not None else None)


def site_config_path(site_config: Optional[str], fl_ctx: FLContext) -> Path:
    """The hospital's fedmed_site.json: the job's (simulator only: FedMedTrainer._refuse_job_settings), else
    $FEDMED_SITE_CONFIG, else the kit's local/ folder."""
    if site_config:
        return Path(site_config)
    if os.environ.get(C.ENV_SITE_CONFIG):
        return Path(os.environ[C.ENV_SITE_CONFIG])
    workspace = fl_ctx.get_engine().get_workspace()
    return Path(workspace.get_site_config_dir()) / SITE_CONFIG_FILENAME


def he_context_path(he_context_file: Optional[str], fl_ctx: FLContext) -> Path:
    """The hospital's TenSEAL secret context: the job's (simulator only), else the kit's local/, else startup/."""
    if he_context_file:
        return Path(he_context_file)
    workspace = fl_ctx.get_engine().get_workspace()
    local = Path(workspace.get_site_config_dir()) / ckks.CLIENT_CONTEXT_FILE
    return local if local.is_file() else Path(workspace.get_file_path_in_startup(ckks.CLIENT_CONTEXT_FILE))


class FedMedTrainer(Executor):
    def __init__(
        self,
        job: dict,
        site_config: Optional[str] = None,
        he_context_file: Optional[str] = None,
        signatures: bool = False,
        signing_key_dir: Optional[str] = None,
        train_task_name: str = AppConstants.TASK_TRAIN,
    ):
        """Local trainer for one hospital.

        Args:
            job: the job's settings for the sites, fedmed.job.jobconfig.JobConfig.to_dict(site=True) (a JobConfig is
                taken too): task, image_size, local_epochs, lr, batch_size, seed, norm, he_layers, dp_train_layers, proximal_mu, scaffold;
                each setting's meaning and default is in JobConfig. They must match the server's.
            site_config: simulator only: path to this hospital's fedmed_site.json. A deployed hospital refuses a
                job that sets it: it reads $FEDMED_SITE_CONFIG (the site's environment), else
                <site workspace>/local/fedmed_site.json (what site_configs/install puts into a startup kit).
            he_context_file: simulator only: this hospital's TenSEAL context with the secret key. A deployed
                hospital refuses a job that sets it and reads <kit>/local/client_context.tenseal (installed from the
                key custodian's key set, scripts/he_keys.py), else <kit>/startup/client_context.tenseal.
            signatures: sign every update (ML-DSA-65 + Ed25519, fedmed.security.signing) and train only on a global model
                the server signed; needs the site's keys and the server's public key in signing_key_dir.
            signing_key_dir: where fedmed_signing.key and server_signing.pub are. Default: <site kit>/local/.
            train_task_name: the training task this executor answers (it also answers fedmed's final-model task).
        """
        super().__init__()
        config = JobConfig.from_dict(job)  # raises naming a bad or unknown setting
        self.job = config.to_dict(site=True)  # same name as the argument: FedJob serialises attributes by name
        self.config = config
        self.site_config = site_config
        self._privacy = None
        self.train_task_name = train_task_name
        self._task = get_task(config.task)
        self.he_context_file = he_context_file
        self._he: Optional[ckks.LoadedContext] = None
        self._he_names: tuple = ()
        self._state: Optional[site_round.Site] = None  # the site for fedmed.site.site_round, built at start-up
        self._site: Optional[SiteConfig] = None
        self._data_synthetic: Optional[bool] = None  # for the model card: what this site trained on
        self._ledger: Optional[LedgerBinding] = None
        self._run_continued = False  # a resumed run's earlier DP-SGD spend counted (once per job)
        self._noise_filters: list = []  # the site's UpdateNoiseFilter(s) in the job's privacy scope
        self._refusal: Optional[str] = None  # set at start-up when the site refuses the whole job
        self._unavailable: Optional[str] = None  # set at start-up when the site's own set-up failed: why
        self._train_ds = None
        self._val_ds = None
        self._model = None
        self.signatures = bool(signatures)
        self.signing_key_dir = signing_key_dir
        self._sign_keys = self._server_key = None

    def handle_event(self, event_type: str, fl_ctx: FLContext):
        if event_type == EventType.START_RUN:
            # Fail at start-up, with the reason, rather than at round 1.
            try:
                self._setup(fl_ctx)
            except SiteSettingsRefused as e:
                # Stay up and answer every task with the reason: the server records it and the run fails.
                self._refusal = str(e)
                self._model = self._state = None
                self.log_error(fl_ctx, f"site {fl_ctx.get_identity_name()} refuses this job: {e}")
            except Exception as e:
                # Not system_panic: a site whose job process ends is only noticed by the server through NVFlare's
                # dead-client detection (a minute or more), and the reason stays in this site's error log. Staying
                # up and answering every task with the reason ends the server's wait at once and records why.
                self._unavailable = f"{type(e).__name__}: {e}"[:500]
                self._model = self._state = None
                self.log_error(
                    fl_ctx,
                    f"site {fl_ctx.get_identity_name()} cannot take part in this job: set-up "
                    f"failed: {self._unavailable}; fix it (install.sh --check <kit>); the next "
                    "job reads the site's settings again",
                )

    def _refuse_job_settings(self, fl_ctx: FLContext) -> None:
        """In a deployed kit, the site's config, privacy policy, HE secret context and data paths come only from
        the kit or the site's environment: a job naming any of them is refused."""
        named = [
            f"{arg}={getattr(self, arg)!r}"
            for arg in ("site_config", "he_context_file", "signing_key_dir")
            if getattr(self, arg)
        ]
        if named and not running_in_simulator(fl_ctx):
            raise SiteSettingsRefused(
                f"the job sets {', '.join(named)}; this hospital takes its site config, privacy policy, data paths "
                "and HE secret context only from its own kit (local/, startup/) or its environment "
                f"({C.ENV_SITE_CONFIG}), never from a job"
            )

    def _setup(self, fl_ctx: FLContext) -> None:
        site = fl_ctx.get_identity_name()
        self._refuse_job_settings(fl_ctx)
        path = self._load_site_settings(site, fl_ctx)
        t0 = time.monotonic()
        self._load_data(site, fl_ctx)
        self._model = build_densenet121(self._task.num_outputs, norm=self.config.norm)
        if self.config.he_layers:
            self._open_he(site, fl_ctx)
        self._open_signing(site, fl_ctx)
        policy, source, self._noise_filters = site_privacy.privacy_policy(self._site, fl_ctx)
        self._admit_job(site, path, policy, fl_ctx)
        self._open_privacy(site, policy, source, fl_ctx)
        self._state = self._site_round_state(site, policy, fl_ctx)
        self.log_info(
            fl_ctx,
            f"site {site}: {len(self._train_ds)} train / {len(self._val_ds)} val images from {self._site.data.format} "
            f"data, loaded in {time.monotonic() - t0:.1f}s",
        )

    def _load_site_settings(self, site: str, fl_ctx: FLContext) -> Path:
        """The hospital's fedmed_site.json (for this client, checked), and its torch threads. Returns its path."""
        path = site_config_path(self.site_config, fl_ctx)
        self._site = load_site_config(path)
        if self._site.site_name != site:
            raise ValueError(f"{path} is for site {self._site.site_name!r}, but this client is {site!r}")
        threads = self._site.num_threads or site_torch_threads()  # the site's own setting first (server/parallel)
        if threads:
            torch.set_num_threads(threads)
        return path

    def _load_data(self, site: str, fl_ctx: FLContext) -> None:
        self._train_ds, self._val_ds = load_train_val(
            self._site.data, self.config.image_size, self.config.seed, self._task
        )
        self._data_synthetic = data_is_synthetic(
            [it.path for it in load_items(self._site.data, self._task)], self._site.synthetic_rehearsal
        )
        if self._site.hostile is not None:
            self.log_warning(
                fl_ctx,
                f"site {site} is configured HOSTILE ({self._site.hostile}) for a robustness "
                f"rehearsal: its updates are deliberately corrupted",
            )

    def _open_he(self, site: str, fl_ctx: FLContext) -> None:
        ctx_path = he_context_path(self.he_context_file, fl_ctx)
        self._he = ckks.load_client_context(ctx_path)
        self._he_names = ckks.resolve_encrypted_names(list(self._model.state_dict()), list(self.config.he_layers))
        if self._he.key_id is None:
            self.log_warning(
                fl_ctx,
                f"no {ckks.KEY_ID_FILE} beside {ctx_path}: the server will refuse this "
                "site's encrypted updates; provision with fedmed's HE builder",
            )
        self.log_info(
            fl_ctx,
            f"site {site}: CKKS encryption of {len(self._he_names)} parameter(s) "
            f"{list(self._he_names)}; key set {str(self._he.key_id)[:12]}",
        )

    def _open_signing(self, site: str, fl_ctx: FLContext) -> None:
        engine = fl_ctx.get_engine()
        kit_local = Path(engine.get_workspace().get_site_config_dir()) if engine is not None else None
        # A deployed kit that holds its signing key (install makes one) always signs and checks the server's
        # signature, whatever the job says: a job submitter cannot switch that off.
        kit_signs = (
            kit_local is not None and not running_in_simulator(fl_ctx) and (kit_local / signing.PRIVATE_FILE).is_file()
        )
        if self.signatures or kit_signs:  # missing keys fail the site at start, naming the file
            key_dir = self.signing_key_dir or kit_local
            self._sign_keys, self._server_key = wire_sig.load_keys(key_dir)
            if self._sign_keys.site != site:
                raise ValueError(f"signing key in {key_dir} is {self._sign_keys.site!r}'s, but this client is {site!r}")

    def _admit_job(self, site: str, path: Path, policy, fl_ctx: FLContext) -> None:
        """A job the hospital's start-up rules refuse is refused: the site answers each task with the reason."""
        try:
            simulator = running_in_simulator(fl_ctx)
            check_job_for_site(self._site, policy, self.config.norm, where=site, config=str(path), simulator=simulator)
        except JobRefused as e:
            raise SiteSettingsRefused(str(e)) from None

    def _open_privacy(self, site: str, policy, source: str, fl_ctx: FLContext) -> None:
        if policy is not None or self._noise_filters:
            self._ledger = site_privacy.open_ledger(self._site, self._task, policy, fl_ctx)
            b = self._ledger
            self.log_info(
                fl_ctx,
                f"site {site}: privacy ledger {b.ledger.path}, dataset {b.dataset.digest[:12]} "
                f"({b.dataset.describe()}): lifetime epsilon {b.lifetime_epsilon():.3f} of {b.lifetime_ceiling}",
            )
        if policy is None:
            return
        self._privacy = SitePrivacy(policy, self._ledger)
        trained = set_trainable(self._model, self.config.dp_train_layers)  # names a prefix that matches nothing
        set_trainable(self._model, None)
        what = "all" if self.config.dp_train_layers is None else f"{list(self.config.dp_train_layers)}:"
        self.log_info(
            fl_ctx,
            f"site {site}: DP-SGD on ({source}), ceiling epsilon {policy.epsilon} "
            f"({policy.preset}), delta {policy.delta}, clip {policy.max_grad_norm}; trains "
            f"{what} {len(trained)} parameter tensors",
        )

    def _site_round_state(self, site: str, policy, fl_ctx: FLContext) -> site_round.Site:
        return site_round.Site(
            name=site,
            task=self._task,
            train=self._train_ds,
            model=self._model,
            # The job's dp_train_layers restrict DP-SGD only: freezing keeps DP noise off coordinates that would
            # not carry signal through it; a site training without DP has no noise and trains every layer.
            training=site_round.Training(
                self.config.lr,
                self.config.batch_size,
                self.config.local_epochs,
                self.config.seed,
                self._dp_trainable(policy),
                self.config.proximal_mu,
                self.config.scaffold,
                self.config.rounds_per_epoch,
            ),
            val=self._val_ds,
            privacy=self._privacy,
            ledger=self._ledger if self._privacy is None else None,  # DP-SGD charges through its SitePrivacy
            also_released=self._filter_history,
            he=self._he,
            he_names=self._he_names,
            sign_keys=self._sign_keys,
            server_key=self._server_key,
            hostile=self._site.hostile,
            data_synthetic=self._data_synthetic,
            last_receipt=wire_sig.last_receipt(fl_ctx),  # echoed in its first update (fedmed.server.anchors)
        )

    def _dp_trainable(self, policy) -> Optional[tuple]:
        return tuple(self.config.dp_train_layers) if policy is not None and self.config.dp_train_layers else None

    def _continue_run_privacy(self, site: str, global_model: FLModel, fl_ctx: FLContext) -> None:
        """A job that resumes a run (fedmed.server.resume): what the run's earlier jobs (named by the server) charged to this
        dataset's ledger counts toward this job's DP-SGD ceiling. A server naming other jobs can only make the site
        stricter; one naming none gets what any new job gets (the lifetime ceiling bounds every job)."""
        earlier = (global_model.meta or {}).get(C.META_RESUMED_JOBS)
        if self._run_continued or self._privacy is None or self._ledger is None or not earlier:
            return
        self._run_continued = True
        jobs = [j for j in earlier if isinstance(j, str)] if isinstance(earlier, (list, tuple)) else []
        self._privacy.continue_run(self._ledger.history_of_jobs(jobs, "dp_sgd"))
        self.log_info(
            fl_ctx,
            f"site {site}: this job resumes a run of jobs {jobs}: their DP-SGD spend at this site, epsilon "
            f"{self._privacy.epsilon_spent:.3f}, counts toward this job's ceiling {self._privacy.policy.epsilon}",
        )

    def execute(self, task_name: str, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        # Cross-site evaluation answers NVFlare's own task names (AppConstants.TASK_VALIDATION / TASK_SUBMIT_MODEL),
        # so NVFlare's CrossSiteEval workflow can drive this executor as well as fedmed's controller.
        handled = (
            self.train_task_name,
            C.TASK_FINAL_MODEL,
            AppConstants.TASK_VALIDATION,
            AppConstants.TASK_SUBMIT_MODEL,
        )
        if task_name not in handled:
            self.log_error(fl_ctx, f"unknown task {task_name!r}; this executor handles {list(handled)}")
            return make_reply(ReturnCode.TASK_UNKNOWN)
        site = fl_ctx.get_identity_name()
        for key, why in ((C.META_REFUSED, self._refusal), (C.META_UNAVAILABLE, self._unavailable)):
            if why is not None:  # the site cannot take part at all; the server records why
                return FLModelUtils.to_shareable(FLModel(metrics={}, meta={key: why, C.META_SITE: site}))
        if self._state is None:
            return make_reply(ReturnCode.EXECUTION_EXCEPTION)
        if task_name == AppConstants.TASK_SUBMIT_MODEL:
            return FLModelUtils.to_shareable(self._lend_local_model(site, fl_ctx))
        try:
            global_model = FLModelUtils.from_shareable(shareable)
            offer = self._offer(global_model, fl_ctx)
            if self._server_key is not None:  # the receipt carries the server's own signature, checked here
                wire_sig.keep_receipt(global_model, self._server_key, fl_ctx)
            if task_name == AppConstants.TASK_VALIDATION:
                # A model for cross-site evaluation is signed under C.CROSS_SITE_ROUND, which no training round
                # has: it never verifies as a round's global model, nor a round's global model as one of these.
                site_round.verify_global(self._state, offer, C.CROSS_SITE_ROUND)
                return FLModelUtils.to_shareable(self._evaluate_for_others(site, global_model, offer, fl_ctx))
            if task_name == C.TASK_FINAL_MODEL:
                site_round.verify_global(self._state, offer, offer.round_num)
                global_params = site_round.open_global(self._state, offer)
                fl_ctx.set_prop(C.CTX_GLOBAL_PARAMS, global_params, private=True, sticky=False)
                return self._keep_final_model(site, global_params, global_model, fl_ctx)
            return self._train(site, global_model, offer, fl_ctx, abort_signal)
        except signing.SignatureError as e:
            self.log_error(fl_ctx, f"site {site}: refusing the global model: {e}")
            return make_reply(ReturnCode.BAD_TASK_DATA)
        except GlobalModelRejected as e:  # the final model's head: not kept; the server records the reason
            self.log_error(fl_ctx, f"site {site}: refusing the global model: {e}")
            return FLModelUtils.to_shareable(
                FLModel(meta={C.META_REFUSED: f"global model rejected: {e}", C.META_SITE: site})
            )
        except TrainingAborted:
            self.log_warning(fl_ctx, f"site {site}: training aborted by the server")
            return make_reply(ReturnCode.TASK_ABORTED)
        except Exception as e:
            self.log_exception(fl_ctx, f"site {site}: training failed: {secure_format_exception(e)}")
            return make_reply(ReturnCode.EXECUTION_EXCEPTION)

    def _train(self, site, global_model: FLModel, offer, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        """One training round at this site (fedmed.site.site_round), with what the site's filters need set."""
        if self._ledger is not None:  # the site's user-level filter charges its part of the round with this
            self._ledger.continue_run((global_model.meta or {}).get(C.META_RESUMED_JOBS))  # keys charges to the run
            fl_ctx.set_prop(
                C.CTX_PRIVACY_LEDGER, {"binding": self._ledger, "round": offer.round_num}, private=True, sticky=False
            )
        self._continue_run_privacy(site, global_model, fl_ctx)
        update = site_round.run_round(
            self._state,
            offer,
            should_abort=lambda: abort_signal.triggered,
            log=lambda message: self.log_info(fl_ctx, message),
        )
        if update.refused is not None:  # already logged; the server records the reason
            return FLModelUtils.to_shareable(FLModel(metrics=update.metrics, meta=update.meta))
        fl_ctx.set_prop(C.CTX_GLOBAL_PARAMS, update.base, private=True, sticky=False)
        if self._sign_keys is not None:  # the user-level filter re-signs what it changes
            signer = (self._sign_keys, fl_ctx.get_job_id(), offer.round_num, site)
            fl_ctx.set_prop(C.CTX_SIGNER, signer, private=True, sticky=False)
        return FLModelUtils.to_shareable(
            FLModel(params_type=ParamsType.FULL, params=update.params, metrics=update.metrics, meta=update.meta)
        )

    def _offer(self, global_model: FLModel, fl_ctx: FLContext) -> site_round.GlobalModel:
        meta = global_model.meta or {}
        return site_round.GlobalModel(
            params=global_model.params or {},
            round_num=int(global_model.current_round or 0),
            total_rounds=int(global_model.total_rounds or 1),
            job_id=str(fl_ctx.get_job_id()),
            encrypted=meta.get(C.META_ENCRYPTED),
            signature=meta.get(C.META_GLOBAL_SIGNATURE),
            control=meta.get(C.META_CONTROL),
            # fedmed.server.anchors: what the site vouches for in its update
            ledger_seen=site_round.seen_count(meta.get(C.META_LEDGER_SEEN), fl_ctx.get_identity_name()),
            receipt=meta.get(C.META_AUDIT_RECEIPT),
        )

    def _evaluate_for_others(
        self, site: str, model: FLModel, offer: site_round.GlobalModel, fl_ctx: FLContext
    ) -> FLModel:
        """Cross-site evaluation: score the model the server sent (the global model, or another hospital's lent
        local model) on this hospital's validation data, and release the task's scores only if the site's privacy
        policy releases metrics (fedmed.server.crosssite.scores_refusal)."""
        owner = (model.meta or {}).get(AppConstants.MODEL_OWNER, GLOBAL_MODEL)
        meta = {C.META_SITE: site, AppConstants.MODEL_OWNER: owner}
        refusal = scores_refusal(self._privacy is None or self._privacy.policy.release_metrics)
        if refusal:
            self.log_info(fl_ctx, f"site {site}: cross-site evaluation of {owner}: not released: {refusal}")
            return FLModel(metrics={}, meta={**meta, C.META_REFUSED: refusal})
        # The global model carries the federation's encrypted head (decrypted and checked here like every global
        # model); a lent local model never does (no hospital lends one with HE on), and must not become last_head.
        params = site_round.open_global(self._state, offer) if offer.encrypted is not None else model.params
        load_numpy_state(self._model, params)  # refuses other names or shapes, naming them
        try:
            ev = evaluate(self._model, self._val_ds, self._task)
        except NonFinitePredictions as e:  # an answer with the reason, not an error that could end the job
            self.log_warning(fl_ctx, f"site {site}: cross-site evaluation of {owner}: {e}")
            return FLModel(metrics={}, meta={**meta, C.META_REFUSED: f"cannot score {owner}: {e}"})
        scores = released_scores({**ev.metrics, "mean_auroc": ev.mean_auroc}, self._task)
        self.log_info(
            fl_ctx,
            f"site {site}: cross-site evaluation of {owner}: {self._task.score_name} {ev.score:.4f} on "
            f"{len(self._val_ds)} validation images",
        )
        return FLModel(metrics=scores, meta={**meta, C.META_NUM_SAMPLES: len(self._val_ds)})

    def _lend_local_model(self, site: str, fl_ctx: FLContext) -> FLModel:
        """Cross-site evaluation: this hospital's last local model, lent for the others to score, only when its
        fedmed_site.json allows it and nothing its privacy promises forbids it (fedmed.server.crosssite.local_model_refusal)."""
        last_local = self._state.last_local
        refusal = local_model_refusal(
            self._site.share_local_model, last_local is not None, self._he is not None, bool(self._noise_filters)
        )
        if refusal:
            self.log_info(fl_ctx, f"site {site}: local model not lent for cross-site evaluation: {refusal}")
            return FLModel(metrics={}, meta={C.META_REFUSED: refusal, C.META_SITE: site})
        self.log_info(fl_ctx, f"site {site}: lending its last local model for cross-site evaluation")
        return FLModel(
            params_type=ParamsType.FULL,
            params=last_local,
            meta={C.META_SITE: site, AppConstants.MODEL_OWNER: site},
        )

    def _filter_history(self) -> list:
        return [h for f in self._noise_filters for h in f.example_history()]

    def _keep_final_model(self, site: str, params: dict, global_model: FLModel, fl_ctx: FLContext) -> Shareable:
        """Save the final global model, usable (decrypted) at this hospital, in the job's app folder."""
        load_numpy_state(self._model, params)  # validates names and shapes before anything is written
        app_dir = Path(fl_ctx.get_engine().get_workspace().get_app_dir(fl_ctx.get_job_id()))
        path = app_dir / FINAL_MODEL_FILE
        save_state(params, path, {k: v for k, v in (global_model.meta or {}).items() if k != C.META_ENCRYPTED})
        self.log_info(fl_ctx, f"site {site}: final global model saved to {path}")
        return FLModelUtils.to_shareable(FLModel(metrics={"saved": 1.0}, meta={C.META_SITE: site}))
