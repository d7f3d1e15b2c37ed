"""Cross-site evaluation on the server, a part of FedMedController (fedmed.crosssite holds the rules).

Why not NVFlare's CrossSiteEval / CrossSiteModelEval workflows: both are workflows of their own, run after ours,
that cannot see this run's record (run uid, database journal), its signing keys, its HE state or the sites NVFlare
dropped; CrossSiteEval re-broadcasts whatever model a site submits to every site without a check, and both keep the
results in a JSON file only, unchecked. Here the same steps run inside FedMedController with NVFlare's own task names
(AppConstants.TASK_SUBMIT_MODEL, then AppConstants.TASK_VALIDATION per model, AppConstants.MODEL_OWNER naming the
model), so FedMedTrainer also answers NVFlare's stock workflows.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from nvflare.apis.fl_constant import ReturnCode
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.app_constant import AppConstants
from nvflare.security.logging import secure_format_exception
from sqlalchemy.exc import SQLAlchemyError

from fedmed import constants as C
from fedmed.crosssite import (
    GLOBAL_MODEL,
    CrossSiteRecord,
    asked_sites,
    error_answer_reason,
    evaluation_cell,
    quarantine_reasons,
    summary_line,
)
from fedmed.flare import signatures as wire_sig
from fedmed.flare import wire
from fedmed.flare.persistor import BEST_MODEL_FILE, GLOBAL_MODEL_FILE
from fedmed.hashing import model_sha256
from fedmed.model import build_densenet121, load_numpy_state
from fedmed.resume import EvaluationRefused, find_run_uid, pick_recorded_model, round_model_path
from fedmed.store.journal import Journal, ResilientRecorder
from fedmed.store.repository import Repository, resolve_db_url

HE_NO_LOCAL_MODELS = (
    "HE is on: a local model's head is encrypted and only the federation's aggregate is ever decrypted; the "
    "server does not ask for local models"
)


def first_answers(targets, results) -> tuple:
    """([(site, its answer)], [asked sites with no answer, sorted]): the first answer of each asked site, in order of
    arrival (NVFlare names the site from its connection, never from the payload); an answer from a site not asked
    (a quarantined one, say) and any second answer are dropped."""
    answers, answered = [], set()
    for r in results:
        site = wire.site_of(r)
        if site in targets and site not in answered:
            answered.add(site)
            answers.append((site, r))
    return answers, sorted(set(targets) - answered)


class CrossSiteEvalMixin:
    """Needs from the controller: _task, norm, cross_site_timeout, he_layers, _signer, db_url, _db_url, evaluate_run,
    evaluate_model, _gone_now(), _load_trust(), _run_models(), _load_run_model(), sample_clients(), broadcast_model(),
    fl_ctx, engine, logger, info/warning/error."""

    def _cross_site_eval(
        self, run_uid: str, model: FLModel, sites=None, lend_local_models: bool = True, quarantined=None
    ) -> list:
        """Every connected hospital (of `sites`, e.g. those that answered the last round: a site that died since is
        not waited for) scores `model` (the global model) and every local model a hospital lends on its own
        validation data; each answer is checked (fedmed.crosssite) and the table recorded in the run. A quarantined
        hospital (`quarantined`: site -> why, fedmed.crosssite.quarantine_reasons) is neither asked to lend nor to
        score: its cells say why. Never fails the run: a problem is logged and recorded as the cell's reason."""
        targets, not_asked = asked_sites(
            self.sample_clients(), self._gone_now(), getattr(self, "_job_sites", ()), sites, quarantined or {}
        )
        cells: list = [CrossSiteRecord(GLOBAL_MODEL, s, "missing", why) for s, why in not_asked.items()]
        if lend_local_models:  # a hospital not asked lends nothing
            cells += [CrossSiteRecord(s, s, "not_shared", why) for s, why in not_asked.items()]
        for s in sorted(set(quarantined or {}) & set(not_asked)):
            self.warning(f"cross-site evaluation: {s} is not asked to lend or to score: {not_asked[s]}")
        if not targets:
            self.warning("cross-site evaluation skipped: no hospital to ask")
            if cells:
                self._record_cross_site(run_uid, cells)
            return cells
        self.info(f"cross-site evaluation: {targets} score the global model on their validation data")
        models = [(GLOBAL_MODEL, model)]
        try:
            if lend_local_models and self.he_layers:
                cells += [CrossSiteRecord(s, s, "not_shared", HE_NO_LOCAL_MODELS) for s in targets]
            elif lend_local_models:
                lent, refusals = self._collect_local_models(targets)
                cells += refusals
                models += lent
            for name, m in models:
                cells += self._evaluate_everywhere(name, m, targets)
                if name != GLOBAL_MODEL:  # a lent model's column names every hospital not asked, and why
                    cells += [CrossSiteRecord(name, s, "missing", why) for s, why in not_asked.items()]
        except Exception as e:  # the run is finished and recorded: its cross-site table must not undo that
            self.error(f"cross-site evaluation stopped: {secure_format_exception(e)}")
        if cells:
            self._record_cross_site(run_uid, cells)
            self.info(summary_line(cells, self._task.score_name))
        return cells

    def _broadcast_advisory(self, **kwargs) -> tuple:
        """(results, {site: its error return code}): broadcast_model in NVFlare's resilient mode. Cross-site answers
        come after the run is recorded and are advisory, so no hospital's error (every hospital's included) may end
        the job or keep the final model from the sites; NVFlare drops an answer with an error code from the results,
        and _accept_train_result notes it so that the site's cell says its error, not silence."""
        saved, self._ignore_result_error = self._ignore_result_error, True
        self._answer_errors = {}
        try:
            results = self.broadcast_model(**kwargs)
            return results, dict(self._answer_errors)
        finally:
            self._ignore_result_error = saved
            self._answer_errors = None

    _answer_errors = None  # {site: return code} while a cross-site step waits for its answers

    def _accept_train_result(self, client_name: str, result, fl_ctx, is_unknown_task: bool = False) -> bool:
        """NVFlare's check of every answer's return code (BaseModelController, on its own threads): an answer with an
        error code (the site's executor raised, its filter failed, it does not know the task) is dropped there, in
        resilient mode with a warning only. During a cross-site step the code is noted for the site's cell."""
        errors = self._answer_errors
        rc = result.get_return_code()
        if errors is not None and not is_unknown_task and rc and rc != ReturnCode.OK:
            errors.setdefault(client_name, rc)
        return super()._accept_train_result(client_name, result, fl_ctx, is_unknown_task)

    def _collect_local_models(self, targets: list) -> tuple:
        """([(site, its lent local model)], [not_shared / rejected cells]): each hospital decides (its
        share_local_model and privacy, fedmed.crosssite.local_model_refusal); the server checks what comes back
        before relaying it to anyone."""
        results, errors = self._broadcast_advisory(
            task_name=AppConstants.TASK_SUBMIT_MODEL,
            data=FLModel(params={}, meta={AppConstants.SUBMIT_MODEL_NAME: "last_local_model"}),
            targets=targets,
            min_responses=1,
            timeout=self.cross_site_timeout,
            wait_time_after_min_received=self.cross_site_timeout,
        )
        return self._lent_models(targets, results, errors)

    def _lent_models(self, targets: list, results: list, errors=None) -> tuple:
        """([(site, its lent local model)], [not_shared / rejected cells]) from the answers to submit_model: only an
        asked site's first answer counts (a quarantined site is never asked, so a model it sends anyway is relayed
        to no one)."""
        lent, cells = [], []
        answers, silent = first_answers(targets, results)
        for site, r in answers:
            meta = r.meta or {}
            refused = meta.get(C.META_REFUSED) or meta.get(C.META_UNAVAILABLE)
            if refused is not None:
                cells.append(CrossSiteRecord(site, site, "not_shared", str(refused)[:500]))
                continue
            problem = self._local_model_problem(r)
            if problem:
                self.warning(f"cross-site evaluation: {site}'s local model refused: {problem}")
                cells.append(CrossSiteRecord(site, site, "rejected", f"{site}'s local model {problem}"[:500]))
                continue
            lent.append((site, FLModel(params_type=ParamsType.FULL, params=dict(r.params), meta={"lent_by": site})))
        cells += [CrossSiteRecord(site, site, "not_shared", self._no_answer_reason(site, errors)) for site in silent]
        return lent, cells

    def _local_model_problem(self, result: FLModel):
        """Why a lent local model is not relayed to the other hospitals: not this job's architecture, not finite,
        or carrying encrypted layers."""
        if (result.meta or {}).get(C.META_ENCRYPTED) is not None:
            return "carries encrypted layers, which no other hospital may decrypt"
        params = result.params
        if not isinstance(params, dict) or not params:
            return "is empty"
        try:
            load_numpy_state(build_densenet121(self._task.num_outputs, norm=self.norm), params)
        except Exception as e:  # names or shapes of another architecture
            return f"does not fit this job's model: {e}"[:300]
        for name, value in params.items():
            arr = np.asarray(value)
            if arr.dtype.kind in "fc" and not np.isfinite(arr).all():
                return f"has non-finite values in {name}"
        return None

    def _evaluate_everywhere(self, name: str, model: FLModel, targets: list) -> list:
        sha = model_sha256(model.params, (model.meta or {}).get(C.META_ENCRYPTED))
        data = FLModel(params_type=ParamsType.FULL, params=model.params, meta={**(model.meta or {})})
        data.meta[AppConstants.MODEL_OWNER] = name
        data.meta.pop("lent_by", None)
        if self._signer is not None:  # the sites score only what the server vouches it sent, for evaluation only
            wire_sig.sign_global(data, self.fl_ctx.get_job_id(), C.CROSS_SITE_ROUND, self._signer)
        results, errors = self._broadcast_advisory(
            task_name=AppConstants.TASK_VALIDATION,
            data=data,
            targets=targets,
            min_responses=1,
            timeout=self.cross_site_timeout,
            wait_time_after_min_received=self.cross_site_timeout,
        )
        return self._evaluation_cells(name, sha, targets, results, errors)

    def _evaluation_cells(self, name: str, sha, targets: list, results: list, errors=None) -> list:
        """One cell per target site from its answer about model `name` (the model this broadcast asked about;
        NVFlare names the answering site from its connection, never from the payload)."""
        cells = []
        answers, silent = first_answers(targets, results)
        for site, r in answers:
            meta = r.meta or {}
            refused = meta.get(C.META_REFUSED) or meta.get(C.META_UNAVAILABLE)
            cell = evaluation_cell(
                name,
                site,
                r.metrics,
                meta.get(AppConstants.MODEL_OWNER),
                meta.get(C.META_NUM_SAMPLES),
                self._task,
                refused=None if refused is None else str(refused),
                model_sha256=sha,
            )
            if cell.status == "rejected":
                self.warning(f"cross-site evaluation: result refused: {cell.reason}")
            cells.append(cell)
        why = {site: self._no_answer_reason(site, errors) for site in silent}
        return cells + [CrossSiteRecord(name, site, "missing", why[site], model_sha256=sha) for site in silent]

    def _no_answer_reason(self, site: str, errors) -> str:
        """Why an asked site has no answer in the results: the error it answered with, or silence."""
        if errors and site in errors:
            return error_answer_reason(errors[site])
        return f"no answer within {self.cross_site_timeout}s"

    def _record_cross_site(self, run_uid: str, cells: list) -> None:
        workspace_root = Path(self.engine.get_workspace().get_root_dir())
        db = ResilientRecorder(
            lambda: Repository(self._db_url), Journal.for_job(workspace_root, self.fl_ctx.get_job_id()), self.logger
        )
        try:
            db.write("record_cross_site", run_uid=run_uid, records=cells, score_name=self._task.score_name)
            if not db.flush():
                self.error(f"cross-site results journaled in {db.journal.path}: the database is unavailable")
        finally:
            db.close()

    def _run_cross_site_eval_only(self) -> None:
        """A job that trains nothing: the hospitals score the model the persistor loads (the job's
        initial_weights, e.g. a recorded global model), recorded as a run of its own with no rounds."""
        self.num_rounds, self.run_name = 0, f"{self.run_name} (cross-site evaluation only)"
        recorded = None
        if self.evaluate_run:
            try:
                recorded = self._recorded_model()  # before anything is written: a refusal leaves no run behind
            except EvaluationRefused as e:  # the admin's mistake or a swapped model file: one line, no traceback
                self.error(str(e))
                self.panic(str(e))
                return
        db, run_uid, _ = self._start_record()  # evaluate_only never resumes (refused in __init__)
        status = "finished"
        model = None
        # The federation's trust as its last job left it: a quarantined hospital scores nothing here either.
        quarantined = quarantine_reasons(self._load_trust(db, run_uid), ())
        try:
            self._setup_signatures()
            model = self.load_model() if recorded is None else recorded
            model.meta = {**self._model_meta(), **(model.meta or {}), "round": 0}
            sha = model_sha256(model.params, None)
            found = self._recorded_round_of(sha)
            self.info(
                f"cross-site evaluation only: model sha256 {sha[:12]}"
                + (f", the global model of run {found[0]} round {found[1]}" if found else ", not a recorded round")
            )
        except Exception as e:
            status = "failed"
            self.error(f"run {run_uid} failed: {secure_format_exception(e)}")
            raise
        finally:
            self._finish_record(db, run_uid, status, None, None)
        self._cross_site_eval(run_uid, model, lend_local_models=False, quarantined=quarantined)  # every connected one
        self.info(f"run {run_uid} {status}; cross-site evaluation only")

    def _recorded_model(self) -> FLModel:
        """evaluate_run's final or best global model (evaluate_model), from the server's kept files of the run whose
        sha256 is the one its record holds; raises EvaluationRefused with the one-line reason."""
        purpose = "cross-site evaluation"
        self._db_url = resolve_db_url(Path(self.engine.get_workspace().get_root_dir()), self.db_url)
        try:
            repo = Repository(self._db_url)
            try:
                uid = find_run_uid(repo, self.evaluate_run, purpose)
                history = repo.run_history(uid)
            finally:
                repo.close()
        except SQLAlchemyError as e:  # a driver message may hold the URL: its type only
            raise EvaluationRefused(f"{purpose}: cannot read the record ({type(e).__name__})") from None
        recorded = pick_recorded_model(history, self.evaluate_model)
        models_dir = self._run_models(uid)
        kept = [round_model_path(models_dir, recorded.model_round)]
        if recorded.which == "best":
            kept.insert(0, models_dir / BEST_MODEL_FILE)
        app_file = BEST_MODEL_FILE if recorded.which == "best" else GLOBAL_MODEL_FILE
        path, params, meta = self._load_run_model(recorded, kept, history.job_ids, app_file, purpose)
        self.info(
            f"cross-site evaluation only: run {uid}'s {recorded.which} model (round {recorded.model_round}, sha256 "
            f"{recorded.model_sha256[:16]}...) from {path}"
        )
        meta = {k: v for k, v in meta.items() if k != C.META_GLOBAL_SIGNATURE}  # signed anew for this evaluation
        return FLModel(params_type=ParamsType.FULL, params=params, meta=meta)

    def _recorded_round_of(self, sha: str):
        try:
            repo = Repository(self._db_url)
            try:
                return repo.find_model_round(sha)
            finally:
                repo.close()
        except Exception:  # only a log line depends on it
            return None
