"""The only door to the database. Callers pass plain dataclasses; SQL stays in this package.

URL from FEDMED_DB_URL; the embedded default is a SQLite file. PostgreSQL works through psycopg2 with the same code.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from sqlalchemy import create_engine, delete, event, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from fedmed.constants import ENV_DB_URL
from fedmed.store.migrate import upgrade
from fedmed.store.models import (Alert, AuditEntry, ClientUpdate, InferenceLog, PrivacySpend, Round, RoundMetric, Run, Site,
                                 SiteTrustState, utcnow)

UPDATE_STATUSES = ("accepted", "rejected", "quarantined", "refused", "missing")
ALERT_KINDS = ("quarantined", "readmitted", "rejected", "refused")


@dataclass(frozen=True)
class UpdateRecord:
    site: str
    status: str  # one of UPDATE_STATUSES
    num_samples: int = 0  # as the site claimed it
    reason: Optional[str] = None
    weight_samples: Optional[float] = None  # the count after the cap (fedmed.aggregation.capped_counts)
    update_norm: Optional[float] = None
    update_sha256: Optional[str] = None
    aggregation_weight: Optional[float] = None
    distance: Optional[float] = None
    round_score: Optional[float] = None
    trust: Optional[float] = None
    epsilon: Optional[float] = None  # cumulative privacy spend the site reports (DP-SGD), with delta
    delta: Optional[float] = None
    epsilon_budget: Optional[float] = None
    noise_multiplier: Optional[float] = None
    train_loss: Optional[float] = None
    val_loss: Optional[float] = None
    val_mean_auroc: Optional[float] = None
    metrics: dict = field(default_factory=dict)  # metric name -> value, stored under scope = site

    def __post_init__(self):
        if self.status not in UPDATE_STATUSES:
            raise ValueError(f"status must be one of {UPDATE_STATUSES}, got {self.status!r}")


@dataclass(frozen=True)
class AlertRecord:
    site: str
    kind: str  # one of ALERT_KINDS
    message: str

    def __post_init__(self):
        if self.kind not in ALERT_KINDS:
            raise ValueError(f"alert kind must be one of {ALERT_KINDS}, got {self.kind!r}")


@dataclass(frozen=True)
class RoundRecord:
    round_num: int
    updates: tuple  # of UpdateRecord
    test_loss: Optional[float] = None
    test_mean_auroc: Optional[float] = None
    test_metrics: dict = field(default_factory=dict)  # metric name -> value, scope 'global_test'
    global_model_sha256: Optional[str] = None
    started_at: Optional[dt.datetime] = None
    alerts: tuple = ()  # of AlertRecord
    trust: tuple = ()  # of TrustRecord: each scored site's state after this round, kept across jobs


@dataclass(frozen=True)
class TrustRecord:
    site: str
    trust: float
    quarantined: bool
    good_streak: int


@dataclass(frozen=True)
class RoundRow:
    """One line of the per-round table the FL admin reads."""

    round_num: int
    sites_accepted: tuple
    sites_other: tuple  # (site, status) pairs for rejected or missing contributions
    test_mean_auroc: Optional[float]
    test_loss: Optional[float]


INFERENCE_STATUSES = ("ok", "skipped")


@dataclass(frozen=True)
class InferenceRecord:
    """One study read by scripts/infer. Identifiers must already be pseudonyms (keyed hashes), never in clear."""

    study_pseudonym: str
    patient_pseudonym: str
    model_sha256: str
    model_version: str
    num_images: int
    positive_findings: tuple  # finding names
    status: str  # one of INFERENCE_STATUSES
    message: Optional[str] = None

    def __post_init__(self):
        if self.status not in INFERENCE_STATUSES:
            raise ValueError(f"inference status must be one of {INFERENCE_STATUSES}, got {self.status!r}")


GENESIS_HASH = "0" * 64


def audit_hash(prev_hash: str, created_at: str, action: str, payload_json: str) -> str:
    content = json.dumps([prev_hash, created_at, action, payload_json], separators=(",", ":"))
    return hashlib.sha256(content.encode()).hexdigest()


@dataclass(frozen=True)
class AuditProblem:
    row_id: int
    reason: str


def default_db_url(workspace: Path) -> str:
    return f"sqlite:///{Path(workspace).resolve() / 'fedmed.db'}"


def resolve_db_url(workspace: Optional[Path] = None, explicit: Optional[str] = None) -> str:
    """explicit argument > FEDMED_DB_URL > SQLite file in the workspace."""
    url = explicit or os.environ.get(ENV_DB_URL)
    if url:
        return url
    if workspace is None:
        raise ValueError(f"no database URL: set {ENV_DB_URL} or give a workspace for the SQLite default")
    return default_db_url(workspace)


def _sqlite_pragmas(dbapi_conn, _record):
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA journal_mode=WAL")  # readers (report, demo table) don't block the server's writes
    cur.close()


class Repository:
    def __init__(self, url: str, create_schema: bool = True):
        if "://" not in url:
            raise ValueError(f"database URL must look like dialect://..., got {url!r}")
        kwargs = {"pool_pre_ping": True}
        self.engine: Engine = create_engine(url, **kwargs)
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._session = sessionmaker(self.engine, expire_on_commit=False)
        if create_schema:
            upgrade(self.engine)  # Alembic: the same revisions on SQLite and PostgreSQL

    def close(self) -> None:
        self.engine.dispose()

    # --- writes -------------------------------------------------------------------------------------------------

    def start_run(self, uid: str, name: str, job_id: str, aggregation: str, num_rounds: int, config: dict) -> int:
        """Create the run row for uid, or return the existing one (a replayed start is a no-op)."""
        if not uid:
            raise ValueError("run uid must be a non-empty string")
        with self._session.begin() as s:
            run = s.scalar(select(Run).where(Run.uid == uid))
            if run is None:
                run = Run(uid=uid, name=name, job_id=job_id, aggregation=aggregation, num_rounds=num_rounds,
                          config_json=json.dumps(config, sort_keys=True, default=str))
                s.add(run)
                s.flush()
                self._audit(s, "start_run", {"run": uid, "job_id": job_id, "aggregation": aggregation,
                                             "num_rounds": num_rounds})
            return run.id

    def _run_id(self, s: Session, uid: str) -> int:
        run_id = s.scalar(select(Run.id).where(Run.uid == uid))
        if run_id is None:
            raise ValueError(f"no run with uid {uid!r}; start_run first")
        return run_id

    def record_round(self, run_uid: str, record: RoundRecord) -> None:
        """Write a round, its updates, metrics and alerts in one transaction. Idempotent: re-recording replaces it."""
        with self._session.begin() as s:
            run_id = self._run_id(s, run_uid)
            replaced = s.scalar(select(Round.id).where(Round.run_id == run_id, Round.round_num == record.round_num))
            for model in (Round, ClientUpdate, RoundMetric, Alert, PrivacySpend):
                s.execute(delete(model).where(model.run_id == run_id, model.round_num == record.round_num))
            self._audit(s, "record_round", {
                "run": run_uid, "round": record.round_num, "replaced": replaced is not None,
                "global_model_sha256": record.global_model_sha256,
                "updates": [[u.site, u.status, u.num_samples, u.update_sha256, u.trust] for u in record.updates],
            })
            accepted = sum(1 for u in record.updates if u.status == "accepted")
            s.add(Round(run_id=run_id, round_num=record.round_num, num_sites=accepted, test_loss=record.test_loss,
                        test_mean_auroc=record.test_mean_auroc, global_model_sha256=record.global_model_sha256,
                        started_at=record.started_at, finished_at=utcnow()))
            for u in record.updates:
                site = self._site(s, u.site)
                s.add(ClientUpdate(run_id=run_id, round_num=record.round_num, site_id=site.id, status=u.status,
                                   reason=u.reason, num_samples=u.num_samples, weight_samples=u.weight_samples,
                                   update_norm=u.update_norm,
                                   update_sha256=u.update_sha256, aggregation_weight=u.aggregation_weight,
                                   distance=u.distance, round_score=u.round_score, trust=u.trust, train_loss=u.train_loss,
                                   val_loss=u.val_loss, val_mean_auroc=u.val_mean_auroc))
                for metric, value in u.metrics.items():
                    s.add(RoundMetric(run_id=run_id, round_num=record.round_num, scope=u.site, metric=metric, value=float(value)))
                if u.epsilon is not None:
                    s.add(PrivacySpend(run_id=run_id, round_num=record.round_num, site_id=site.id, epsilon=u.epsilon,
                                       delta=u.delta if u.delta is not None else 0.0, epsilon_budget=u.epsilon_budget,
                                       noise_multiplier=u.noise_multiplier, accountant="rdp"))
            for a in record.alerts:
                s.add(Alert(run_id=run_id, round_num=record.round_num, site_id=self._site(s, a.site).id, kind=a.kind,
                            message=a.message))
            for metric, value in record.test_metrics.items():
                s.add(RoundMetric(run_id=run_id, round_num=record.round_num, scope="global_test", metric=metric, value=float(value)))
            for t in record.trust:
                site_id = self._site(s, t.site).id
                row = s.get(SiteTrustState, site_id) or SiteTrustState(site_id=site_id)
                row.trust, row.quarantined, row.good_streak = float(t.trust), bool(t.quarantined), int(t.good_streak)
                row.run_id, row.round_num, row.updated_at = run_id, record.round_num, utcnow()
                s.add(row)

    def load_trust(self) -> dict[str, TrustRecord]:
        """Every site's trust state as the latest recorded round left it, whichever job that was."""
        with self._session() as s:
            rows = s.execute(select(Site.name, SiteTrustState).join(SiteTrustState, SiteTrustState.site_id == Site.id)).all()
            return {name: TrustRecord(name, t.trust, t.quarantined, t.good_streak) for name, t in rows}

    def finish_run(self, run_uid: str, status: str, best_round: Optional[int], best_metric: Optional[float]) -> None:
        with self._session.begin() as s:
            run = s.get(Run, self._run_id(s, run_uid))
            run.status, run.finished_at, run.best_round, run.best_metric = status, utcnow(), best_round, best_metric
            self._audit(s, "finish_run", {"run": run_uid, "status": status, "best_round": best_round})

    def record_inference(self, record: InferenceRecord) -> None:
        """Append one inference log row (and its audit row, in the same transaction)."""
        with self._session.begin() as s:
            s.add(InferenceLog(study_pseudonym=record.study_pseudonym, patient_pseudonym=record.patient_pseudonym,
                               model_sha256=record.model_sha256, model_version=record.model_version,
                               num_images=record.num_images, positive_findings="|".join(record.positive_findings),
                               status=record.status, message=record.message))
            self._audit(s, "inference", {"study": record.study_pseudonym, "model_sha256": record.model_sha256,
                                         "status": record.status})

    def mark_interrupted(self, job_ids, reason: str) -> list[str]:
        """Runs of these NVFlare jobs still marked 'running' (their server process died mid-job) become
        'interrupted'; their recorded rounds stay, the best is taken from them. Returns the run uids changed."""
        changed = []
        with self._session.begin() as s:
            runs = s.scalars(select(Run).where(Run.job_id.in_(list(job_ids)), Run.status == "running")).all()
            for run in runs:
                best = s.execute(select(Round.round_num, Round.test_mean_auroc)
                                 .where(Round.run_id == run.id, Round.test_mean_auroc.is_not(None))
                                 .order_by(Round.test_mean_auroc.desc(), Round.round_num).limit(1)).first()
                run.status, run.finished_at = "interrupted", utcnow()
                run.best_round, run.best_metric = (best[0], best[1]) if best else (None, None)
                self._audit(s, "finish_run", {"run": run.uid, "status": "interrupted", "best_round": run.best_round,
                                              "reason": reason})
                changed.append(run.uid)
        return changed

    def _audit(self, s: Session, action: str, payload: dict) -> None:
        """Append one chained audit row inside the caller's transaction (so it exists iff the write does)."""
        if self.engine.dialect.name == "postgresql":
            # Serialise appenders so two servers writing at once cannot fork the chain.
            s.execute(text("LOCK TABLE audit_log IN SHARE ROW EXCLUSIVE MODE"))
        prev = s.scalar(select(AuditEntry.row_hash).order_by(AuditEntry.id.desc()).limit(1)) or GENESIS_HASH
        created = utcnow().isoformat()
        body = json.dumps(payload, sort_keys=True, default=str, separators=(",", ":"))
        s.add(AuditEntry(created_at=created, action=action, payload_json=body, prev_hash=prev,
                         row_hash=audit_hash(prev, created, action, body)))

    def verify_audit(self) -> Optional[AuditProblem]:
        """Walk the chain in id order; the first row whose link or content hash is wrong, or None if intact."""
        prev = GENESIS_HASH
        with self._session() as s:
            for row in s.scalars(select(AuditEntry).order_by(AuditEntry.id)).yield_per(1000):
                if row.prev_hash != prev:
                    return AuditProblem(row.id, "prev_hash does not match the previous row (a row was removed or reordered)")
                if audit_hash(row.prev_hash, row.created_at, row.action, row.payload_json) != row.row_hash:
                    return AuditProblem(row.id, "content does not match its hash (the row was edited)")
                prev = row.row_hash
        return None

    def audit_rows(self) -> int:
        with self._session() as s:
            return len(s.scalars(select(AuditEntry.id)).all())

    @staticmethod
    def _site(s: Session, name: str) -> Site:
        site = s.scalar(select(Site).where(Site.name == name))
        if site is None:
            site = Site(name=name)
            s.add(site)
            s.flush()
        return site

    # --- reads --------------------------------------------------------------------------------------------------

    def run_id_or_latest(self, run_id: Optional[int]) -> int:
        """The given run id, or the latest run's; raises naming the database when there is none."""
        rid = run_id or self.latest_run_id()
        if rid is None:
            raise ValueError(f"no runs recorded in {self.engine.url.render_as_string(hide_password=True)}")
        return rid

    def latest_run_id(self) -> Optional[int]:
        with self._session() as s:
            return s.scalar(select(Run.id).order_by(Run.id.desc()).limit(1))

    def run_id_for_job(self, job_id: str) -> Optional[int]:
        """The latest run recorded for an NVFlare job id, or None."""
        with self._session() as s:
            return s.scalar(select(Run.id).where(Run.job_id == job_id).order_by(Run.id.desc()).limit(1))

    def get_run(self, run_id: int) -> Run:
        with self._session() as s:
            run = s.get(Run, run_id)
            if run is None:
                raise ValueError(f"no run with id {run_id}")
            return run

    def rounds_table(self, run_id: int) -> list[RoundRow]:
        with self._session() as s:
            rounds = s.scalars(select(Round).where(Round.run_id == run_id).order_by(Round.round_num)).all()
            updates = s.execute(
                select(ClientUpdate.round_num, Site.name, ClientUpdate.status)
                .join(Site, Site.id == ClientUpdate.site_id)
                .where(ClientUpdate.run_id == run_id)
                .order_by(Site.name)
            ).all()
        rows = []
        for r in rounds:
            mine = [(site, status) for rn, site, status in updates if rn == r.round_num]
            rows.append(RoundRow(r.round_num, tuple(site for site, st in mine if st == "accepted"),
                                 tuple((site, st) for site, st in mine if st != "accepted"), r.test_mean_auroc, r.test_loss))
        return rows

    def client_updates(self, run_id: int) -> list[dict]:
        with self._session() as s:
            rows = s.execute(
                select(ClientUpdate, Site.name).join(Site, Site.id == ClientUpdate.site_id)
                .where(ClientUpdate.run_id == run_id).order_by(ClientUpdate.round_num, Site.name)
            ).all()
        return [{"round": u.round_num, "site": name, "status": u.status, "reason": u.reason, "num_samples": u.num_samples,
                 "weight_samples": u.weight_samples, "update_norm": u.update_norm, "aggregation_weight": u.aggregation_weight, "val_mean_auroc": u.val_mean_auroc,
                 "distance": u.distance, "round_score": u.round_score, "trust": u.trust,
                 "update_sha256": u.update_sha256}
                for u, name in rows]

    def round_metrics(self, run_id: int, scope: str) -> dict[int, dict[str, float]]:
        with self._session() as s:
            rows = s.execute(select(RoundMetric.round_num, RoundMetric.metric, RoundMetric.value)
                             .where(RoundMetric.run_id == run_id, RoundMetric.scope == scope)).all()
        out: dict[int, dict[str, float]] = {}
        for rn, metric, value in rows:
            out.setdefault(rn, {})[metric] = value
        return out

    def privacy_spend(self, run_id: int) -> list[dict]:
        with self._session() as s:
            rows = s.execute(select(PrivacySpend, Site.name).join(Site, Site.id == PrivacySpend.site_id)
                             .where(PrivacySpend.run_id == run_id).order_by(PrivacySpend.round_num, Site.name)).all()
        return [{"round": p.round_num, "site": name, "epsilon": p.epsilon, "delta": p.delta,
                 "epsilon_budget": p.epsilon_budget, "noise_multiplier": p.noise_multiplier} for p, name in rows]

    def alerts(self, run_id: int) -> list[dict]:
        with self._session() as s:
            rows = s.execute(select(Alert, Site.name).join(Site, Site.id == Alert.site_id)
                             .where(Alert.run_id == run_id).order_by(Alert.round_num, Site.name)).all()
        return [{"round": a.round_num, "site": name, "kind": a.kind, "message": a.message} for a, name in rows]

    def inference_logs(self) -> list[dict]:
        with self._session() as s:
            rows = s.scalars(select(InferenceLog).order_by(InferenceLog.id)).all()
        return [{"created_at": r.created_at, "study_pseudonym": r.study_pseudonym, "patient_pseudonym": r.patient_pseudonym,
                 "model_sha256": r.model_sha256, "model_version": r.model_version, "num_images": r.num_images,
                 "positive_findings": r.positive_findings, "status": r.status, "message": r.message} for r in rows]
