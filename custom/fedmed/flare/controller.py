"""NVFlare server workflow: rounds of send -> engine.step -> save -> record, read like NVFlare's FedAvg.

Thin adapter composed of small parts: every rule of a round (screening, aggregation, trust, quarantine, encrypted
combination) lives in fedmed.server.rounds.RoundEngine; the run's record in fedmed.flare.run_record.RunRecorder; the best
model in fedmed.flare.best_model.BestModelKeeper; scoring in fedmed.flare.round_scoring; the model card in
fedmed.models.model_card.ModelCardBuilder; FLModel conversion in fedmed.flare.wire. Cross-site evaluation is the next
workflow of the job (fedmed.flare.crosssite_eval), handed what it needs when training finishes. NVFlare's
AppEventType events (ROUND_STARTED, BEFORE_AGGREGATION, AFTER_AGGREGATION, ROUND_DONE, ...) let other components
observe the rounds (the benchmarks' fedmed.flare.probes).
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.fl_model import FLModel
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType
from nvflare.app_common.workflows.model_controller import ModelController
from nvflare.security.logging import secure_format_exception

from fedmed.data.loading import load_test
from fedmed.flare import signatures as wire_sig
from fedmed.flare import wire
from fedmed.flare.anchors import close_watch, open_watch
from fedmed.flare.best_model import BestModelKeeper
from fedmed.flare.crosssite_eval import CrossSiteRequest
from fedmed.flare.live_metrics import LiveMetrics
from fedmed.flare.persistor import FedMedModelPersistor
from fedmed.flare.round_scoring import RoundScore, RoundScorer, report_lines, round_line
from fedmed.flare.run_record import RunRecorder
from fedmed.flare.site_watch import SiteWatch
from fedmed.job import constants as C
from fedmed.job.jobconfig import JobConfig
from fedmed.job.tasks import get_task
from fedmed.models.hashing import model_sha256, with_ciphertexts
from fedmed.models.model_card import META_MODEL_CARD, ModelCardBuilder, card_from_meta
from fedmed.models.network import build_densenet121, load_numpy_state
from fedmed.models.weights import remember_digest
from fedmed.security import ckks, signing
from fedmed.server.anchors import AnchorWatch
from fedmed.server.crosssite import quarantine_reasons
from fedmed.server.heap import release_round_memory
from fedmed.server.resume import EvaluationRefused, ResumeRefused
from fedmed.server.rounds import EncryptionSpec, RoundEngine, RoundRules
from fedmed.store.audit import RecordRefused
from fedmed.store.models import utcnow
from fedmed.store.repository import AlertRecord


@dataclass
class _Run:
    """One training run's working parts, built at its start."""

    record: RunRecorder
    engine: RoundEngine
    scorer: RoundScorer
    card: ModelCardBuilder
    first_round: int = 0
    last_round_sites: list = field(default_factory=list)  # who answered the last round: the final model goes there
    trust_events: list = field(default_factory=list)  # (round from 1, site, "quarantined" | "readmitted", message)


class FedMedController(ModelController):
    def __init__(
        self,
        job: dict,
        test_dicom_root: Optional[str] = None,
        test_labels_csv: Optional[str] = None,
        he_context_file: Optional[str] = None,
        signatures: bool = False,
        persistor_id: str = AppConstants.DEFAULT_PERSISTOR_ID,
        train_task_name: str = AppConstants.TASK_TRAIN,
    ):
        """Federated rounds with pluggable aggregation, global test evaluation, persistence and a DB record.

        Args:
            job: the job's settings, fedmed.job.jobconfig.JobConfig.to_dict() (a JobConfig is taken too): every
                setting's meaning and default is in JobConfig; checked here, so a bad job fails when it is built.
            test_dicom_root / test_labels_csv: the global test set evaluated each round on the server. Without it
                the round's score is the sample-weighted mean of the sites' validation score (so too with HE: the
                server cannot evaluate a model whose head it cannot read).
            he_context_file: the server's TenSEAL context (no secret key; refused if it has one). Default:
                <startup kit>/startup/server_context.tenseal, written at provisioning.
            signatures: require every update signed by its hospital and sign every global model (fedmed.security.signing).
                A server kit whose local/site_keys/ holds hospitals' public keys (installed out of band, as
                fedmed-federation does) requires them whatever the job says.
            persistor_id: component id of the FedMedModelPersistor.
            train_task_name: task sent to the sites.
        """
        super().__init__(persistor_id=persistor_id, ignore_result_error=None)
        self.config = JobConfig.from_dict(job)  # raises naming a bad or unknown setting
        self.job = self.config.to_dict()  # same name as the argument: FedJob serialises attributes by name
        self._task = get_task(self.config.task)
        if bool(test_dicom_root) != bool(test_labels_csv):
            raise ValueError("test_dicom_root and test_labels_csv must be given together")
        self.test_dicom_root, self.test_labels_csv = test_dicom_root, test_labels_csv
        self.he_context_file, self.signatures = he_context_file, bool(signatures)
        self.train_task_name = train_task_name
        c = self.config
        self._rules = RoundRules(
            aggregation=c.aggregation,
            min_clients=c.required_clients,
            statistics_factor=c.statistics_factor,
            trust=c.trust_policy(),
            centred_clipping=c.centred_clipping,
            server_optimizer=c.algorithm().server_optimizer,
            scaffold=c.scaffold,
        )
        self._signer = None  # the server's signing keys, when signatures are on
        self._anchors = AnchorWatch()  # sites' ledger heads and receipts (server/anchors.py), opened in _prepare
        self._site_keys: dict = {}
        self._he_names: tuple = ()
        self._watch = SiteWatch()
        self._live = LiveMetrics(self)

    def handle_event(self, event_type: str, fl_ctx: FLContext):
        super().handle_event(event_type, fl_ctx)
        self._watch.on_event(event_type, fl_ctx, self)

    # ------------------------------------------------------------------------------------------------------------

    def run(self):
        if self.config.evaluates_only:
            return self._evaluate_only()
        record = RunRecorder(self, self.config, self._live)
        try:
            resumed = record.resume() if self.config.resume_run else None
            if resumed is None:
                record.start(self.config.name, self.config.num_rounds)
        except (ResumeRefused, RecordRefused) as e:
            # The admin's mistake, a swapped model file, no audit key, a record that does not verify: one line, no
            # traceback (a RecordRefused is no database outage: the job must not run unrecorded).
            self.error(str(e))
            self.panic(str(e))  # the job ends abnormally; nothing was written to the run's record
            return
        model = resumed.model if resumed else self.load_model()
        save = functools.partial(self._save_best, record)
        best = BestModelKeeper(self._task.score_name, save, resumed.best if resumed else (None, -math.inf))
        self.event(AppEventType.TRAINING_STARTED)
        status, run = "finished", None
        try:
            # Inside the try: a refused HE context ends the run recorded as failed, with the reason.
            run = self._prepare(record, model, resumed)
            for round_num in range(run.first_round, self.config.num_rounds):
                if self.abort_signal.triggered:
                    status = "aborted"
                    break
                model = self._round(run, model, round_num, best)
                if model is None:
                    status = "aborted"
                    break
        except Exception as e:
            status = "failed"
            self.error(f"run {record.run_uid} failed: {secure_format_exception(e)}")
            raise
        finally:
            record.finish(status, best.round, best.score)
            close_watch(self._anchors)  # the record's connection it held for the job
            self.event(AppEventType.TRAINING_FINISHED)
        if status == "finished":
            self._after_training(run, model, best)
        self.info(f"run {record.run_uid} {status}; {best.summary()}")

    def _round(self, run: _Run, model: FLModel, round_num: int, best: BestModelKeeper) -> Optional[FLModel]:
        """One round, as FedAvg's: send, wait, aggregate (RoundEngine.step), save, score, record. Returns the global
        model the next round starts from, None when the job was aborted."""
        self.event(AppEventType.ROUND_STARTED)
        started, t0 = utcnow(), time.monotonic()
        control = run.engine.control(self._clear_part(model.params))  # SCAFFOLD's c, None without it
        if control is not None:
            model.meta[C.META_CONTROL] = control
        model.meta = {**(model.meta or {}), C.META_LEDGER_SEEN: self._anchors.ledger_counts()}
        results, targets, skipped = self._send(model, round_num, run.record)
        model.meta.pop(C.META_CONTROL, None)  # sent, never saved with the model
        if self.abort_signal.triggered:
            return None
        self.event(AppEventType.BEFORE_AGGREGATION)
        run.last_round_sites = [wire.site_of(r) for r in results]
        site_results = wire.to_site_results(results, self._verifier(round_num))
        for alert in self._anchors.check(round_num, site_results)[1]:  # recorded with the round (_record)
            self.error(f"round {round_num + 1}: ALERT {alert.kind} ({alert.site}): {alert.message}")
        answered = {r.site for r in site_results}
        gone = {s: why for s, why in self._watch.gone().items() if s in targets and s not in answered}
        report = run.engine.step(round_num, self._clear_part(model.params), site_results, targets, {**skipped, **gone})
        self.event(AppEventType.AFTER_AGGREGATION)
        run.trust_events += [
            (round_num + 1, a.site, a.kind, a.message) for a in report.alerts if a.kind in ("quarantined", "readmitted")
        ]
        for level, msg in report_lines(report, self.config.aggregation):
            (self.warning if level == "warning" else self.info)(msg)
        if not report.aggregated:
            self._record(run, run.scorer.record(report, run.engine, started))
            if not report.probation:
                raise RuntimeError(report.problem)
            return model  # the global model stands; quarantined sites were scored and may be re-admitted
        run.card.add_round(report.aggregated_sites, site_results)
        meta = {**self._model_meta(), META_MODEL_CARD: run.card.card().to_meta()}
        # Rounds are numbered from 1 in the record, the model files and the logs; NVFlare's current_round
        # (0-based) stays on the wire, where the sites' schedules and signatures use it.
        model = wire.global_model(report.params, round_num + 1, meta, report.encrypted)
        # One SHA-256 of the model a round: the record's, and the key save_state's copies reuse (models.weights)
        sha = with_ciphertexts(remember_digest(model.params), model.meta.get(C.META_ENCRYPTED))
        unusable = run.scorer.unusable(report)
        if unusable is None:
            scored = run.scorer.score(report, site_results)
        else:  # alerted in this round, unscored, so never best (NaN > best is False)
            self.warning(f"round {round_num + 1}: ALERT {unusable}")
            scored = RoundScore()
        self.save_model(model)
        run.record.keep_round_model(model)
        best.offer(round_num + 1, scored.score, model, scored.source, sha)
        alerts = () if unusable is None else (AlertRecord(None, "global_model_unusable", unusable),)
        self._record(run, run.scorer.record(report, run.engine, started, scored, sha, alerts))
        self.info(round_line(report, self.config, len(targets), scored, best, time.monotonic() - t0))
        return model

    def _record(self, run: _Run, record) -> None:
        self.event(C.EVENT_BEFORE_RECORD)
        run.record.round(self._anchors.attach(record))  # with the sites' anchors and alerts (server/anchors.py)
        self.event(C.EVENT_AFTER_RECORD)
        # The round's buffers (updates, aggregate, saved model) back to the operating system: cycles and glibc
        # keep them resident otherwise, and the server's RSS grew ~35 MB a round (fedmed.server.heap).
        release_round_memory()
        self.event(AppEventType.ROUND_DONE)

    def _prepare(self, record: RunRecorder, model: FLModel, resumed) -> _Run:
        eval_model = build_densenet121(self._task.num_outputs, norm=self.config.norm)
        test_ds = self._load_test_set()
        encryption = self._setup_he(eval_model) if self.config.he_layers else None
        scorer = RoundScorer(self._task, self.config.image_size, eval_model, None if encryption else test_ds)
        validate = scorer.validator(self.config.validation_images)
        if validate is not None:
            n = min(len(scorer.test_ds), self.config.validation_images)
            self.info(f"each update is also scored on {n} server test images (validation screening)")
        engine = RoundEngine(self._rules, encryption, trust=record.load_trust(), validate=validate)
        self._setup_signatures(record)
        # Insider checks (fedmed.server.anchors): each site's ledger head extends what it reported; its receipts are held.
        self._anchors = open_watch(record.db_url, self._signer and self._signer.public, self.error)
        if self._rules.scaffold and self._signer is not None:
            raise RuntimeError(
                "scaffold cannot run with signatures on: the control variates travel beside the signed model and "
                "update, not covered by either signature"
            )
        c = self.config
        card = ModelCardBuilder(c.task, c.aggregation, "NVFlare federation (fedmed)", c.he_layers or ())
        card.continue_from(card_from_meta(model.meta or {}) if resumed else None)
        return _Run(record, engine, scorer, card, resumed.plan.first_wire_round if resumed else 0)

    def _after_training(self, run: _Run, model: FLModel, best: BestModelKeeper) -> None:
        """A finished run: the OOD guard calibrated, the final model to the sites, cross-site evaluation handed on."""
        if run.scorer.test_ds is not None:
            self._calibrate_ood(run.scorer, model, best.model)
        self._send_final_model(model, run.last_round_sites)
        if self.config.cross_site_eval:
            quarantined = quarantine_reasons(run.engine.trust, run.trust_events)  # neither lends nor scores
            request = CrossSiteRequest(
                model, run.record.cross_site, run.last_round_sites, quarantined, True, self._watch, self._signer
            )
            self.fl_ctx.set_prop(C.CTX_CROSS_SITE, request, private=True, sticky=True)

    def _evaluate_only(self) -> None:
        """A job that trains nothing: the hospitals score the model the persistor loads (the job's
        cross_site_eval_only file) or a recorded run's, recorded as a run of its own with no rounds; the
        cross-site workflow after this one does the scoring."""
        record = RunRecorder(self, self.config, self._live)
        recorded = None
        if self.config.cross_site_eval_run:
            try:
                recorded = record.recorded_model()  # before anything is written: a refusal leaves no run behind
            except EvaluationRefused as e:  # the admin's mistake or a swapped model file: one line, no traceback
                self.error(str(e))
                self.panic(str(e))
                return
        record.start(f"{self.config.name} (cross-site evaluation only)", 0)
        status, model = "finished", None
        # The federation's trust as its last job left it: a quarantined hospital scores nothing here either.
        quarantined = quarantine_reasons(record.load_trust(), ())
        try:
            self._setup_signatures(record)
            model = self.load_model() if recorded is None else recorded
            model.meta = {**self._model_meta(), **(model.meta or {}), "round": 0}
            sha = model_sha256(model.params, None)
            found = record.recorded_round_of(sha)
            self.info(
                f"cross-site evaluation only: model sha256 {sha[:12]}"
                + (f", the global model of run {found[0]} round {found[1]}" if found else ", not a recorded round")
            )
        except Exception as e:
            status = "failed"
            self.error(f"run {record.run_uid} failed: {secure_format_exception(e)}")
            raise
        finally:
            record.finish(status)
        request = CrossSiteRequest(model, record.cross_site, None, quarantined, False, self._watch, self._signer)
        self.fl_ctx.set_prop(C.CTX_CROSS_SITE, request, private=True, sticky=True)
        self.info(f"run {record.run_uid} {status}; cross-site evaluation only")

    # ------------------------------------------------------------------------------------------------------------

    def _load_test_set(self):
        if not self.test_dicom_root:
            self.warning(
                f"no global test set configured; rounds are scored by the sites' validation {self._task.score_name}"
            )
            return None
        test_ds = load_test(Path(self.test_dicom_root), Path(self.test_labels_csv), self.config.image_size, self._task)
        self.info(f"global test set: {len(test_ds)} images")
        return test_ds

    def _send(self, model: FLModel, round_num: int, record: RunRecorder):
        """Returns (results, the sites asked, {site: why not asked} for connected sites NVFlare dropped from this
        job)."""
        gone = self._watch.gone()
        connected = self.sample_clients()
        targets = [s for s in connected if s not in gone]
        skipped = {s: f"not sent this round: {gone[s]}" for s in connected if s in gone}
        # A site of this job that NVFlare logged out (no heartbeat for the server kit's heart_beat_timeout) is no
        # longer among the clients: record it missing rather than leave it out of the round without a word.
        for s in sorted(self._watch.job_sites - set(connected)):
            skipped[s] = "not sent this round: " + gone.get(
                s, "not connected to the server (NVFlare logged it out after its heartbeat stopped)"
            )
        self._watch.job_sites.update(connected)
        if len(targets) < self.config.required_clients:
            raise RuntimeError(
                f"round {round_num + 1}: {len(targets)} site(s) connected"
                + (f" ({', '.join(f'{s}: {why}' for s, why in skipped.items())})" if skipped else "")
                + f", min_clients is {self.config.required_clients}"
            )
        model.current_round, model.total_rounds, model.start_round = round_num, self.config.num_rounds, 0
        if record.earlier_jobs:  # the sites' DP-SGD accountants continue the run's (fedmed.server.resume)
            model.meta[C.META_RESUMED_JOBS] = list(record.earlier_jobs)
        if self._signer is not None:  # hospitals train only on a global model the server signed for this round
            if record.receipt is not None:  # each hospital keeps the record's head: an anchor the key holder lacks
                model.meta[C.META_AUDIT_RECEIPT] = record.receipt
            wire_sig.sign_global(model, self.fl_ctx.get_job_id(), round_num, self._signer)
        self.info(f"round {round_num + 1}/{self.config.num_rounds}: sending the global model to {targets}")
        # ModelController.send_model_and_wait ends the round at min_responses; we want every site that answers
        # within straggler_wait, so call the base broadcast with its grace period.
        results = self.broadcast_model(
            task_name=self.train_task_name,
            data=model,
            targets=targets,
            min_responses=self.config.required_clients,
            timeout=self.config.round_timeout,
            wait_time_after_min_received=self.config.straggler_wait,
        )
        return results, targets, skipped

    def _setup_signatures(self, record: RunRecorder) -> None:
        local = Path(self.engine.get_workspace().get_site_config_dir())
        keys_dir = local / signing.SITE_KEYS_DIR
        kit_requires = keys_dir.is_dir() and any(keys_dir.glob("*.pub"))
        if not (self.signatures or kit_requires):
            return
        self._signer = signing.load_site_keys(local)  # raises naming the missing file
        self._site_keys = signing.load_public_keys_dir(keys_dir)
        record.signer = self._signer
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
        return {"image_size": self.config.image_size, "norm": self.config.norm, "task": self.config.task}

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
        self._he_names = ckks.resolve_encrypted_names(list(state), list(self.config.he_layers))
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
                timeout=self.config.final_model_timeout,
                wait_time_after_min_received=self.config.final_model_timeout,
            )
        except Exception as e:
            self.error(f"sending the final global model to the sites failed: {secure_format_exception(e)}")
            return
        kept = sorted(wire.site_of(r) for r in results if (r.metrics or {}).get("saved"))
        missing = sorted(set(targets) - set(kept))
        self.info(f"final global model kept by {kept}" + (f"; not acknowledged by {missing}" if missing else ""))

    def _calibrate_ood(self, scorer: RoundScorer, model: FLModel, best) -> None:
        """Re-save the global and best model with out-of-distribution statistics of the server's own test set
        (fedmed.inference.ood): data the server holds anyway, so the files reveal nothing of a hospital's."""
        import torch

        from fedmed.inference.ood import META_OOD, fit_ood, pooled_features

        test_ds, eval_model = scorer.test_ds, scorer.eval_model
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

    def _save_best(self, record: RunRecorder, params: dict, meta: dict) -> None:
        if isinstance(self.persistor, FedMedModelPersistor):
            path = self.persistor.save_best(params, meta, self.fl_ctx)
            record.keep_best_model(params, meta)
            self.info(
                f"new best model (round {meta['round']}, {self._task.score_name} {meta['score']:.4f}) saved to {path}"
            )
