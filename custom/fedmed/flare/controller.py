"""NVFlare server workflow: rounds of send -> engine.step -> save -> record, read like NVFlare's FedAvg.

Thin adapter: every rule of a round (screening, aggregation, trust, quarantine, encrypted combination) lives in
fedmed.rounds.RoundEngine; FLModel conversion in fedmed.flare.wire; the record in fedmed.store.
"""

from __future__ import annotations

import math
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.fl_model import FLModel
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.workflows.model_controller import ModelController
from nvflare.security.logging import secure_format_exception
from sqlalchemy.exc import SQLAlchemyError

from fedmed import constants as C
from fedmed import signing
from fedmed.crosssite import quarantine_reasons
from fedmed.crypto import ckks
from fedmed.data.loading import load_test
from fedmed.flare import signatures as wire_sig
from fedmed.flare import wire
from fedmed.flare.crosssite_eval import CrossSiteEvalMixin
from fedmed.flare.live_metrics import LiveMetrics
from fedmed.flare.persistor import BEST_MODEL_FILE, GLOBAL_MODEL_FILE, FedMedModelPersistor
from fedmed.hashing import model_sha256
from fedmed.heap import release_round_memory
from fedmed.model import build_densenet121, load_numpy_state
from fedmed.model_card import META_MODEL_CARD, ModelCardBuilder, card_from_meta
from fedmed.model_health import check_outputs, probe_images
from fedmed.resume import (
    EVAL_MODELS,
    FIXED_OPTIONS,
    RUNS_DIR,
    ResumePlan,
    ResumeRefused,
    find_model_file,
    find_run_uid,
    finished_run_leftovers,
    plan_resume,
    round_model_path,
    run_models_dir,
    stale_round_files,
)
from fedmed.robust.trust import SiteTrust, TrustPolicy
from fedmed.rounds import (
    EncryptionSpec,
    RoundEngine,
    RoundReport,
    RoundRules,
    check_encryption_compatible,
    finite_or_none,
)
from fedmed.screening import DEFAULT_STATISTICS_FACTOR
from fedmed.store.audit import RecordRefused
from fedmed.store.journal import Journal, ResilientRecorder
from fedmed.store.models import utcnow
from fedmed.store.repository import AlertRecord, Repository, RoundRecord, TrustRecord, resolve_db_url
from fedmed.tasks import get_task
from fedmed.training import evaluate
from fedmed.weights import load_state, save_state


@dataclass(frozen=True)
class ResumedRun:
    """What this job continues: the plan, the model file it was checked against, the global model, (best round,
    best score) so far."""

    plan: ResumePlan
    path: Path
    model: FLModel
    best: tuple


class FedMedController(CrossSiteEvalMixin, ModelController):
    def __init__(
        self,
        task: str,
        num_rounds: int = 5,
        min_clients: int = 3,
        round_timeout: int = 0,
        straggler_wait: int = 600,
        aggregation: str = "geometric_median",
        test_dicom_root: Optional[str] = None,
        test_labels_csv: Optional[str] = None,
        image_size: int = 128,
        num_outputs: Optional[int] = None,
        norm: str = "batch",
        db_url: Optional[str] = None,
        run_name: str = "fedmed",
        persistor_id: str = AppConstants.DEFAULT_PERSISTOR_ID,
        train_task_name: str = AppConstants.TASK_TRAIN,
        trust_smoothing: float = 0.5,
        trust_ok_ratio: float = 2.0,
        trust_bad_ratio: float = 4.0,
        quarantine_below: float = 0.5,
        readmit_after: int = 2,
        trust_head_cosine_bad: float = TrustPolicy.head_cosine_bad,
        he_layers: Optional[list] = None,
        he_context_file: Optional[str] = None,
        final_model_timeout: int = 120,
        statistics_factor: float = DEFAULT_STATISTICS_FACTOR,
        signatures: bool = False,
        validation_images: int = 0,
        resume_run: Optional[str] = None,
        models_dir: Optional[str] = None,
        cross_site_eval: bool = True,
        evaluate_only: bool = False,
        cross_site_timeout: int = 300,
        evaluate_run: Optional[str] = None,
        evaluate_model: str = "final",
        centred_clipping: bool = False,
    ):
        """Federated rounds with pluggable aggregation, global test evaluation, persistence and a DB record.

        Args:
            num_rounds: number of FL rounds.
            min_clients: sites that must return a valid update for a round to aggregate; fewer stops the job.
            round_timeout: seconds before a round's task times out whatever has arrived (0 = no limit).
            straggler_wait: once min_clients sites have answered, seconds to keep waiting for the rest (a round
                ends at once when every site has answered).
            aggregation: name in fedmed.aggregation.AGGREGATORS ("geometric_median", "fedavg", ...).
            test_dicom_root / test_labels_csv: the global test set evaluated each round on the server. Without it
                the round's score is the sample-weighted mean of the sites' validation score.
            image_size: input size, same as the sites'.
            num_outputs: classifier outputs; default (and the only valid value) the task's number of classes.
            norm: DenseNet-121 normalisation, "batch" or "group" (the DP-SGD-compatible one); same as the sites'.
            db_url: SQLAlchemy URL; default $FEDMED_DB_URL, else SQLite fedmed.db in the server workspace.
            run_name: name recorded for this run.
            persistor_id: component id of the FedMedModelPersistor.
            train_task_name: task sent to the sites.
            trust_head_cosine_bad: a round whose classifier moved against the aggregate's with this cosine or lower
                scores 0 (TrustPolicy.head_cosine_bad).
            trust_smoothing / trust_ok_ratio / trust_bad_ratio / quarantine_below / readmit_after: the trust rule
                (fedmed.robust.trust.TrustPolicy). Each round a site scores 1 at or below ok_ratio x the median
                site distance to the aggregate and 0 at or above bad_ratio; trust is a moving average of scores;
                below quarantine_below the site is excluded from aggregation (still trained and scored) until
                readmit_after consecutive good rounds; a round scoring 0 (a rejected update or a far outlier)
                quarantines at once. Trust is read from the database at job start: it persists across jobs.
            task: what the job learns, a name in fedmed.tasks.TASKS ("chest_xray14", "brain_mri"); it decides the
                round score (mean AUROC, or accuracy for brain_mri) and the metrics recorded per round.
            he_layers: parameters the sites send CKKS-encrypted (exact names or prefixes ending in '.'); None or
                empty = no HE. The server combines them homomorphically with the weights the robust aggregation gave
                the clear part, never decrypts them, and keeps them encrypted in the saved global model. It cannot
                evaluate such a model, so rounds are then scored by the sites' validation scores.
            he_context_file: the server's TenSEAL context (no secret key; refused if it has one). Default:
                <startup kit>/startup/server_context.tenseal, written at provisioning.
            final_model_timeout: seconds to wait for the sites to acknowledge the final global model, which each
                keeps as its own usable (decrypted) copy. It goes, after the run is recorded finished, to the sites
                that answered the last round (a site that died since is not waited for longer than this).
            statistics_factor: how far a site's BatchNorm running statistics may move from the global model's in one
                round before its update is rejected (fedmed.screening).
            signatures: require every update signed by its hospital and sign every global model (fedmed.signing).
                A server kit whose local/site_keys/ holds hospitals' public keys (installed out of band, as
                fedmed-federation does) requires them whatever the job says.
            validation_images: with a global test set and no HE, each valid update is also scored on the first this
                many test images, and one more than RoundRules.validation_margin below the median site's is rejected.
                0 (default) turns it off: on small sites and small test sets the scores are too noisy (an honest
                hospital of the simulator tests, scored on 16 images, fell 0.135 below the median and was rejected).
            resume_run: continue this interrupted or failed run (its uid or a unique prefix) instead of starting one
                (fedmed.resume): from the global model its last recorded round saved (found among the server's model
                files by the sha256 it recorded), with rounds numbered on in the same run. Refused, with the reason
                and nothing written, when the run is finished, its model file is missing or altered, or this job's
                task, aggregation, HE layers, norm, image size or number of rounds differ from the run's.
            models_dir: where the server keeps each run's last two round models and best model, which a resumption
                starts from (a finished run keeps its final and best models, which an evaluation-only job of it
                scores); default <server workspace>/fedmed_runs.
            cross_site_eval: after the last round, every hospital scores the final global model, and each local model
                a hospital lends (its share_local_model), on its own validation data; the checked table is recorded
                in the run (fedmed.crosssite, fedmed.flare.crosssite_eval).
            evaluate_only: train nothing: the hospitals score the model the persistor loads (the job's
                initial_weights, JobConfig.cross_site_eval_only), or evaluate_run's, recorded as a run of its own.
            cross_site_timeout: seconds to wait for the hospitals' answers in each step of the cross-site evaluation.
            evaluate_run: with evaluate_only, score this recorded run's model (its uid or a unique prefix) instead:
                its evaluate_model ("final": its last recorded global model; "best": its best scored round's), found
                among the server's kept model files by the sha256 the record holds (fedmed.resume.pick_recorded_model).
                Refused, with the reason and nothing written, when the run or its model file is missing or the file
                is not the one recorded.
            centred_clipping: RoundRules.centred_clipping (JobConfig.centred_clipping); refused with he_layers.
        """
        super().__init__(persistor_id=persistor_id, ignore_result_error=None)
        if num_rounds < 1:
            raise ValueError(f"num_rounds must be >= 1, got {num_rounds}")
        if min_clients < 1:
            raise ValueError(f"min_clients must be >= 1, got {min_clients}")
        if round_timeout < 0:
            raise ValueError(f"round_timeout must be >= 0, got {round_timeout}")
        if straggler_wait < 0:
            raise ValueError(f"straggler_wait must be >= 0, got {straggler_wait}")
        self._task = get_task(task)  # raises naming the valid tasks
        if num_outputs is not None and num_outputs != self._task.num_outputs:
            raise ValueError(
                f"num_outputs {num_outputs} does not match task {task!r} ({self._task.num_outputs} classes)"
            )
        if bool(test_dicom_root) != bool(test_labels_csv):
            raise ValueError("test_dicom_root and test_labels_csv must be given together")
        self.num_rounds = num_rounds
        self.min_clients = min_clients
        self.round_timeout = round_timeout
        self.straggler_wait = straggler_wait
        self.aggregation = aggregation
        self.test_dicom_root = test_dicom_root
        self.test_labels_csv = test_labels_csv
        self.image_size = image_size
        self.num_outputs = self._task.num_outputs
        self.task = task
        self.norm = norm
        self.db_url = db_url
        self.run_name = run_name
        self.train_task_name = train_task_name
        self.trust_smoothing = trust_smoothing
        self.trust_ok_ratio = trust_ok_ratio
        self.trust_bad_ratio = trust_bad_ratio
        self.quarantine_below = quarantine_below
        self.readmit_after = readmit_after
        self.trust_head_cosine_bad = trust_head_cosine_bad
        self.centred_clipping = bool(centred_clipping)  # NVFlare's job export reads the argument back from here
        if he_layers is not None and (isinstance(he_layers, str) or not all(isinstance(x, str) for x in he_layers)):
            raise ValueError(f"he_layers must be a list of parameter names or prefixes, got {he_layers!r}")
        if final_model_timeout < 0:
            raise ValueError(f"final_model_timeout must be >= 0, got {final_model_timeout}")
        self.he_layers = list(he_layers) if he_layers else None
        self.he_context_file = he_context_file
        self.final_model_timeout = final_model_timeout
        self.statistics_factor = statistics_factor
        self.signatures = bool(signatures)
        if validation_images < 0:
            raise ValueError(f"validation_images must be >= 0, got {validation_images}")
        self.validation_images = validation_images
        self.resume_run = resume_run
        self.models_dir = models_dir
        self._earlier_jobs: tuple = ()  # the jobs that ran the run this job resumes
        if cross_site_timeout < 1:
            raise ValueError(f"cross_site_timeout must be >= 1, got {cross_site_timeout}")
        if evaluate_only and he_layers:
            raise ValueError(
                "evaluate_only cannot run with he_layers: the server would send a model in clear whose head "
                "the federation keeps encrypted; HE runs are evaluated across sites at the end of training"
            )
        if evaluate_only and resume_run:
            raise ValueError("evaluate_only cannot resume a run: an evaluation-only job trains no round")
        if evaluate_run is not None and not (evaluate_only and isinstance(evaluate_run, str) and evaluate_run.strip()):
            raise ValueError(f"evaluate_run needs evaluate_only and a run uid or a prefix of one, got {evaluate_run!r}")
        if evaluate_model not in EVAL_MODELS:
            raise ValueError(f"evaluate_model must be one of {EVAL_MODELS}, got {evaluate_model!r}")
        self.evaluate_run, self.evaluate_model = evaluate_run, evaluate_model
        self.cross_site_eval = bool(cross_site_eval)
        self.evaluate_only = bool(evaluate_only)
        self.cross_site_timeout = cross_site_timeout
        self._signer = None  # the server's signing keys, when signatures are on
        self._receipt = None  # the signed audit chain head of the last recorded round, sent with the next model
        self._site_keys: dict = {}
        # Every rule checked here, when the job is built: a bad threshold or an HE job with a non-linear aggregator
        # is refused before anything runs.
        self._rules = RoundRules(
            aggregation=aggregation,
            min_clients=min_clients,
            statistics_factor=statistics_factor,
            trust=TrustPolicy(
                smoothing=trust_smoothing,
                ok_ratio=trust_ok_ratio,
                bad_ratio=trust_bad_ratio,
                quarantine_below=quarantine_below,
                readmit_after=readmit_after,
                head_cosine_bad=trust_head_cosine_bad,
            ),
            centred_clipping=centred_clipping,
        )
        if self.he_layers:
            check_encryption_compatible(aggregation)
        self._he_names: tuple = ()
        self._gone: dict = {}  # site -> why NVFlare dropped it (until it is heard from again in this job)
        self._job_sites: set = set()  # every site sampled by this job so far
        self._gone_lock = threading.Lock()  # events arrive on NVFlare's threads
        self._live = LiveMetrics(self)

    def handle_event(self, event_type: str, fl_ctx: FLContext):
        """NVFlare's dead-client watch: a site whose job process ended (its parent's heartbeat stops listing the job)
        or whose heartbeat stopped (heart_beat_timeout in the server kit) is deemed disconnected after
        dead_client_grace_period; a site heard from again in this job is reconnected. Rounds neither send to nor
        wait for a disconnected site, and record why it is missing."""
        super().handle_event(event_type, fl_ctx)
        if event_type == EventType.CLIENT_DISCONNECTED:
            site = fl_ctx.get_prop(FLContextKey.DISCONNECTED_CLIENT_NAME)
            with self._gone_lock:
                self._gone[site] = (
                    f"NVFlare dropped the site at {time.strftime('%H:%M:%S')} (its job process "
                    "ended or its heartbeat stopped; see the site's log)"
                )
            self.warning(f"{site} is disconnected: rounds stop waiting for it until it is heard from again")
        elif event_type == EventType.CLIENT_RECONNECTED:
            site = fl_ctx.get_prop(FLContextKey.RECONNECTED_CLIENT_NAME)
            with self._gone_lock:
                was_gone = self._gone.pop(site, None)
            if was_gone:
                self.info(f"{site} is connected again: it is sampled from the next round")

    def _gone_now(self) -> dict:
        with self._gone_lock:
            return dict(self._gone)

    # ------------------------------------------------------------------------------------------------------------

    def run(self):
        if self.evaluate_only:
            return self._run_cross_site_eval_only()
        try:
            db, run_uid, resumed = self._start_record()  # resumed: a ResumedRun when this job continues a run
        except (ResumeRefused, RecordRefused) as e:
            # The admin's mistake, a swapped model file, no audit key, a record that does not verify: one line, no
            # traceback (a RecordRefused is no database outage: the job must not run unrecorded).
            self.error(str(e))
            self.panic(str(e))  # the job ends abnormally; nothing was written to the run's record
            return
        test_ds = self._load_test_set()
        eval_model = build_densenet121(self.num_outputs, norm=self.norm)
        model = resumed.model if resumed else self.load_model()
        best_round, best_score = resumed.best if resumed else (None, -math.inf)
        status = "finished"
        best = None  # (params, meta) of the best model, for the OOD calibration at the end
        last_round_sites: list = []
        trust_events: list = []  # (round from 1, site, "quarantined" | "readmitted", message): why a site is out
        try:
            # Inside the try: a refused HE context ends the run recorded as failed, with the reason.
            encryption = self._setup_he(eval_model) if self.he_layers else None
            test_ds = None if encryption is not None else test_ds
            engine = RoundEngine(
                self._rules,
                encryption,
                trust=self._load_trust(db, run_uid),
                validate=self._validator(eval_model, test_ds),
            )
            self._setup_signatures()
            card = ModelCardBuilder(self.task, self.aggregation, "NVFlare federation (fedmed)", self.he_layers or ())
            card.continue_from(card_from_meta(model.meta or {}) if resumed else None)
            for round_num in range(resumed.plan.first_wire_round if resumed else 0, self.num_rounds):
                if self.abort_signal.triggered:
                    status = "aborted"
                    break
                started, t0 = utcnow(), time.monotonic()
                results, targets, skipped = self._send(model, round_num)
                if self.abort_signal.triggered:
                    status = "aborted"
                    break
                last_round_sites = [wire.site_of(r) for r in results]
                site_results = [wire.to_site_result(r, self._verifier(round_num)) for r in results]
                answered = {r.site for r in site_results}
                missing = {
                    **skipped,
                    **{s: why for s, why in self._gone_now().items() if s in targets and s not in answered},
                }
                report = engine.step(round_num, self._clear_part(model.params), site_results, targets, missing)
                trust_events += [
                    (round_num + 1, a.site, a.kind, a.message)
                    for a in report.alerts
                    if a.kind in ("quarantined", "readmitted")
                ]
                self._log_report(report)
                if not report.aggregated:
                    self._record_round(db, run_uid, self._round_record(report, engine, started))
                    release_round_memory()
                    if not report.probation:
                        raise RuntimeError(report.problem)
                    continue  # the global model stands; quarantined sites were scored and may be re-admitted
                card.add_round(report.aggregated_sites, site_results)
                meta = {**self._model_meta(), META_MODEL_CARD: card.card().to_meta()}
                # Rounds are numbered from 1 in the record, the model files and the logs; NVFlare's current_round
                # (0-based) stays on the wire, where the sites' schedules and signatures use it.
                model = wire.global_model(report.params, round_num + 1, meta, report.encrypted)
                sha = model_sha256(model.params, model.meta.get(C.META_ENCRYPTED))
                unusable = self._unusable(eval_model, report)
                if unusable is None:
                    score, source, mean_auroc, test_loss, test_metrics = self._score(
                        eval_model, report, site_results, test_ds
                    )
                else:  # alerted in this round, unscored, so never best (NaN > best is False)
                    self.warning(f"round {round_num + 1}: ALERT {unusable}")
                    score, source, mean_auroc, test_loss, test_metrics = math.nan, None, None, None, {}
                self.save_model(model)
                self._keep_round_model(run_uid, model)
                if score > best_score:
                    best_round, best_score = round_num + 1, score
                    best = (
                        model.params,
                        {
                            **model.meta,
                            "score": score,
                            "score_name": self._task.score_name,
                            "score_source": source,
                            "sha256": sha,
                        },
                    )
                    self._save_best(run_uid, *best)
                self._record_round(
                    db,
                    run_uid,
                    self._round_record(
                        report,
                        engine,
                        started,
                        test_loss,
                        (score, source, mean_auroc),
                        test_metrics,
                        sha,
                        () if unusable is None else (AlertRecord(None, "global_model_unusable", unusable),),
                    ),
                )
                # The round's buffers (updates, aggregate, saved model) back to the operating system: cycles and glibc
                # keep them resident otherwise, and the server's RSS grew ~35 MB a round (fedmed.heap).
                release_round_memory()
                self._log_round(report, targets, score, test_loss, best_score, best_round, time.monotonic() - t0)
        except Exception as e:
            status = "failed"
            self.error(f"run {run_uid} failed: {secure_format_exception(e)}")
            raise
        finally:
            self._finish_record(db, run_uid, status, best_round, best_score)
        if status == "finished" and test_ds is not None:
            self._calibrate_ood(eval_model, test_ds, model, best)
        if status == "finished" and self.cross_site_eval:
            quarantined = quarantine_reasons(engine.trust, trust_events)  # neither lends nor scores
            self._cross_site_eval(run_uid, model, last_round_sites, quarantined=quarantined)
            self._live.finish()  # the live report once more, now with the cross-site table
        if status == "finished":
            self._send_final_model(model, last_round_sites)
        self.info(
            f"run {run_uid} {status}; best {self._task.score_name} {best_score:.4f} at round "
            f"{best_round if best_round is not None else '-'}"
        )

    # ------------------------------------------------------------------------------------------------------------

    def _start_record(self):
        """(recorder, run uid, ResumedRun or None): a new run recorded as started, or (resume_run) the run this job
        continues, recorded as resumed. A refused resumption raises with its one-line reason, nothing written."""
        job_id = self.fl_ctx.get_job_id()
        workspace_root = Path(self.engine.get_workspace().get_root_dir())
        self._db_url = resolve_db_url(workspace_root, self.db_url)
        # One journal per job at the workspace root (concurrent jobs never share a file); the recorder replays the
        # journals earlier jobs left before this job's own writes.
        db = ResilientRecorder(lambda: Repository(self._db_url), Journal.for_job(workspace_root, job_id), self.logger)
        if db.all_pending():
            self.info(f"replaying {db.all_pending()} journaled database write(s) from earlier jobs")
        if self.resume_run:
            try:
                resumed = self._resume(db)
            except Exception:
                db.close()
                raise
            plan = resumed.plan
            self._earlier_jobs = plan.job_ids
            db.write(
                "resume_run",
                uid=plan.run_uid,
                job_id=job_id,
                from_round=plan.from_round,
                model_sha256=plan.model_sha256,
            )
            self.info(
                f"run {plan.run_uid} ({self.run_name}) resumed by job {job_id} (was {plan.previous_status}; jobs "
                f"{', '.join(plan.job_ids)}): rounds {plan.from_round}-{self.num_rounds} of {self.num_rounds} from "
                f"round {plan.model_round}'s global model {resumed.path} (sha256 {plan.model_sha256[:16]}...)"
            )
            return db, plan.run_uid, resumed
        run_uid = uuid.uuid4().hex
        config = {
            k: getattr(self, k)
            for k in (
                "num_rounds",
                "min_clients",
                "round_timeout",
                "aggregation",
                "image_size",
                "norm",
                "task",
                "he_layers",
                "statistics_factor",
            )
        }
        db.write(
            "start_run",
            uid=run_uid,
            name=self.run_name,
            job_id=job_id,
            aggregation=self.aggregation,
            num_rounds=self.num_rounds,
            config=config,
        )
        safe_url = self._db_url.split("@")[-1] if "@" in self._db_url else self._db_url  # never log a password
        self.info(
            f"run {run_uid} ({self.run_name}, job {job_id}): {self.num_rounds} rounds, aggregation "
            f"{self.aggregation}, min_clients {self.min_clients}; database {safe_url}"
        )
        return db, run_uid, None

    def _resume(self, db) -> ResumedRun:
        """The run resume_run names, planned from the record and its model file checked; raises ResumeRefused."""
        if not db.flush():
            raise ResumeRefused(
                f"resume: {len(db.journal.pending())} database write(s) of earlier jobs are still journaled (database "
                "unavailable): the run's record may be incomplete; resume once the database answers"
            )
        repo = Repository(self._db_url)
        try:
            uid = find_run_uid(repo, self.resume_run)
            history = repo.run_history(uid)
        finally:
            repo.close()
        plan = plan_resume(history, {k: getattr(self, k) for k in FIXED_OPTIONS})
        kept = [round_model_path(self._run_models(uid), plan.model_round)]
        path, params, meta = self._load_run_model(plan, kept, plan.job_ids, GLOBAL_MODEL_FILE, "resume")
        meta = {k: v for k, v in meta.items() if k != C.META_GLOBAL_SIGNATURE}  # re-signed for this job's rounds
        self._restore_best(plan)
        best = (plan.best_round, plan.best_score) if plan.best_round is not None else (None, -math.inf)
        return ResumedRun(plan, path, wire.global_model(params, plan.model_round, meta), best)

    def _load_run_model(self, recorded, kept: list, job_ids, app_file: str, purpose: str) -> tuple:
        """(path, params, meta) of the first of a run's saved model files whose sha256 is the one its record holds
        for `recorded` (a ResumePlan or RecordedModel): the files the server keeps per run (`kept`), then `app_file`
        in each of the run's jobs' folders, newest first. Raises ResumeRefused / EvaluationRefused (purpose)."""
        candidates = list(kept)
        for job_id in reversed(job_ids):  # the jobs' own last saves, newest first
            try:
                candidates.append(Path(self.engine.get_workspace().get_app_dir(job_id)) / app_file)
            except ValueError:  # a recorded job id NVFlare would not make a folder of
                continue
        loaded = {}

        def sha_of(path: Path) -> str:
            params, meta = load_state(path)
            try:
                sha = model_sha256(params, meta.get(C.META_ENCRYPTED))
            except (TypeError, KeyError, AttributeError) as e:  # a malformed encrypted block
                raise ValueError(f"its encrypted layers are malformed ({type(e).__name__})") from None
            loaded[path] = (params, meta)
            return sha

        path = find_model_file(recorded, candidates, sha_of, purpose)
        return (path, *loaded[path])

    def _run_models(self, run_uid: str) -> Path:
        root = Path(self.models_dir) if self.models_dir else Path(self.engine.get_workspace().get_root_dir()) / RUNS_DIR
        return run_models_dir(root, run_uid)

    def _restore_best(self, plan: ResumePlan) -> None:
        """The run's best model so far into this job's folder, where the admin's download finds it."""
        kept = self._run_models(plan.run_uid) / BEST_MODEL_FILE
        if plan.best_round is not None and kept.is_file():
            shutil.copyfile(kept, Path(self.engine.get_workspace().get_app_dir(self.fl_ctx.get_job_id())) / kept.name)

    def _keep_round_model(self, run_uid: str, model: FLModel) -> None:
        """The run's recent global models, outside the job's folder, for a resumption (fedmed.resume)."""
        models_dir = self._run_models(run_uid)
        round_num = int(model.meta["round"])
        save_state(model.params, round_model_path(models_dir, round_num), model.meta)
        for old in stale_round_files(models_dir, round_num):
            old.unlink(missing_ok=True)

    def _finish_record(self, db, run_uid, status, best_round, best_score):
        if status == "finished":  # a finished run is not resumed: its final and best models stay, to be scored
            for old in finished_run_leftovers(self._run_models(run_uid)):
                old.unlink(missing_ok=True)
        db.write(
            "finish_run",
            run_uid=run_uid,
            status=status,
            best_round=best_round,
            best_metric=best_score if best_round is not None else None,
        )
        if not db.flush():  # final flush; what is left stays journaled for the next job start
            self.error(
                f"database still unavailable at job end; {len(db.journal.pending())} write(s) remain in "
                f"{db.journal.path}"
            )
        db.close()
        self._live.finish()  # the live report with the run's final status, before NVFlare packs the workspace

    def _load_trust(self, db, run_uid: str) -> dict:
        """Each site's trust as earlier jobs of this federation left it (same database), as the keyed audit chain
        vouches for it: an edited site_trust row (a lifted quarantine) is replaced by the audited state, logged as an
        error and recorded as a run alert."""
        if db.all_pending():
            self.warning(
                "earlier trust scores are still journaled (database unavailable): this job starts from them "
                "once replayed; until then sites start at initial trust"
            )
        try:
            repo = Repository(self._db_url)
            try:
                problems: list = []
                states = repo.load_trust(problems)
                for problem in problems:
                    self.error(f"the record was changed outside fedmed: {problem}")
                    try:
                        repo.record_alert(run_uid, "record_edited", problem)
                    except (SQLAlchemyError, ValueError) as e:  # e.g. the run's start is still journaled
                        self.error(f"could not record that alert ({type(e).__name__})")
            finally:
                repo.close()
        except (SQLAlchemyError, ValueError) as e:  # ValueError: no audit key to check the trust against
            why = type(e).__name__ if isinstance(e, SQLAlchemyError) else e  # a driver message may hold the URL
            self.error(f"cannot read site trust from the database ({why}); sites start at initial trust")
            return {}
        trust = {site: SiteTrust(t.trust, t.quarantined, t.good_streak) for site, t in states.items()}
        if trust:
            self.info(
                "trust carried over from earlier jobs: "
                + ", ".join(
                    f"{s} {t.trust:.3f}{' (quarantined)' if t.quarantined else ''}" for s, t in sorted(trust.items())
                )
            )
        return trust

    def _load_test_set(self):
        if not self.test_dicom_root:
            self.warning(
                f"no global test set configured; rounds are scored by the sites' validation {self._task.score_name}"
            )
            return None
        test_ds = load_test(Path(self.test_dicom_root), Path(self.test_labels_csv), self.image_size, self._task)
        self.info(f"global test set: {len(test_ds)} images")
        return test_ds

    def _send(self, model: FLModel, round_num: int):
        """Returns (results, the sites asked, {site: why not asked} for connected sites NVFlare dropped from this
        job)."""
        gone = self._gone_now()
        connected = self.sample_clients()
        targets = [s for s in connected if s not in gone]
        skipped = {s: f"not sent this round: {gone[s]}" for s in connected if s in gone}
        # A site of this job that NVFlare logged out (no heartbeat for the server kit's heart_beat_timeout) is no
        # longer among the clients: record it missing rather than leave it out of the round without a word.
        for s in sorted(self._job_sites - set(connected)):
            skipped[s] = "not sent this round: " + gone.get(
                s, "not connected to the server (NVFlare logged it out after its heartbeat stopped)"
            )
        self._job_sites.update(connected)
        if len(targets) < self.min_clients:
            raise RuntimeError(
                f"round {round_num + 1}: {len(targets)} site(s) connected"
                + (f" ({', '.join(f'{s}: {why}' for s, why in skipped.items())})" if skipped else "")
                + f", min_clients is {self.min_clients}"
            )
        model.current_round, model.total_rounds, model.start_round = round_num, self.num_rounds, 0
        if self._earlier_jobs:  # the sites' DP-SGD accountants continue the run's (fedmed.resume)
            model.meta[C.META_RESUMED_JOBS] = list(self._earlier_jobs)
        if self._signer is not None:  # hospitals train only on a global model the server signed for this round
            if self._receipt is not None:  # each hospital keeps the record's head: an anchor the key holder lacks
                model.meta[C.META_AUDIT_RECEIPT] = self._receipt
            wire_sig.sign_global(model, self.fl_ctx.get_job_id(), round_num, self._signer)
        self.info(f"round {round_num + 1}/{self.num_rounds}: sending the global model to {targets}")
        # ModelController.send_model_and_wait ends the round at min_responses; we want every site that answers
        # within straggler_wait, so call the base broadcast with its grace period.
        results = self.broadcast_model(
            task_name=self.train_task_name,
            data=model,
            targets=targets,
            min_responses=self.min_clients,
            timeout=self.round_timeout,
            wait_time_after_min_received=self.straggler_wait,
        )
        return results, targets, skipped

    def _validator(self, eval_model, test_ds):
        if test_ds is None or self.validation_images == 0:
            return None
        import torch

        subset = torch.utils.data.Subset(test_ds, range(min(len(test_ds), self.validation_images)))

        def validate(params) -> float:
            load_numpy_state(eval_model, params)
            return evaluate(eval_model, subset, self._task).score

        self.info(f"each update is also scored on {len(subset)} server test images (validation screening)")
        return validate

    def _setup_signatures(self) -> None:
        local = Path(self.engine.get_workspace().get_site_config_dir())
        keys_dir = local / signing.SITE_KEYS_DIR
        kit_requires = keys_dir.is_dir() and any(keys_dir.glob("*.pub"))
        if not (self.signatures or kit_requires):
            return
        self._signer = signing.load_site_keys(local)  # raises naming the missing file
        self._site_keys = signing.load_public_keys_dir(keys_dir)
        self.info(
            f"signatures on: updates must be signed (ML-DSA-65 + Ed25519) by one of {sorted(self._site_keys)}; "
            f"global models are signed with {local / signing.PRIVATE_FILE}"
        )

    def _verifier(self, round_num: int):
        if self._signer is None:
            return None
        job_id = self.fl_ctx.get_job_id()

        def verify(result: FLModel, site: str):
            if site not in self._site_keys:
                raise ValueError(f"no public signing key installed for {site} in the server kit's local/site_keys/")
            return wire_sig.verify_result(result, job_id, round_num, site, self._site_keys[site])

        return verify

    def _clear_part(self, params: dict) -> dict:
        return {k: v for k, v in params.items() if k not in self._he_names}

    def _model_meta(self) -> dict:
        # image_size and norm travel with the weights: inference preprocesses and rebuilds the same way.
        return {"image_size": self.image_size, "norm": self.norm, "task": self.task}

    def _record_round(self, db, run_uid: str, record: RoundRecord) -> None:
        """Into the run record, then out to TensorBoard and report.html (fedmed.flare.live_metrics: never raises)."""
        recorded = db.write("record_round", run_uid=run_uid, record=record)
        self._receipt = wire_sig.audit_receipt(db, run_uid, record.round_num, self._signer) if recorded else None
        self._live.publish(record, self._db_url, recorded)

    def _round_record(
        self,
        report: RoundReport,
        engine: RoundEngine,
        started,
        test_loss=None,
        scored=None,
        test_metrics=None,
        sha=None,
        alerts=(),
    ) -> RoundRecord:
        """scored: (score, score source, mean AUROC) of an aggregated round; alerts: the server's own, beside the
        round engine's."""
        trust = tuple(
            TrustRecord(site, t.trust, t.quarantined, t.good_streak) for site, t in sorted(engine.trust.items())
        )
        val_name = C.META_VAL_PREFIX + self._task.score_name
        updates = tuple(replace(u, val_score=finite_or_none(u.metrics.get(val_name))) for u in report.updates)
        score, source, mean_auroc = scored if scored is not None else (None, None, None)
        return RoundRecord(
            report.round_num + 1,
            updates,
            test_loss,
            finite_or_none(score),
            self._task.score_name if scored is not None else None,
            source,
            mean_auroc,
            test_metrics or {},
            sha,
            started,
            (*report.alerts, *alerts),
            trust,
        )

    def _log_report(self, report: RoundReport) -> None:
        for level, msg in report.log:
            (self.warning if level == "warning" else self.info)(f"round {report.round_num + 1}: {msg}")
        if "fallback" in report.diagnostics:
            self.info(f"round {report.round_num + 1}: {self.aggregation} used {report.diagnostics['fallback']}")
        if not report.diagnostics.get("converged", True):
            self.warning(
                f"round {report.round_num + 1}: geometric median did not converge in "
                f"{report.diagnostics.get('iterations')} iterations; using the last iterate"
            )

    def _log_round(self, report, targets, score, test_loss, best_score, best_round, seconds) -> None:
        iters = report.diagnostics.get("iterations")
        self.info(
            f"round {report.round_num + 1}/{self.num_rounds} done in {seconds:.0f}s: "
            f"{len(report.aggregated_sites)}/{len(targets)} sites aggregated ({self.aggregation}"
            + (f", {iters} Weiszfeld iterations" if iters else "")
            + (", encrypted layers combined homomorphically" if report.encrypted is not None else "")
            + f"), {'val' if test_loss is None else 'test'} {self._task.score_name} {score:.4f}"
            + (f", test loss {test_loss:.4f}" if test_loss is not None else "")
            + f"; best {best_score:.4f} (round {best_round})"
        )

    def _setup_he(self, eval_model) -> EncryptionSpec:
        """The server's secret-free context and the encrypted layers' names/shapes. The server cannot evaluate a
        model whose head it cannot read, so HE rounds are scored by the sites' validation scores."""
        path = (
            Path(self.he_context_file)
            if self.he_context_file
            else Path(self.engine.get_workspace().get_file_path_in_startup(ckks.SERVER_CONTEXT_FILE))
        )
        context = ckks.load_server_context(path)  # raises if the context holds a secret key
        state = eval_model.state_dict()
        self._he_names = ckks.resolve_encrypted_names(list(state), self.he_layers)
        self.info(
            f"HE on: {list(self._he_names)} arrive CKKS-encrypted and are aggregated without decryption "
            f"(server context {path}, no secret key, key set {context.key_id[:12]})"
        )
        if self.test_dicom_root:
            self.warning(
                "HE on: the server cannot evaluate the global model (its encrypted layers are unreadable "
                f"here); rounds are scored by the sites' validation {self._task.score_name} instead of the "
                "global test set"
            )
        return EncryptionSpec(context, self._he_names, {n: tuple(state[n].shape) for n in self._he_names})

    def _send_final_model(self, model: FLModel, sites: list) -> None:
        """Each site keeps the final global model as its own usable copy (decrypted there when HE is on)."""
        connected = set(self.sample_clients())
        targets = [s for s in sites if s in connected]
        if not targets:
            self.warning("no site from the last round is connected: the final global model stays on the server")
            return
        if self._signer is not None:
            wire_sig.sign_global(model, self.fl_ctx.get_job_id(), int(model.current_round or 0), self._signer)
        try:
            # min_responses=1: a site that cannot take the model (e.g. other keys) must not fail a finished run.
            results = self.broadcast_model(
                task_name=C.TASK_FINAL_MODEL,
                data=model,
                targets=targets,
                min_responses=1,
                timeout=self.final_model_timeout,
                wait_time_after_min_received=self.final_model_timeout,
            )
        except Exception as e:
            self.error(f"sending the final global model to the sites failed: {secure_format_exception(e)}")
            return
        kept = sorted(wire.site_of(r) for r in results if (r.metrics or {}).get("saved"))
        missing = sorted(set(targets) - set(kept))
        self.info(f"final global model kept by {kept}" + (f"; not acknowledged by {missing}" if missing else ""))

    def _unusable(self, eval_model, report: RoundReport) -> Optional[str]:
        """Why the round's aggregate is not a usable model (NaN/infinite or input-independent outputs on fixed
        probe images, fedmed.model_health), or None. HE rounds: the server cannot read the encrypted layers."""
        if report.encrypted is not None:
            return None
        load_numpy_state(eval_model, report.params)
        return check_outputs(eval_model, probe_images(self.image_size)).problem

    def _score(self, eval_model, report: RoundReport, site_results: list, test_ds):
        """(round score, its source, mean AUROC, test loss, metrics for the DB): on the global test set
        ("global_test"), else the mean of the aggregated sites' validation scores weighted by their capped sample
        counts ("site_validation")."""
        if test_ds is not None:
            load_numpy_state(eval_model, report.params)
            ev = evaluate(eval_model, test_ds, self._task)
            return ev.score, "global_test", finite_or_none(ev.mean_auroc), ev.loss, {**ev.metrics, "loss": ev.loss}
        score = report.weighted_site_metric(site_results, C.META_VAL_PREFIX + self._task.score_name)
        mean_auroc = report.weighted_site_metric(site_results, C.META_VAL_MEAN_AUROC)
        return score, "site_validation", finite_or_none(mean_auroc), None, {}

    def _calibrate_ood(self, eval_model, test_ds, model: FLModel, best) -> None:
        """Re-save the global and best model with out-of-distribution statistics of the server's own test set
        (fedmed.inference.ood): data the server holds anyway, so the files reveal nothing of a hospital's."""
        import torch

        from fedmed.inference.ood import META_OOD, fit_ood, pooled_features

        images = torch.stack([test_ds[i][0] for i in range(len(test_ds))])
        what = f"server global test set, {len(images)} images"
        targets = [("global", model.params, model.meta)] + ([("best", *best)] if best is not None else [])
        try:
            for which, params, meta in targets:
                load_numpy_state(eval_model, params)
                meta = {**meta, META_OOD: fit_ood(pooled_features(eval_model, images), what).to_meta()}
                if which == "global":
                    self.save_model(FLModel(params_type=model.params_type, params=params, meta=meta))
                elif isinstance(self.persistor, FedMedModelPersistor):
                    self.persistor.save_best(params, meta, self.fl_ctx)
        except ValueError as e:  # e.g. a test set too small to calibrate: the models stand without the guard
            self.warning(f"out-of-distribution guard not calibrated: {e}")
            return
        self.info(f"out-of-distribution guard calibrated on the {what} (global and best model)")

    def _save_best(self, run_uid, params, meta):
        if isinstance(self.persistor, FedMedModelPersistor):
            path = self.persistor.save_best(params, meta, self.fl_ctx)
            save_state(params, self._run_models(run_uid) / BEST_MODEL_FILE, meta)  # a resumption brings it into its job
            self.info(
                f"new best model (round {meta['round']}, {self._task.score_name} {meta['score']:.4f}) saved to {path}"
            )
