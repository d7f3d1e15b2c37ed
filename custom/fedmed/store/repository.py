"""The only door to the database. Callers pass plain dataclasses; SQL stays in this package.

URL from FEDMED_DB_URL; the embedded default is a SQLite file. PostgreSQL works through psycopg2 with the same code.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from sqlalchemy import create_engine, delete, event, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from fedmed.constants import ENV_DB_URL
from fedmed.store.models import Alert, Base, ClientUpdate, Round, RoundMetric, Run, Site, utcnow

UPDATE_STATUSES = ("accepted", "rejected", "quarantined", "missing")
ALERT_KINDS = ("quarantined", "readmitted", "rejected")


@dataclass(frozen=True)
class UpdateRecord:
    site: str
    status: str  # one of UPDATE_STATUSES
    num_samples: int = 0
    reason: Optional[str] = None
    update_norm: Optional[float] = None
    update_sha256: Optional[str] = None
    aggregation_weight: Optional[float] = None
    distance: Optional[float] = None
    round_score: Optional[float] = None
    trust: Optional[float] = None
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


@dataclass(frozen=True)
class RoundRow:
    """One line of the per-round table the FL admin reads."""

    round_num: int
    sites_accepted: tuple
    sites_other: tuple  # (site, status) pairs for rejected or missing contributions
    test_mean_auroc: Optional[float]
    test_loss: Optional[float]


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
            Base.metadata.create_all(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    # --- writes -------------------------------------------------------------------------------------------------

    def start_run(self, name: str, job_id: str, aggregation: str, num_rounds: int, config: dict) -> int:
        """Create a run row. Every start is a new run: the simulator gives every job the same id."""
        with self._session.begin() as s:
            run = Run(name=name, job_id=job_id, aggregation=aggregation, num_rounds=num_rounds,
                      config_json=json.dumps(config, sort_keys=True, default=str))
            s.add(run)
            s.flush()
            return run.id

    def record_round(self, run_id: int, record: RoundRecord) -> None:
        """Write a round, its updates and metrics in one transaction. Idempotent: re-recording replaces the round."""
        with self._session.begin() as s:
            for model in (Round, ClientUpdate, RoundMetric, Alert):
                s.execute(delete(model).where(model.run_id == run_id, model.round_num == record.round_num))
            accepted = sum(1 for u in record.updates if u.status == "accepted")
            s.add(Round(run_id=run_id, round_num=record.round_num, num_sites=accepted, test_loss=record.test_loss,
                        test_mean_auroc=record.test_mean_auroc, global_model_sha256=record.global_model_sha256,
                        started_at=record.started_at, finished_at=utcnow()))
            for u in record.updates:
                site = self._site(s, u.site)
                s.add(ClientUpdate(run_id=run_id, round_num=record.round_num, site_id=site.id, status=u.status,
                                   reason=u.reason, num_samples=u.num_samples, update_norm=u.update_norm,
                                   update_sha256=u.update_sha256, aggregation_weight=u.aggregation_weight,
                                   distance=u.distance, round_score=u.round_score, trust=u.trust, train_loss=u.train_loss, val_loss=u.val_loss, val_mean_auroc=u.val_mean_auroc))
                for metric, value in u.metrics.items():
                    s.add(RoundMetric(run_id=run_id, round_num=record.round_num, scope=u.site, metric=metric, value=float(value)))
            for a in record.alerts:
                s.add(Alert(run_id=run_id, round_num=record.round_num, site_id=self._site(s, a.site).id, kind=a.kind,
                            message=a.message))
            for metric, value in record.test_metrics.items():
                s.add(RoundMetric(run_id=run_id, round_num=record.round_num, scope="global_test", metric=metric, value=float(value)))

    def finish_run(self, run_id: int, status: str, best_round: Optional[int], best_metric: Optional[float]) -> None:
        with self._session.begin() as s:
            run = s.get(Run, run_id)
            if run is None:
                raise ValueError(f"no run with id {run_id}")
            run.status, run.finished_at, run.best_round, run.best_metric = status, utcnow(), best_round, best_metric

    @staticmethod
    def _site(s: Session, name: str) -> Site:
        site = s.scalar(select(Site).where(Site.name == name))
        if site is None:
            site = Site(name=name)
            s.add(site)
            s.flush()
        return site

    # --- reads --------------------------------------------------------------------------------------------------

    def latest_run_id(self) -> Optional[int]:
        with self._session() as s:
            return s.scalar(select(Run.id).order_by(Run.id.desc()).limit(1))

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
                 "update_norm": u.update_norm, "aggregation_weight": u.aggregation_weight, "val_mean_auroc": u.val_mean_auroc,
                 "distance": u.distance, "round_score": u.round_score, "trust": u.trust}
                for u, name in rows]

    def round_metrics(self, run_id: int, scope: str) -> dict[int, dict[str, float]]:
        with self._session() as s:
            rows = s.execute(select(RoundMetric.round_num, RoundMetric.metric, RoundMetric.value)
                             .where(RoundMetric.run_id == run_id, RoundMetric.scope == scope)).all()
        out: dict[int, dict[str, float]] = {}
        for rn, metric, value in rows:
            out.setdefault(rn, {})[metric] = value
        return out

    def alerts(self, run_id: int) -> list[dict]:
        with self._session() as s:
            rows = s.execute(select(Alert, Site.name).join(Site, Site.id == Alert.site_id)
                             .where(Alert.run_id == run_id).order_by(Alert.round_num, Site.name)).all()
        return [{"round": a.round_num, "site": name, "kind": a.kind, "message": a.message} for a, name in rows]
