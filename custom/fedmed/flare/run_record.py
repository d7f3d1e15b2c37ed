"""The server's record of one run, a part of the Controller: start (or resume), each round, finish; the run's model
files a resumption or a later evaluation starts from; the trust earlier jobs left. Writes go through the journaled
recorder (fedmed.store.journal), so a database outage never loses a round."""

from __future__ import annotations

import math
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from sqlalchemy.exc import SQLAlchemyError

from fedmed.flare import signatures as wire_sig
from fedmed.flare import wire
from fedmed.flare.persistor import BEST_MODEL_FILE, GLOBAL_MODEL_FILE
from fedmed.job import constants as C
from fedmed.job.jobconfig import JobConfig
from fedmed.models.hashing import model_sha256
from fedmed.models.weights import load_state, save_state
from fedmed.server.resume import (
    FIXED_OPTIONS,
    RUNS_DIR,
    EvaluationRefused,
    ResumePlan,
    ResumeRefused,
    find_model_file,
    find_run_uid,
    finished_run_leftovers,
    pick_recorded_model,
    plan_resume,
    round_model_path,
    run_models_dir,
    stale_round_files,
)
from fedmed.server.robust.trust import SiteTrust
from fedmed.store.journal import Journal, ResilientRecorder
from fedmed.store.repository import Repository, RoundRecord, resolve_db_url

RECORDED_OPTIONS = (*FIXED_OPTIONS, "min_clients", "round_timeout", "statistics_factor")


@dataclass(frozen=True)
class ResumedRun:
    """What this job continues: the plan, the model file it was checked against, the global model, (best round,
    best score) so far."""

    plan: ResumePlan
    path: Path
    model: FLModel
    best: tuple


class RunRecorder:
    """One run's record for `component` (the workflow: its engine, job id and log). signer: the server's signing keys,
    set once signatures are on; the head of the audit chain after each round (`receipt`) is signed with them."""

    def __init__(self, component, config: JobConfig, live=None):
        self.component, self.config, self.live = component, config, live
        self.signer = None
        self.receipt = None  # the signed audit chain head of the last recorded round, sent with the next model
        self.run_uid: Optional[str] = None
        self.earlier_jobs: tuple = ()  # the jobs that ran the run this job resumes
        workspace = component.engine.get_workspace()
        self._workspace = workspace
        self.job_id = component.fl_ctx.get_job_id()
        self.db_url = resolve_db_url(Path(workspace.get_root_dir()), config.db_url)
        self._db = None

    # --- the run ------------------------------------------------------------------------------------------------

    def _open(self) -> ResilientRecorder:
        # One journal per job at the workspace root (concurrent jobs never share a file); the recorder replays the
        # journals earlier jobs left before this job's own writes.
        root = Path(self._workspace.get_root_dir())
        db = ResilientRecorder(
            lambda: Repository(self.db_url), Journal.for_job(root, self.job_id), self.component.logger
        )
        if db.all_pending():
            self.component.info(f"replaying {db.all_pending()} journaled database write(s) from earlier jobs")
        return db

    def start(self, name: str, num_rounds: int) -> str:
        """A new run recorded as started; returns its uid."""
        self._db = self._open()
        self.run_uid = uuid.uuid4().hex
        job = self.config.to_dict()
        options = {k: job[k] for k in RECORDED_OPTIONS}
        options.update(min_clients=self.config.required_clients, num_rounds=num_rounds)
        self._db.write(
            "start_run",
            uid=self.run_uid,
            name=name,
            job_id=self.job_id,
            aggregation=self.config.aggregation,
            num_rounds=num_rounds,
            config=options,
        )
        safe_url = self.db_url.split("@")[-1] if "@" in self.db_url else self.db_url  # never log a password
        self.component.info(
            f"run {self.run_uid} ({name}, job {self.job_id}): {num_rounds} rounds, aggregation "
            f"{self.config.aggregation}, min_clients {self.config.required_clients}; database {safe_url}"
        )
        return self.run_uid

    def resume(self) -> ResumedRun:
        """The run config.resume_run names, recorded as resumed by this job. A refused resumption raises
        ResumeRefused with its one-line reason, nothing written."""
        self._db = self._open()
        try:
            resumed = self._plan_resume()
        except Exception:
            self._db.close()
            raise
        plan = resumed.plan
        self.run_uid, self.earlier_jobs = plan.run_uid, plan.job_ids
        self._db.write(
            "resume_run",
            uid=plan.run_uid,
            job_id=self.job_id,
            from_round=plan.from_round,
            model_sha256=plan.model_sha256,
        )
        n = self.config.num_rounds
        self.component.info(
            f"run {plan.run_uid} ({self.config.name}) resumed by job {self.job_id} (was {plan.previous_status}; jobs "
            f"{', '.join(plan.job_ids)}): rounds {plan.from_round}-{n} of {n} from round {plan.model_round}'s global "
            f"model {resumed.path} (sha256 {plan.model_sha256[:16]}...)"
        )
        return resumed

    def _plan_resume(self) -> ResumedRun:
        if not self._db.flush():
            raise ResumeRefused(
                f"resume: {len(self._db.journal.pending())} database write(s) of earlier jobs are still journaled "
                "(database unavailable): the run's record may be incomplete; resume once the database answers"
            )
        repo = Repository(self.db_url)
        try:
            uid = find_run_uid(repo, self.config.resume_run)
            history = repo.run_history(uid)
        finally:
            repo.close()
        job = self.config.to_dict()
        plan = plan_resume(history, {k: job[k] for k in FIXED_OPTIONS})
        kept = [round_model_path(self.models_dir(uid), plan.model_round)]
        path, params, meta = self.load_run_model(plan, kept, plan.job_ids, GLOBAL_MODEL_FILE, "resume")
        meta = {k: v for k, v in meta.items() if k != C.META_GLOBAL_SIGNATURE}  # re-signed for this job's rounds
        kept_best = self.models_dir(uid) / BEST_MODEL_FILE
        if plan.best_round is not None and kept_best.is_file():  # where the admin's download finds it
            shutil.copyfile(kept_best, Path(self._workspace.get_app_dir(self.job_id)) / kept_best.name)
        best = (plan.best_round, plan.best_score) if plan.best_round is not None else (None, -math.inf)
        return ResumedRun(plan, path, wire.global_model(params, plan.model_round, meta), best)

    def round(self, record: RoundRecord) -> None:
        """Into the run record, then out to TensorBoard and report.html (fedmed.flare.live_metrics: never raises)."""
        recorded = self._db.write("record_round", run_uid=self.run_uid, record=record)
        self.receipt = (
            wire_sig.audit_receipt(self._db, self.run_uid, record.round_num, self.signer) if recorded else None
        )
        if self.live is not None:
            self.live.publish(record, self.db_url, recorded)

    def finish(self, status: str, best_round=None, best_score=None) -> None:
        if status == "finished":  # a finished run is not resumed: its final and best models stay, to be scored
            for old in finished_run_leftovers(self.models_dir(self.run_uid)):
                old.unlink(missing_ok=True)
        self._db.write(
            "finish_run",
            run_uid=self.run_uid,
            status=status,
            best_round=best_round,
            best_metric=best_score if best_round is not None else None,
        )
        if not self._db.flush():  # final flush; what is left stays journaled for the next job start
            self.component.error(
                f"database still unavailable at job end; {len(self._db.journal.pending())} write(s) remain in "
                f"{self._db.journal.path}"
            )
        self._db.close()
        if self.live is not None:
            self.live.finish()  # the live report with the run's final status, before NVFlare packs the workspace

    def cross_site(self, cells: list, score_name: str) -> None:
        """The cross-site table into the run's record (after the run is finished: a recorder of its own)."""
        db = self._open()
        try:
            db.write("record_cross_site", run_uid=self.run_uid, records=cells, score_name=score_name)
            if not db.flush():
                self.component.error(f"cross-site results journaled in {db.journal.path}: the database is unavailable")
        finally:
            db.close()
        if self.live is not None:
            self.live.finish()  # the live report once more, now with the cross-site table

    def load_trust(self) -> dict:
        """Each site's trust as earlier jobs of this federation left it (same database), as the keyed audit chain
        vouches for it: an edited site_trust row (a lifted quarantine) is replaced by the audited state, logged as an
        error and recorded as a run alert."""
        log = self.component
        if self._db is not None and self._db.all_pending():
            log.warning(
                "earlier trust scores are still journaled (database unavailable): this job starts from them "
                "once replayed; until then sites start at initial trust"
            )
        try:
            repo = Repository(self.db_url)
            try:
                problems: list = []
                states = repo.load_trust(problems)
                for problem in problems:
                    log.error(f"the record was changed outside fedmed: {problem}")
                    try:
                        repo.record_alert(self.run_uid, "record_edited", problem)
                    except (SQLAlchemyError, ValueError) as e:  # e.g. the run's start is still journaled
                        log.error(f"could not record that alert ({type(e).__name__})")
            finally:
                repo.close()
        except (SQLAlchemyError, ValueError) as e:  # ValueError: no audit key to check the trust against
            why = type(e).__name__ if isinstance(e, SQLAlchemyError) else e  # a driver message may hold the URL
            log.error(f"cannot read site trust from the database ({why}); sites start at initial trust")
            return {}
        trust = {site: SiteTrust(t.trust, t.quarantined, t.good_streak) for site, t in states.items()}
        if trust:
            log.info(
                "trust carried over from earlier jobs: "
                + ", ".join(
                    f"{s} {t.trust:.3f}{' (quarantined)' if t.quarantined else ''}" for s, t in sorted(trust.items())
                )
            )
        return trust

    # --- the run's model files ----------------------------------------------------------------------------------

    def models_dir(self, run_uid: Optional[str] = None) -> Path:
        root = (
            Path(self.config.models_dir) if self.config.models_dir else Path(self._workspace.get_root_dir()) / RUNS_DIR
        )
        return run_models_dir(root, run_uid or self.run_uid)

    def keep_round_model(self, model: FLModel) -> None:
        """The run's recent global models, outside the job's folder, for a resumption (fedmed.server.resume)."""
        models_dir = self.models_dir()
        round_num = int(model.meta["round"])
        save_state(
            model.params, round_model_path(models_dir, round_num), model.meta, reuse=True
        )  # copies the global model file
        for old in stale_round_files(models_dir, round_num):
            old.unlink(missing_ok=True)

    def keep_best_model(self, params: dict, meta: dict) -> None:
        save_state(params, self.models_dir() / BEST_MODEL_FILE, meta, reuse=True)  # a resumption brings it in

    def load_run_model(self, recorded, kept: list, job_ids, app_file: str, purpose: str) -> tuple:
        """(path, params, meta) of the first of a run's saved model files whose sha256 is the one its record holds
        for `recorded` (a ResumePlan or RecordedModel): the files the server keeps per run (`kept`), then `app_file`
        in each of the run's jobs' folders, newest first. Raises ResumeRefused / EvaluationRefused (purpose)."""
        candidates = list(kept)
        for job_id in reversed(job_ids):  # the jobs' own last saves, newest first
            try:
                candidates.append(Path(self._workspace.get_app_dir(job_id)) / app_file)
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

    def recorded_model(self) -> FLModel:
        """config.cross_site_eval_run's final or best global model (cross_site_eval_model), from the server's kept
        files of the run whose sha256 is the one its record holds; raises EvaluationRefused with the one-line reason,
        nothing written."""
        purpose = "cross-site evaluation"
        try:
            repo = Repository(self.db_url)
            try:
                uid = find_run_uid(repo, self.config.cross_site_eval_run, purpose)
                history = repo.run_history(uid)
            finally:
                repo.close()
        except SQLAlchemyError as e:  # a driver message may hold the URL: its type only
            raise EvaluationRefused(f"{purpose}: cannot read the record ({type(e).__name__})") from None
        recorded = pick_recorded_model(history, self.config.cross_site_eval_model)
        models_dir = self.models_dir(uid)
        kept = [round_model_path(models_dir, recorded.model_round)]
        if recorded.which == "best":
            kept.insert(0, models_dir / BEST_MODEL_FILE)
        app_file = BEST_MODEL_FILE if recorded.which == "best" else GLOBAL_MODEL_FILE
        path, params, meta = self.load_run_model(recorded, kept, history.job_ids, app_file, purpose)
        self.component.info(
            f"cross-site evaluation only: run {uid}'s {recorded.which} model (round {recorded.model_round}, sha256 "
            f"{recorded.model_sha256[:16]}...) from {path}"
        )
        meta = {k: v for k, v in meta.items() if k != C.META_GLOBAL_SIGNATURE}  # signed anew for this evaluation
        return FLModel(params_type=ParamsType.FULL, params=params, meta=meta)

    def recorded_round_of(self, sha: str):
        """(run uid, round) whose global model has this sha256, or None (only a log line depends on it)."""
        try:
            repo = Repository(self.db_url)
            try:
                return repo.find_model_round(sha)
            finally:
                repo.close()
        except Exception:
            return None
