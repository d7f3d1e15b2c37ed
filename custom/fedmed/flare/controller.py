"""NVFlare server workflow: rounds of train -> screen -> aggregate -> evaluate -> persist -> record.

Thin adapter over fedmed.aggregation (the math), fedmed.training (evaluation) and fedmed.store (the record).
"""

from __future__ import annotations

import hashlib
import math
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Optional

from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.workflows.model_controller import ModelController
from nvflare.security.logging import secure_format_exception

from fedmed import constants as C
from fedmed.aggregation import aggregate_and_score, find_update_problem, get_aggregator, update_norm
from fedmed.crypto import ckks
from fedmed.data.loading import load_test
from fedmed.flare.persistor import FedMedModelPersistor, params_sha256
from fedmed.model import build_densenet121, load_numpy_state
from fedmed.robust.trust import SiteTrust, TrustPolicy, update_trust
from fedmed.store.journal import JOURNAL_NAME, Journal, ResilientRecorder
from fedmed.store.models import utcnow
from fedmed.store.repository import AlertRecord, Repository, RoundRecord, UpdateRecord, resolve_db_url
from fedmed.tasks import DEFAULT_TASK, get_task
from fedmed.training import evaluate


class FedMedController(ModelController):
    def __init__(
        self,
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
        task: str = DEFAULT_TASK,
        he_layers: Optional[list] = None,
        he_context_file: Optional[str] = None,
        final_model_timeout: int = 120,
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
            trust_smoothing / trust_ok_ratio / trust_bad_ratio / quarantine_below / readmit_after: the trust rule
                (fedmed.robust.trust.TrustPolicy). Each round a site scores 1 at or below ok_ratio x the median
                site distance to the aggregate and 0 at or above bad_ratio; trust is a moving average of scores;
                below quarantine_below the site is excluded from aggregation (still trained and scored) until
                readmit_after consecutive good rounds.
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
        get_aggregator(aggregation)  # raises naming the valid choices
        self._task = get_task(task)  # raises naming the valid tasks
        if num_outputs is not None and num_outputs != self._task.num_outputs:
            raise ValueError(f"num_outputs {num_outputs} does not match task {task!r} ({self._task.num_outputs} classes)")
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
        if he_layers is not None and (isinstance(he_layers, str) or not all(isinstance(x, str) for x in he_layers)):
            raise ValueError(f"he_layers must be a list of parameter names or prefixes, got {he_layers!r}")
        if final_model_timeout < 0:
            raise ValueError(f"final_model_timeout must be >= 0, got {final_model_timeout}")
        self.he_layers = list(he_layers) if he_layers else None
        self.he_context_file = he_context_file
        self.final_model_timeout = final_model_timeout
        self._he: Optional[ckks.LoadedContext] = None
        self._he_names: tuple = ()
        self._he_shapes: dict = {}
        self._policy = TrustPolicy(smoothing=trust_smoothing, ok_ratio=trust_ok_ratio, bad_ratio=trust_bad_ratio,
                                   quarantine_below=quarantine_below, readmit_after=readmit_after)
        self._trust: dict[str, SiteTrust] = {}

    # ------------------------------------------------------------------------------------------------------------

    def run(self):
        job_id = self.fl_ctx.get_job_id()
        workspace_root = Path(self.engine.get_workspace().get_root_dir())
        url = resolve_db_url(workspace_root, self.db_url)
        # The journal lives at the workspace root so a later job replays what an earlier one could not write.
        db = ResilientRecorder(lambda: Repository(url), Journal(workspace_root / JOURNAL_NAME), self.logger)
        if db.journal.pending():
            self.info(f"replaying {len(db.journal.pending())} journaled database write(s) from an earlier job")
        run_uid = uuid.uuid4().hex
        config = {k: getattr(self, k) for k in ("num_rounds", "min_clients", "round_timeout", "aggregation", "image_size",
                                             "norm", "task", "he_layers")}
        db.write("start_run", uid=run_uid, name=self.run_name, job_id=job_id, aggregation=self.aggregation,
                 num_rounds=self.num_rounds, config=config)
        safe_url = url.split("@")[-1] if "@" in url else url  # never log a password
        self.info(f"run {run_uid} ({self.run_name}, job {job_id}): {self.num_rounds} rounds, aggregation "
                  f"{self.aggregation}, min_clients {self.min_clients}; database {safe_url}")
        test_ds = None
        if self.test_dicom_root:
            test_ds = load_test(Path(self.test_dicom_root), Path(self.test_labels_csv), self.image_size, self._task)
            self.info(f"global test set: {len(test_ds)} images")
        else:
            self.warning(f"no global test set configured; rounds are scored by the sites' validation {self._task.score_name}")
        eval_model = build_densenet121(self.num_outputs, norm=self.norm)
        aggregate = get_aggregator(self.aggregation)

        model = self.load_model()
        best_round, best_score, status = None, -math.inf, "finished"
        last_round_sites: list = []
        try:
            if self.he_layers:  # inside the try: a refused context ends the run recorded as failed, with the reason
                test_ds = self._setup_he(eval_model, test_ds)
            for round_num in range(self.num_rounds):
                if self.abort_signal.triggered:
                    status = "aborted"
                    break
                started = utcnow()
                t0 = time.monotonic()
                targets = self.sample_clients()
                if len(targets) < self.min_clients:
                    raise RuntimeError(f"round {round_num}: {len(targets)} site(s) connected, min_clients is {self.min_clients}")
                model.current_round, model.total_rounds, model.start_round = round_num, self.num_rounds, 0
                self.info(f"round {round_num + 1}/{self.num_rounds}: sending the global model to {targets}")
                # ModelController.send_model_and_wait ends the round at min_responses; we want every site that
                # answers within straggler_wait, so call the base broadcast with its grace period.
                results = self.broadcast_model(
                    task_name=self.train_task_name, data=model, targets=targets, min_responses=self.min_clients,
                    timeout=self.round_timeout, wait_time_after_min_received=self.straggler_wait,
                )
                if self.abort_signal.triggered:
                    status = "aborted"
                    break
                last_round_sites = [_site_of(r) for r in results]
                reference = {k: v for k, v in model.params.items() if k not in self._he_names}
                valid, records = self._screen(results, targets, reference)
                active = [r for r in valid if not self._is_quarantined(_site_of(r))]
                if len(active) < self.min_clients:
                    db.write("record_round", run_uid=run_uid,
                             record=RoundRecord(round_num, tuple(records.values()), started_at=started))
                    raise RuntimeError(f"round {round_num}: {len(active)} valid, trusted update(s), min_clients is "
                                       f"{self.min_clients}; not aggregating (the global model is left unchanged)")
                outcome = aggregate_and_score(
                    {_site_of(r): r.params for r in valid}, {_site_of(r): r.meta[C.META_NUM_SAMPLES] for r in valid},
                    aggregate, self._policy, [_site_of(r) for r in active], self.min_clients,
                )
                agg = outcome.result
                alerts = self._score_trust(outcome, records)
                # image_size and norm travel with the weights: inference preprocesses and rebuilds the same way.
                new_params = agg.params
                new_meta = {"round": round_num, "image_size": self.image_size, "norm": self.norm, "task": self.task}
                if self._he is not None:
                    new_meta[C.META_ENCRYPTED] = self._combine_encrypted(round_num, valid, outcome.weights).to_wire()
                if "fallback" in agg.diagnostics:
                    self.info(f"round {round_num}: {self.aggregation} used {agg.diagnostics['fallback']}")
                if not agg.diagnostics.get("converged", True):
                    self.warning(f"round {round_num}: geometric median did not converge "
                                 f"in {agg.diagnostics.get('iterations')} iterations; using the last iterate")
                score, mean_auroc, test_loss, test_metrics = self._score(eval_model, new_params, test_ds, active)
                model = FLModel(params_type=ParamsType.FULL, params=new_params, meta=new_meta)
                self.save_model(model)
                sha = _model_sha256(new_params, new_meta.get(C.META_ENCRYPTED))
                if score > best_score:
                    best_round, best_score = round_num, score
                    self._save_best(new_params, {**new_meta, "score": score, "sha256": sha})
                db.write("record_round", run_uid=run_uid, record=RoundRecord(
                    round_num, tuple(records.values()), test_loss, mean_auroc, test_metrics, sha, started, tuple(alerts)))
                self.info(
                    f"round {round_num + 1}/{self.num_rounds} done in {time.monotonic() - t0:.0f}s: "
                    f"{len(active)}/{len(targets)} sites aggregated ({self.aggregation}"
                    + (f", {agg.diagnostics['iterations']} Weiszfeld iterations" if "iterations" in agg.diagnostics else "")
                    + f"), {'test' if test_ds else 'val'} {self._task.score_name} {score:.4f}"
                    + (f", test loss {test_loss:.4f}" if test_loss is not None else "")
                    + f"; best {best_score:.4f} (round {best_round + 1})"
                )
        except Exception as e:
            status = "failed"
            self.error(f"run {run_uid} failed: {secure_format_exception(e)}")
            raise
        finally:
            db.write("finish_run", run_uid=run_uid, status=status, best_round=best_round,
                     best_metric=best_score if best_round is not None else None)
            if not db.flush():  # final flush; what is left stays journaled for the next job start
                self.error(f"database still unavailable at job end; {len(db.journal.pending())} write(s) remain in "
                           f"{db.journal.path}")
            db.close()
        if status == "finished":
            self._send_final_model(model, last_round_sites)
        self.info(f"run {run_uid} {status}; best {self._task.score_name} {best_score:.4f} at round {best_round + 1 if best_round is not None else '-'}")

    # ------------------------------------------------------------------------------------------------------------

    def _setup_he(self, eval_model, test_ds):
        """Load the server's secret-free context and the encrypted layers' names/shapes; returns the test set to
        use (none: the server cannot evaluate a model whose head it cannot read)."""
        path = Path(self.he_context_file) if self.he_context_file else \
            Path(self.engine.get_workspace().get_file_path_in_startup(ckks.SERVER_CONTEXT_FILE))
        self._he = ckks.load_server_context(path)  # raises if the context holds a secret key
        state = eval_model.state_dict()
        self._he_names = ckks.resolve_encrypted_names(list(state), self.he_layers)
        self._he_shapes = {n: tuple(state[n].shape) for n in self._he_names}
        self.info(f"HE on: {list(self._he_names)} arrive CKKS-encrypted and are aggregated without decryption "
                  f"(server context {path}, no secret key, key set {self._he.key_id[:12]})")
        if test_ds is not None:
            self.warning("HE on: the server cannot evaluate the global model (its encrypted layers are unreadable "
                         "here); rounds are scored by the sites' validation "
                         f"{self._task.score_name} instead of the global test set")
        return None

    def _combine_encrypted(self, round_num: int, valid: list, weights: dict) -> ckks.EncryptedLayers:
        """The encrypted layers combined with the same per-site weights the robust aggregation gave the clear part."""
        t0 = time.monotonic()
        blocks, w = [], []
        for r in valid:
            site = _site_of(r)
            if weights.get(site, 0.0) > 0.0:
                blocks.append(ckks.EncryptedLayers.from_wire(r.meta[C.META_ENCRYPTED]))
                w.append(weights[site])
        combined = ckks.weighted_sum(blocks, w, self._he)
        self.info(f"round {round_num}: combined {len(blocks)} encrypted update(s) homomorphically "
                  f"({combined.nbytes / 1e6:.2f} MB, {time.monotonic() - t0:.2f}s)")
        return combined

    def _send_final_model(self, model: FLModel, sites: list) -> None:
        """Each site keeps the final global model as its own usable copy (decrypted there when HE is on)."""
        connected = set(self.sample_clients())
        targets = [s for s in sites if s in connected]
        if not targets:
            self.warning("no site from the last round is connected: the final global model stays on the server")
            return
        try:
            # min_responses=1: a site that cannot take the model (e.g. other keys) must not fail a finished run.
            results = self.broadcast_model(task_name=C.TASK_FINAL_MODEL, data=model, targets=targets, min_responses=1,
                                           timeout=self.final_model_timeout,
                                           wait_time_after_min_received=self.final_model_timeout)
        except Exception as e:
            self.error(f"sending the final global model to the sites failed: {secure_format_exception(e)}")
            return
        kept = sorted(_site_of(r) for r in results if (r.metrics or {}).get("saved"))
        missing = sorted(set(targets) - set(kept))
        self.info(f"final global model kept by {kept}" + (f"; not acknowledged by {missing}" if missing else ""))

    def _find_encrypted_problem(self, result: FLModel) -> Optional[str]:
        if self._he is None:
            if C.META_ENCRYPTED in result.meta:
                return "update carries encrypted layers but this job has no he_layers"
            return None
        block = result.meta.get(C.META_ENCRYPTED)
        if block is None:
            return f"no encrypted layers: this job requires {list(self._he_names)} to arrive CKKS-encrypted"
        return ckks.find_encrypted_problem(block, self._he_names, self._he_shapes, self._he)

    def _screen(self, results: list, targets: list, global_params: dict):
        """Split results into valid updates and per-site DB records (accepted / rejected with reason / missing)."""
        valid, records = [], {}
        for r in results:
            site = _site_of(r)
            n = r.meta.get(C.META_NUM_SAMPLES)
            metrics = dict(r.metrics or {})
            privacy = dict(epsilon=_finite_or_none(r.meta.get(C.META_EPSILON)),
                           delta=_finite_or_none(r.meta.get(C.META_DELTA)),
                           epsilon_budget=_finite_or_none(r.meta.get(C.META_EPSILON_BUDGET)),
                           noise_multiplier=_finite_or_none(r.meta.get(C.META_NOISE_MULTIPLIER)))
            if r.meta.get(C.META_REFUSED):
                # The site declined this round itself (e.g. its privacy budget): record why, carry on without it.
                self.warning(f"{site} refused the round: {r.meta[C.META_REFUSED]}")
                records[site] = UpdateRecord(site=site, status="refused", reason=str(r.meta[C.META_REFUSED]),
                                             **{k: v for k, v in privacy.items() if k != "noise_multiplier"})
                continue
            reason = None
            if not isinstance(n, int) or n < 1:
                reason = f"num_samples must be a positive integer, got {n!r}"
            elif r.params is None:
                reason = "no parameters"
            else:
                reason = find_update_problem(r.params, global_params) or self._find_encrypted_problem(r)
            common = dict(site=site, num_samples=n if isinstance(n, int) else 0,
                          train_loss=metrics.get(C.META_TRAIN_LOSS), val_loss=metrics.get(C.META_VAL_LOSS),
                          val_mean_auroc=_finite_or_none(metrics.get(C.META_VAL_MEAN_AUROC)),
                          metrics={k: v for k, v in metrics.items() if _finite_or_none(v) is not None})
            if reason:
                self.warning(f"update from {site} rejected: {reason}")
                records[site] = UpdateRecord(status="rejected", reason=reason, **common)
                continue
            valid.append(r)
            records[site] = UpdateRecord(status="accepted", update_norm=update_norm(r.params, global_params),
                                         update_sha256=_model_sha256(r.params, r.meta.get(C.META_ENCRYPTED)),
                                         **privacy, **common)
        for site in targets:
            if site not in records:
                self.warning(f"no result from {site} this round")
                records[site] = UpdateRecord(site=site, status="missing", reason="no result before the round closed")
        return valid, records

    def _is_quarantined(self, site: str) -> bool:
        state = self._trust.get(site)
        return state is not None and state.quarantined

    def _score_trust(self, outcome, records: dict) -> list:
        """Fold the round's scores (rejected updates score 0) into trust; updates records in place with distance,
        score, trust, weight and the final decision; returns the alerts."""
        dist, scored, weight_of = outcome.distances, outcome.scored, outcome.weights
        for site in outcome.excluded:
            self.warning(f"{site} left out of this round's aggregate: {scored[site][0]:.1f}x the median distance")
        scores = {site: sc for site, (_, sc) in scored.items()}
        scores.update({site: 0.0 for site, u in records.items() if u.status == "rejected"})
        was_quarantined = {site for site in scores if self._is_quarantined(site)}
        self._trust, events = update_trust(self._trust, scores, self._policy)
        for site, kind, msg in events:
            self.warning(msg)
        for site, u in list(records.items()):
            if site not in scores:
                continue
            status = "quarantined" if site in was_quarantined and u.status == "accepted" else u.status
            reason = u.reason
            if status == "quarantined":
                reason = f"quarantined (trust {self._trust[site].trust:.3f}); scored, not aggregated"
            elif site in outcome.excluded:
                status = "rejected"
                reason = f"far outlier this round: {scored[site][0]:.1f}x the median distance to the aggregate"
            records[site] = replace(
                u, status=status, reason=reason, distance=dist.get(site), round_score=scores[site],
                trust=self._trust[site].trust, aggregation_weight=weight_of.get(site, 0.0),
            )
            ratio = scored.get(site, (float("nan"),))[0]
            self.info(f"site {site}: distance {dist.get(site, float('nan')):.4g} (x{ratio:.2f} median), "
                      f"score {scores[site]:.2f}, trust {self._trust[site].trust:.3f}, {status}")
        alerts = [AlertRecord(site, u.status, u.reason) for site, u in records.items()
                  if u.status in ("rejected", "refused")]
        return alerts + [AlertRecord(site, kind, msg) for site, kind, msg in events]

    def _score(self, eval_model, params, test_ds, accepted):
        """(round score, mean AUROC, test loss, metrics for the DB): on the global test set, else the sample-weighted
        mean of the sites' validation scores."""
        if test_ds is not None:
            load_numpy_state(eval_model, params)
            ev = evaluate(eval_model, test_ds, self._task)
            return ev.score, _finite_or_none(ev.mean_auroc), ev.loss, {**ev.metrics, "loss": ev.loss}

        def weighted_val(name):
            pairs = [((r.metrics or {}).get(C.META_VAL_PREFIX + name), r.meta[C.META_NUM_SAMPLES]) for r in accepted]
            pairs = [(v, n) for v, n in pairs if _finite_or_none(v) is not None]
            return sum(v * n for v, n in pairs) / sum(n for _, n in pairs) if pairs else float("nan")

        return weighted_val(self._task.score_name), _finite_or_none(weighted_val("mean_auroc")), None, {}

    def _save_best(self, params, meta):
        if isinstance(self.persistor, FedMedModelPersistor):
            path = self.persistor.save_best(params, meta, self.fl_ctx)
            self.info(f"new best model (round {meta['round'] + 1}, {self._task.score_name} {meta['score']:.4f}) saved to {path}")


def _finite_or_none(v):
    try:
        return float(v) if v is not None and math.isfinite(float(v)) else None
    except (TypeError, ValueError):
        return None


def _model_sha256(params: dict, encrypted_block=None) -> str:
    """Hash of the clear parameters, extended with the ciphertexts when some layers are encrypted."""
    sha = params_sha256(params)
    if encrypted_block is None:
        return sha
    enc_sha = ckks.encrypted_sha256(ckks.EncryptedLayers.from_wire(encrypted_block))
    return hashlib.sha256(f"{sha}:{enc_sha}".encode()).hexdigest()


def _site_of(result: FLModel) -> str:
    return result.meta.get("client_name", "?")
