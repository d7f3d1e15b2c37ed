"""Cross-site evaluation on the server: a workflow of its own, after the training workflow (as NVFlare's
CrossSiteModelEval follows a training workflow in a job's workflow list); fedmed.server.crosssite holds the rules.

The training workflow (fedmed.flare.controller.FedMedController) hands this one what it needs, explicitly, as a
CrossSiteRequest in a sticky FLContext property (C.CTX_CROSS_SITE): the model to score, the run's recorder (the
table goes into the run's record), the sites to ask and why any is left out, the sites NVFlare dropped, the server's
signing keys. No request (training failed, aborted, or the job turned cross-site evaluation off): nothing to do.

Why not NVFlare's CrossSiteEval / CrossSiteModelEval themselves: they cannot see this run's record, its signing keys,
its HE state or the sites NVFlare dropped; CrossSiteEval re-broadcasts whatever model a site submits to every site
without a check, and both keep the results in a JSON file only, unchecked. The steps here use NVFlare's own task
names (AppConstants.TASK_SUBMIT_MODEL, then AppConstants.TASK_VALIDATION per model, AppConstants.MODEL_OWNER naming
the model), so FedMedTrainer also answers NVFlare's stock workflows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
from nvflare.apis.fl_constant import ReturnCode
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.workflows.model_controller import ModelController
from nvflare.security.logging import secure_format_exception

from fedmed.flare import signatures as wire_sig
from fedmed.flare import wire
from fedmed.flare.site_watch import SiteWatch
from fedmed.job import constants as C
from fedmed.job.jobconfig import JobConfig
from fedmed.job.tasks import get_task
from fedmed.models.hashing import model_sha256
from fedmed.models.network import build_densenet121, load_numpy_state
from fedmed.server.crosssite import (
    GLOBAL_MODEL,
    CrossSiteRecord,
    asked_sites,
    error_answer_reason,
    evaluation_cell,
    summary_line,
)

HE_NO_LOCAL_MODELS = (
    "HE is on: a local model's head is encrypted and only the federation's aggregate is ever decrypted; the "
    "server does not ask for local models"
)


@dataclass(frozen=True)
class CrossSiteRequest:
    """What the training workflow hands to the cross-site workflow.

    model: the model every hospital scores (the global model). record(cells, score_name): puts the table into the
    run's record (RunRecorder.cross_site). sites: the hospitals to ask (those that answered the last round), None =
    every connected one. quarantined: site -> why it neither lends nor scores. lend_local_models: also ask each
    hospital for its local model. watch: the sites NVFlare dropped. signer: the server's signing keys, or None."""

    model: FLModel
    record: object
    sites: Optional[list] = None
    quarantined: dict = field(default_factory=dict)
    lend_local_models: bool = True
    watch: SiteWatch = field(default_factory=SiteWatch)
    signer: object = None


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


class FedMedCrossSiteEval(ModelController):
    def __init__(self, job: dict):
        """job: the job's settings (fedmed.job.jobconfig.JobConfig.to_dict()): task, norm, he_layers, cross_site_timeout."""
        super().__init__(persistor_id="", ignore_result_error=None)
        self.job = job  # same name as the argument: FedJob serialises attributes by name
        self.config = JobConfig.from_dict(job)
        self._task = get_task(self.config.task)
        self._signer = None
        self._answer_errors = None  # {site: return code} while a cross-site step waits for its answers

    def run(self) -> None:
        request = self.fl_ctx.get_prop(C.CTX_CROSS_SITE)
        if not isinstance(request, CrossSiteRequest):
            return  # training did not finish, or the job turned cross-site evaluation off
        self._signer = request.signer
        self.evaluate(request)

    def evaluate(self, request: CrossSiteRequest) -> list:
        """Every connected hospital (of request.sites: a site that died since is not waited for) scores the model and
        every local model a hospital lends on its own validation data; each answer is checked (fedmed.server.crosssite) and
        the table recorded in the run. A quarantined hospital is neither asked to lend nor to score: its cells say
        why. Never fails the run: a problem is logged and recorded as the cell's reason."""
        lend, quarantined = request.lend_local_models, request.quarantined
        targets, not_asked = asked_sites(
            self.sample_clients(), request.watch.gone(), request.watch.job_sites, request.sites, quarantined
        )
        cells: list = [CrossSiteRecord(GLOBAL_MODEL, s, "missing", why) for s, why in not_asked.items()]
        if lend:  # a hospital not asked lends nothing
            cells += [CrossSiteRecord(s, s, "not_shared", why) for s, why in not_asked.items()]
        for s in sorted(set(quarantined) & set(not_asked)):
            self.warning(f"cross-site evaluation: {s} is not asked to lend or to score: {not_asked[s]}")
        if not targets:
            self.warning("cross-site evaluation skipped: no hospital to ask")
            if cells:
                request.record(cells, self._task.score_name)
            return cells
        self.info(f"cross-site evaluation: {targets} score the global model on their validation data")
        models = [(GLOBAL_MODEL, request.model)]
        try:
            if lend and self.config.he_layers:
                cells += [CrossSiteRecord(s, s, "not_shared", HE_NO_LOCAL_MODELS) for s in targets]
            elif lend:
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
            request.record(cells, self._task.score_name)
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
        share_local_model and privacy, fedmed.server.crosssite.local_model_refusal); the server checks what comes back
        before relaying it to anyone."""
        results, errors = self._broadcast_advisory(
            task_name=AppConstants.TASK_SUBMIT_MODEL,
            data=FLModel(params={}, meta={AppConstants.SUBMIT_MODEL_NAME: "last_local_model"}),
            targets=targets,
            min_responses=1,
            timeout=self.config.cross_site_timeout,
            wait_time_after_min_received=self.config.cross_site_timeout,
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
            load_numpy_state(build_densenet121(self._task.num_outputs, norm=self.config.norm), params)
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
            timeout=self.config.cross_site_timeout,
            wait_time_after_min_received=self.config.cross_site_timeout,
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
        return f"no answer within {self.config.cross_site_timeout}s"
