"""The only door to the database. Callers pass plain dataclasses; SQL stays in this package.

URL from FEDMED_DB_URL; the embedded default is a SQLite file. PostgreSQL works through psycopg2 with the same code.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from sqlalchemy import create_engine, delete, event, inspect, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from fedmed.job.constants import ENV_DB_URL
from fedmed.job.records import (
    ALERT_KINDS as ALERT_KINDS,  # the core's record types, re-exported for the store's callers
)
from fedmed.job.records import SCORE_SOURCES as SCORE_SOURCES
from fedmed.job.records import UPDATE_STATUSES as UPDATE_STATUSES
from fedmed.job.records import AlertRecord as AlertRecord
from fedmed.job.records import RoundRecord as RoundRecord
from fedmed.job.records import SiteAnchor as SiteAnchor
from fedmed.job.records import TrustRecord as TrustRecord
from fedmed.job.records import UpdateRecord as UpdateRecord
from fedmed.server.crosssite import CrossSiteRecord
from fedmed.server.wire_checks import find_metrics_problem
from fedmed.store import audit
from fedmed.store.audit import AuditProblem, AuditReport, AuditSettings, RecordTampered
from fedmed.store.migrate import upgrade
from fedmed.store.models import (
    Alert,
    AuditEntry,
    ClientUpdate,
    CrossSiteResult,
    InferenceLog,
    PrivacySpend,
    Round,
    RoundMetric,
    Run,
    RunResumption,
    Site,
    SiteAnchorRow,
    SiteTrustState,
    utcnow,
)
from fedmed.store.urls import default_db_url  # moved to urls (a light module); still importable from here

# A problem seen while another job appended to the heads file is checked again on a fresh snapshot, this many
# times at most (a real tamper persists; each retry needs another job's write to happen during the check).
_RACE_RECHECKS = 3
CONNECT_TIMEOUT_S = 5  # PostgreSQL: an unreachable host fails a write in seconds, not after the OS's TCP timeout


@dataclass(frozen=True)
class RoundRow:
    """One line of the per-round table the FL admin reads (round_num from 1)."""

    round_num: int
    sites_accepted: tuple
    sites_other: tuple  # (site, status) pairs for rejected or missing contributions
    score: Optional[float]
    score_name: Optional[str]
    score_source: Optional[str]  # global_test / site_validation
    mean_auroc: Optional[float]
    test_loss: Optional[float]


@dataclass(frozen=True)
class RunHistory:
    """What a resumption needs to know of a recorded run (fedmed.server.resume plans from it): rounds from 1."""

    uid: str
    name: str
    status: str
    num_rounds: int
    config: dict
    job_ids: tuple  # the run's first job, then each resumption's, in order
    rounds: tuple  # (round_num, global_model_sha256 or None, score or None), ascending


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


GENESIS_HASH = audit.GENESIS_HASH
audit_hash = audit.legacy_hash  # the unkeyed chain of databases written before the keyed one


def resolve_db_url(workspace: Optional[Path] = None, explicit: Optional[str] = None) -> str:
    """explicit argument > FEDMED_DB_URL > SQLite file in the workspace."""
    url = explicit or os.environ.get(ENV_DB_URL)
    if url:
        return url
    if workspace is None:
        raise ValueError(f"no database URL: set {ENV_DB_URL} or give a workspace for the SQLite default")
    return default_db_url(workspace)


def _check_string_lengths(session: Session, _context, _instances) -> None:
    for obj in (*session.new, *session.dirty):
        for col in obj.__table__.columns:
            limit = getattr(col.type, "length", None)
            value = getattr(obj, col.key, None)
            if limit and isinstance(value, str) and len(value) > limit:
                raise ValueError(
                    f"{obj.__tablename__}.{col.name} is {len(value)} characters, at most {limit} fit: {value[:60]!r}..."
                )


def _metrics_problem(metrics: dict, where: str) -> None:
    problem = find_metrics_problem(metrics)
    if problem:
        raise ValueError(f"{where}: {problem}")


def _update_digest(u: UpdateRecord) -> Optional[str]:
    """An update's digest as a record_round entry names it: the SHA-256 hex as before revision 0013 (so the entries of
    earlier records read as they were written), a BLAKE3 one prefixed with its name (no reader takes it for SHA-256)."""
    return f"blake3:{u.update_blake3}" if u.update_blake3 is not None else u.update_sha256


def _aware(t: dt.datetime) -> dt.datetime:
    """SQLite hands back naive UTC, PostgreSQL aware: comparable either way."""
    return t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)


def _sqlite_pragmas(dbapi_conn, _record):
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA journal_mode=WAL")  # readers (report, demo table) don't block the server's writes
    cur.close()


def _audited_migrations_ahead(engine: Engine) -> list[str]:
    """The revisions in audit.MIGRATION_FORMS this database is about to go through (read before upgrading): a
    database with a rounds table but without rounds.score is older than revision 0009."""
    tables = inspect(engine)
    if not tables.has_table("rounds"):
        return []  # a new database: nothing recorded yet
    return [] if "score" in {c["name"] for c in tables.get_columns("rounds")} else ["0009"]


class Repository:
    """audit_key / audit_key_file / heads_file: see fedmed.store.audit (default: environment, else for SQLite
    `<database folder>/local/audit_key` and `<database folder>/audit_heads.log`). A writer (create_schema=True)
    resolves them at once, creating the key on first use, so a missing key fails before anything is written: with
    no key for a database that has no folder for one (PostgreSQL), before connecting (audit.AuditKeyError).

    Every audited write first checks that the record verifies (audit.RecordTampered otherwise, nothing written):
    in full at an instance's first write, then only the entries added since the one it last vouched for."""

    def __init__(
        self,
        url: str,
        create_schema: bool = True,
        audit_key: Optional[bytes] = None,
        audit_key_file: Optional[Path] = None,
        heads_file: Optional[Path] = None,
    ):
        if "://" not in url:
            raise ValueError(f"database URL must look like dialect://..., got {url!r}")
        if create_schema:  # a writer with no key anywhere: refused before connecting, never read as an outage
            audit.require_key_source(url, audit_key, audit_key_file)
        kwargs = {"pool_pre_ping": True}
        if url.startswith("postgresql"):
            kwargs["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT_S}
        self.engine: Engine = create_engine(url, **kwargs)
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._session = sessionmaker(self.engine, expire_on_commit=False)
        # SQLite stores any length and PostgreSQL refuses: check on both, so neither truncates nor differs.
        event.listen(self._session, "before_flush", _check_string_lengths)
        self._audit_args = (audit_key, audit_key_file, heads_file)
        self._audit_settings: Optional[AuditSettings] = None
        self._vouched: Optional[tuple] = None  # (audit entry id, MAC) this instance last verified or wrote
        if create_schema:
            migrating = _audited_migrations_ahead(self.engine)
            upgrade(self.engine)  # Alembic: the same revisions on SQLite and PostgreSQL
            self.audit_settings(create=True)  # after connecting: never make a missing database's folder
            for revision in migrating:
                self._record_schema_migration(revision)
            self._vouched = None  # a migration entry is checked by the verifier, not taken on trust by the writer

    def audit_settings(self, create: bool = True) -> AuditSettings:
        if self._audit_settings is None:
            key, key_file, heads = self._audit_args
            self._audit_settings = audit.audit_settings(
                self.engine.url.render_as_string(hide_password=False), key, key_file, heads, create=create
            )
        return self._audit_settings

    def close(self) -> None:
        self.engine.dispose()

    # --- writes -------------------------------------------------------------------------------------------------

    def start_run(self, uid: str, name: str, job_id: str, aggregation: str, num_rounds: int, config: dict) -> int:
        """Create the run row for uid, or return the existing one (a replayed start is a no-op)."""
        if not uid:
            raise ValueError("run uid must be a non-empty string")
        self._check_record("start_run")
        with self._session.begin() as s:
            run = s.scalar(select(Run).where(Run.uid == uid))
            if run is None:
                run = Run(
                    uid=uid,
                    name=name,
                    job_id=job_id,
                    aggregation=aggregation,
                    num_rounds=num_rounds,
                    config_json=json.dumps(config, sort_keys=True, default=str),
                )
                s.add(run)
                s.flush()
                head = self._audit(
                    s,
                    "start_run",
                    {"run": uid, "job_id": job_id, "aggregation": aggregation, "num_rounds": num_rounds},
                    audit.table_rows(s, "runs", run_id=run.id),
                )
            else:
                head = None
        self._append_head(head)
        return run.id

    def _run_id(self, s: Session, uid: str) -> int:
        run_id = s.scalar(select(Run.id).where(Run.uid == uid))
        if run_id is None:
            raise ValueError(f"no run with uid {uid!r}; start_run first")
        return run_id

    def record_round(self, run_uid: str, record: RoundRecord) -> None:
        """Write a round, its updates, metrics and alerts in one transaction. Idempotent: re-recording replaces it."""
        for u in record.updates:  # refused whole, with the reason, before anything is written
            _metrics_problem(u.metrics, f"round {record.round_num}, site {u.site!r}")
        _metrics_problem(record.test_metrics, f"round {record.round_num}, global test metrics")
        self._check_record("record_round")
        with self._session.begin() as s:
            run_id = self._run_id(s, run_uid)
            replaced = s.scalar(select(Round.id).where(Round.run_id == run_id, Round.round_num == record.round_num))
            for model in (Round, ClientUpdate, RoundMetric, Alert, PrivacySpend, SiteAnchorRow):
                s.execute(delete(model).where(model.run_id == run_id, model.round_num == record.round_num))
            accepted = sum(1 for u in record.updates if u.status == "accepted")
            # Every site this round names, looked up (and created) at once, before anything is added: a lookup per
            # row autoflushes the rows added so far, one INSERT round trip each (seconds with 50 sites on PostgreSQL).
            sites = self._sites(s, [*(u.site for u in record.updates), *(a.site for a in record.alerts if a.site)])
            sites.update(self._sites(s, [*(t.site for t in record.trust), *(a.site for a in record.anchors)]))
            trust_rows = {
                row.site_id: row
                for row in s.scalars(
                    select(SiteTrustState).where(SiteTrustState.site_id.in_([sites[t.site].id for t in record.trust]))
                )
            }
            s.add(
                Round(
                    run_id=run_id,
                    round_num=record.round_num,
                    num_sites=accepted,
                    test_loss=record.test_loss,
                    score=record.score,
                    score_name=record.score_name,
                    score_source=record.score_source,
                    mean_auroc=record.mean_auroc,
                    global_model_sha256=record.global_model_sha256,
                    started_at=record.started_at,
                    finished_at=utcnow(),
                )
            )
            for u in record.updates:
                site = sites[u.site]
                s.add(
                    ClientUpdate(
                        run_id=run_id,
                        round_num=record.round_num,
                        site_id=site.id,
                        status=u.status,
                        reason=u.reason,
                        num_samples=u.num_samples,
                        weight_samples=u.weight_samples,
                        update_norm=u.update_norm,
                        update_sha256=u.update_sha256,
                        update_blake3=u.update_blake3,
                        aggregation_weight=u.aggregation_weight,
                        distance=u.distance,
                        round_score=u.round_score,
                        trust=u.trust,
                        train_loss=u.train_loss,
                        val_loss=u.val_loss,
                        val_mean_auroc=u.val_mean_auroc,
                        val_score=u.val_score,
                        signature=u.signature,
                        signed_digest=u.signed_digest,
                    )
                )
                for metric, value in u.metrics.items():
                    s.add(
                        RoundMetric(
                            run_id=run_id, round_num=record.round_num, scope=u.site, metric=metric, value=float(value)
                        )
                    )
                if u.epsilon is not None:
                    s.add(
                        PrivacySpend(
                            run_id=run_id,
                            round_num=record.round_num,
                            site_id=site.id,
                            epsilon=u.epsilon,
                            delta=u.delta if u.delta is not None else 0.0,
                            epsilon_budget=u.epsilon_budget,
                            noise_multiplier=u.noise_multiplier,
                            accountant="rdp",
                        )
                    )
            for a in record.alerts:
                s.add(
                    Alert(
                        run_id=run_id,
                        round_num=record.round_num,
                        site_id=sites[a.site].id if a.site else None,
                        kind=a.kind,
                        message=a.message,
                    )
                )
            for a in record.anchors:
                s.add(
                    SiteAnchorRow(
                        run_id=run_id,
                        round_num=record.round_num,
                        site_id=sites[a.site].id,
                        ledger_entries=a.ledger_entries,
                        ledger_head=a.ledger_head,
                        lifetime_epsilon=a.lifetime_epsilon,
                        receipt_entry=a.receipt_entry,
                        receipt_mac=a.receipt_mac,
                    )
                )
            for metric, value in record.test_metrics.items():
                s.add(
                    RoundMetric(
                        run_id=run_id,
                        round_num=record.round_num,
                        scope="global_test",
                        metric=metric,
                        value=float(value),
                    )
                )
            for t in record.trust:
                site_id = sites[t.site].id
                row = trust_rows.get(site_id) or SiteTrustState(site_id=site_id)
                row.trust, row.quarantined, row.good_streak = float(t.trust), bool(t.quarantined), int(t.good_streak)
                row.run_id, row.round_num, row.updated_at = run_id, record.round_num, utcnow()
                s.add(row)
            s.flush()
            rows = [
                r for t in audit.ROUND_TABLES for r in audit.table_rows(s, t, run_id=run_id, round_num=record.round_num)
            ]
            head = self._audit(
                s,
                "record_round",
                {
                    "run": run_uid,
                    "round": record.round_num,
                    "replaced": replaced is not None,
                    "global_model_sha256": record.global_model_sha256,
                    "updates": [[u.site, u.status, u.num_samples, _update_digest(u), u.trust] for u in record.updates],
                    # Each site's trust state after the round (site_trust is rewritten every round: the keyed chain
                    # keeps what it was, so a later edit that un-quarantines a site can be found).
                    "trust": [[t.site, t.trust, t.quarantined, t.good_streak] for t in record.trust],
                },
                rows,
            )
        self._append_head(head)

    def record_cross_site(self, run_uid: str, records, score_name: Optional[str] = None) -> None:
        """The run's cross-site evaluation table (fedmed.server.crosssite.CrossSiteRecord cells), in one transaction.
        Idempotent: re-recording replaces the run's table whole. Refused whole, with the reason, if a cell's metrics
        cannot be recorded (the controller has checked them against the task already)."""
        records = list(records)
        for r in records:
            if not isinstance(r, CrossSiteRecord):
                raise TypeError(f"cross-site cells must be CrossSiteRecord, got {type(r).__name__}")
            _metrics_problem(r.metrics, f"cross-site {r.site!r} on model {r.model!r}")
        keys = [(r.model, r.site) for r in records]
        if len(set(keys)) != len(keys):
            raise ValueError(f"cross-site table names a (model, site) cell twice: {sorted(keys)}")
        self._check_record("record_cross_site")
        with self._session.begin() as s:
            run_id = self._run_id(s, run_uid)
            replaced = s.execute(delete(CrossSiteResult).where(CrossSiteResult.run_id == run_id)).rowcount
            for r in records:
                s.add(
                    CrossSiteResult(
                        run_id=run_id,
                        model=r.model,
                        model_sha256=r.model_sha256,
                        site_id=self._site(s, r.site).id,
                        status=r.status,
                        reason=r.reason,
                        score=r.score,
                        score_name=score_name if r.score is not None else None,
                        num_samples=r.num_samples,
                        metrics_json=json.dumps({k: float(v) for k, v in r.metrics.items()}, sort_keys=True),
                        created_at=utcnow(),
                    )
                )
            s.flush()
            head = self._audit(
                s,
                "record_cross_site",
                {
                    "run": run_uid,
                    "replaced": bool(replaced),
                    "cells": sorted([r.model, r.site, r.status] for r in records),
                },
                audit.table_rows(s, "cross_site_results", run_id=run_id),
            )
        self._append_head(head)

    def _rows_with_site(self, table, run_id: int, first_order) -> list:
        """(row, site name) pairs of one run's per-site table, ordered by first_order then site."""
        with self._session() as s:
            return s.execute(
                select(table, Site.name)
                .join(Site, Site.id == table.site_id)
                .where(table.run_id == run_id)
                .order_by(first_order, Site.name)
            ).all()

    def cross_site_results(self, run_id: int) -> list[dict]:
        """The run's cross-site table: one dict per (model, site) cell, ordered by model then site."""
        rows = self._rows_with_site(CrossSiteResult, run_id, CrossSiteResult.model)
        return [
            {
                "model": r.model,
                "site": name,
                **_columns(r, "status", "reason", "score", "score_name", "num_samples"),
                "metrics": json.loads(r.metrics_json or "{}"),
                "model_sha256": r.model_sha256,
            }
            for r, name in rows
        ]

    def find_model_round(self, sha256: str) -> Optional[tuple]:
        """(run id, round) of the latest recorded round whose global model has this sha256, or None."""
        with self._session() as s:
            row = s.execute(
                select(Round.run_id, Round.round_num)
                .where(Round.global_model_sha256 == sha256)
                .order_by(Round.run_id.desc(), Round.round_num.desc())
                .limit(1)
            ).first()
        return (row[0], row[1]) if row else None

    def load_trust(self, problems: Optional[list] = None) -> dict[str, TrustRecord]:
        """Every site's trust state as the latest recorded round left it, whichever job that was.

        The site_trust table is checked against the keyed audit chain: where a row differs from what the newest
        MAC-verified round entry recorded for its site (someone with write access to the database lifted a
        quarantine, or deleted the row to reset the site), the audited state is returned and the difference is
        appended to `problems` (strings), as is anything that keeps the chain from vouching for it (an entry that
        fails its MAC, newest entries deleted per the heads file)."""
        problems = problems if problems is not None else []
        settings = self.audit_settings(create=False)
        heads = audit.HeadsSnapshot(settings.heads_file)  # before the database (audit.HeadsSnapshot says why)
        with self._session() as s:
            table = audit.site_trust_table(s)
            has_keyed = s.scalar(select(AuditEntry.id).where(AuditEntry.scheme == audit.SCHEME).limit(1))
            if has_keyed is None:
                # A record from before the keyed chain has nothing to check site_trust against; one whose keyed
                # entries were rewritten as unkeyed ones (or emptied) must not pass for such a record.
                report = audit.verify(s, settings, heads=heads)
                if report.problems:
                    raise RecordTampered(
                        f"site trust cannot be vouched for: {report.first} (fedmed-audit-verify lists every problem)"
                    )
                return {n: TrustRecord(n, *v[:3]) for n, v in table.items()}
            audited, chain_problems = audit.audited_trust(s, self.audit_settings(create=False))
        problems.extend(chain_problems)
        states = {n: TrustRecord(n, *v[:3]) for n, v in table.items()}
        for site, _, why in audit.trust_differences(table, audited):
            if site in audited:
                states[site] = TrustRecord(site, *audited[site][0])
                problems.append(f"site_trust of {site} {why}: using the audited state")
            else:
                del states[site]
                problems.append(f"site_trust of {site} {why}: ignored")
        return states

    def finish_run(self, run_uid: str, status: str, best_round: Optional[int], best_metric: Optional[float]) -> None:
        self._check_record("finish_run")
        with self._session.begin() as s:
            run = s.get(Run, self._run_id(s, run_uid))
            run.status, run.finished_at, run.best_round, run.best_metric = status, utcnow(), best_round, best_metric
            s.flush()
            head = self._audit(
                s,
                "finish_run",
                {"run": run_uid, "status": status, "best_round": best_round},
                audit.table_rows(s, "runs", run_id=run.id),
            )
        self._append_head(head)

    def record_alert(
        self, run_uid: str, kind: str, message: str, site: Optional[str] = None, round_num: int = 0
    ) -> None:
        """One alert outside a round's record (round 0: about the run), e.g. a dead-lettered journal line."""
        if kind not in ALERT_KINDS:
            raise ValueError(f"alert kind must be one of {ALERT_KINDS}, got {kind!r}")
        self._check_record("alert")
        with self._session.begin() as s:
            run_id = self._run_id(s, run_uid)
            site_id = self._site(s, site).id if site else None
            alert = Alert(run_id=run_id, round_num=round_num, site_id=site_id, kind=kind, message=message)
            s.add(alert)
            s.flush()
            head = self._audit(
                s,
                "alert",
                {"run": run_uid, "round": round_num, "site": site, "kind": kind},
                audit.table_rows(s, "alerts", row_id=alert.id),
            )
        self._append_head(head)

    def record_inference(self, record: InferenceRecord) -> None:
        """Append one inference log row (and its audit row, in the same transaction)."""
        self._check_record("inference")
        with self._session.begin() as s:
            log_row = InferenceLog(
                study_pseudonym=record.study_pseudonym,
                patient_pseudonym=record.patient_pseudonym,
                model_sha256=record.model_sha256,
                model_version=record.model_version,
                num_images=record.num_images,
                positive_findings="|".join(record.positive_findings),
                status=record.status,
                message=record.message,
            )
            s.add(log_row)
            s.flush()
            head = self._audit(
                s,
                "inference",
                {"study": record.study_pseudonym, "model_sha256": record.model_sha256, "status": record.status},
                audit.table_rows(s, "inference_logs", row_id=log_row.id),
            )
        self._append_head(head)

    def resume_run(self, uid: str, job_id: str, from_round: int, model_sha256: Optional[str]) -> None:
        """Record that NVFlare job job_id continues run uid from round from_round (numbered from 1) and the recorded
        global model model_sha256: the run is 'running' again, its rounds and best round stay. A replayed resumption
        (same job) is a no-op. Raises naming the run when it does not exist."""
        self._check_record("resume_run")
        with self._session.begin() as s:
            run = s.get(Run, self._run_id(s, uid))
            done = select(RunResumption.id).where(
                RunResumption.run_id == run.id, RunResumption.job_id == job_id, RunResumption.from_round == from_round
            )
            if s.scalar(done) is not None:
                return
            resumption = RunResumption(
                run_id=run.id,
                job_id=job_id,
                from_round=from_round,
                model_sha256=model_sha256,
                previous_status=run.status,
            )
            s.add(resumption)
            run.status, run.finished_at = "running", None
            s.flush()
            head = self._audit(
                s,
                "resume_run",
                {"run": uid, "job_id": job_id, "from_round": from_round, "model_sha256": model_sha256},
                audit.table_rows(s, "runs", run_id=run.id)
                + audit.table_rows(s, "run_resumptions", row_id=resumption.id),
            )
        self._append_head(head)

    def mark_interrupted(self, job_ids, reason: str, run_uids: Optional[list] = None) -> list[str]:
        """Runs of these NVFlare jobs (the first job or a resumption's) still marked 'running' (their server process
        died mid-job) become 'interrupted'; their recorded rounds stay, the best is taken from them. Returns the run
        uids changed. run_uids: only these runs (the simulator gives every job the same id)."""
        changed, heads = [], []
        job_ids = list(job_ids)
        self._check_record("finish_run")
        with self._session.begin() as s:
            resumed = select(RunResumption.run_id).where(RunResumption.job_id.in_(job_ids))
            q = select(Run).where((Run.job_id.in_(job_ids)) | (Run.id.in_(resumed)), Run.status == "running")
            runs = s.scalars(q if run_uids is None else q.where(Run.uid.in_(list(run_uids)))).all()
            for run in runs:
                # The Controller's rule: the highest task score, the earliest round on a tie.
                best = s.execute(
                    select(Round.round_num, Round.score)
                    .where(Round.run_id == run.id, Round.score.is_not(None))
                    .order_by(Round.score.desc(), Round.round_num)
                    .limit(1)
                ).first()
                run.status, run.finished_at = "interrupted", utcnow()
                run.best_round, run.best_metric = (best[0], best[1]) if best else (None, None)
                s.flush()
                heads.append(
                    self._audit(
                        s,
                        "finish_run",
                        {"run": run.uid, "status": "interrupted", "best_round": run.best_round, "reason": reason},
                        audit.table_rows(s, "runs", run_id=run.id),
                    )
                )
                changed.append(run.uid)
        for head in heads:
            self._append_head(head)
        return changed

    def _record_schema_migration(self, revision: str) -> None:
        """After a migration that changed covered rows: one keyed entry with every row's hash as it was before
        (recomputed by the revision's inverse, checked against the chain by the verifier) and as it is now."""
        note = f"Alembic revision {revision} changed covered rows; previous: each row as it was before"
        with self._session.begin() as s:
            keyed = s.scalar(select(AuditEntry.id).where(AuditEntry.scheme == audit.SCHEME).limit(1))
            done = s.scalar(
                select(AuditEntry.id).where(
                    AuditEntry.action == audit.MIGRATION_ACTION,
                    AuditEntry.payload_json.contains(f'"revision":"{revision}"'),
                )
            )
            if keyed is None or done is not None:  # no keyed chain yet (an admin adopts the rows), or done
                return
            form = audit.MIGRATION_FORMS[revision]
            previous = [r for t in audit._TABLES for r in audit.table_rows(s, t, form=form)]
            rows = [r for t in audit._TABLES for r in audit.table_rows(s, t)]
            head = self._audit(
                s,
                audit.MIGRATION_ACTION,
                {"revision": revision, "note": note, "previous": audit.rows_payload(previous)},
                rows,
            )
        self._append_head(head)

    def _audit(self, s: Session, action: str, payload: dict, rows=()) -> tuple:
        """Append one keyed audit entry inside the caller's transaction (so it exists iff the write does), covering
        the hashes of the rows the write left. Returns what _append_head needs once the transaction commits."""
        settings = self.audit_settings(create=True)
        if self.engine.dialect.name == "postgresql":
            # Serialise appenders so two servers writing at once cannot fork the chain.
            s.execute(text("LOCK TABLE audit_log IN SHARE ROW EXCLUSIVE MODE"))
        last = s.execute(select(AuditEntry.row_hash, AuditEntry.scheme).order_by(AuditEntry.id.desc()).limit(1)).first()
        if last is not None and last.scheme is None and action != audit.ADOPT_ACTION:
            # Rows the server did not write are adopted only by an admin's explicit, audited act (adopt()).
            raise RecordTampered(self._unkeyed_refusal(action))
        entry = self._add_entry(s, settings, last.row_hash if last else GENESIS_HASH, action, payload, rows)
        tag = entry.row_hash if last is None else s.scalar(select(AuditEntry.row_hash).order_by(AuditEntry.id).limit(1))
        self._vouched = (entry.id, entry.row_hash)
        return settings.heads_file, tag, entry.id, entry.row_hash, action

    def _safe_url(self) -> str:
        return self.engine.url.render_as_string(hide_password=True)

    def _unkeyed_refusal(self, action: str) -> str:
        return (
            f"refusing to write {action} to {self._safe_url()}: its audit chain is unkeyed (written before the "
            "keyed chain, or rewritten as unkeyed entries) and the server adopts no rows it did not write; check "
            "the record, then adopt it once: fedmed-audit-verify --adopt --reason '...'"
        )

    def _check_record(self, action: str) -> None:
        """Refuse (RecordTampered, nothing written) to write on top of a record that does not verify. In full the
        first time; later only the entries appended after the one this instance last vouched for (another job's
        keyed writes), so a job pays for one full check, not one per round."""
        settings = self.audit_settings(create=True)
        for _ in range(_RACE_RECHECKS):
            heads = audit.HeadsSnapshot(settings.heads_file)  # before the database: another job may be writing
            with self._session() as s:
                self._one_snapshot(s)
                head = s.execute(
                    select(AuditEntry.id, AuditEntry.row_hash).order_by(AuditEntry.id.desc()).limit(1)
                ).first()
                if head is not None and self._vouched is not None:
                    if tuple(head) == self._vouched or audit.extends(s, settings, self._vouched):
                        self._vouched = tuple(head)
                        return
                report = audit.verify(s, settings, heads=heads)
            if not report.problems or not heads.moved():
                break  # a problem that holds while no other job writes is the record's, not a race
        if report.problems:
            fix = (
                "once they are explained, `fedmed-audit-verify --adopt --reason '...'` records the rows as they are "
                "under the key, naming them"
                if all(p.adoptable for p in report.problems)
                else "the audit chain itself was changed: restore the database and the heads file from a backup"
            )
            raise RecordTampered(
                f"refusing to write {action} to {self._safe_url()}: the record does not verify: {report.first} "
                f"({len(report.problems)} problem(s) in all; fedmed-audit-verify lists them); nothing was written; "
                f"{fix}"
            )
        if report.entries and not report.keyed_entries:
            raise RecordTampered(self._unkeyed_refusal(action))
        self._vouched = tuple(head) if head is not None else None

    def adopt(self, reason: str) -> tuple[int, int, list[str]]:
        """The admin's explicit act: vouch for every row as it is now (an unkeyed record from before the keyed
        chain, or rows changed outside fedmed that were checked and accepted) in one keyed entry naming the reason
        and every problem it accepted. Refused when the chain itself is broken (an entry edited, removed or
        downgraded after keyed ones, the newest entries deleted): adoption cannot vouch for what the chain said.
        Returns (audit entry id, rows adopted, problems accepted)."""
        if not reason or not reason.strip():
            raise ValueError("an adoption needs a reason (who checked the record, and why its rows are accepted)")
        settings = self.audit_settings(create=False)
        heads = audit.HeadsSnapshot(settings.heads_file)  # before the database (audit.HeadsSnapshot says why)
        with self._session.begin() as s:
            if self.engine.dialect.name == "postgresql":
                s.execute(text("LOCK TABLE audit_log IN SHARE ROW EXCLUSIVE MODE"))
            report = audit.verify(s, settings, heads=heads)
            broken = [p for p in report.problems if not p.adoptable]
            if broken:
                raise RecordTampered(
                    f"cannot adopt the record in {self._safe_url()}: {broken[0]}: the audit chain itself was "
                    "changed; adoption vouches for rows, not for the entries that vouched for them before: restore "
                    "the database and the heads file from a backup"
                )
            if not report.problems and report.keyed_entries:
                raise ValueError(f"the record in {self._safe_url()} verifies: there is nothing to adopt")
            accepted = [str(p) for p in report.problems]
            every = [r for t in audit._TABLES for r in audit.table_rows(s, t)]
            trust = audit.site_trust_table(s)
            head = self._audit(
                s,
                audit.ADOPT_ACTION,
                {
                    "reason": reason.strip(),
                    "unkeyed_entries": report.legacy_entries,
                    "accepted": accepted,
                    "trust": [[site, *v[:3]] for site, v in sorted(trust.items())],
                },
                every,
            )
        self._append_head(head)
        return head[2], len(every), accepted

    @staticmethod
    def _add_entry(s: Session, settings: AuditSettings, prev: str, action: str, payload: dict, rows) -> AuditEntry:
        created = utcnow().isoformat()
        body = audit.canonical_json({**payload, "rows": audit.rows_payload(rows)})
        entry = AuditEntry(
            created_at=created,
            action=action,
            payload_json=body,
            prev_hash=prev,
            scheme=audit.SCHEME,
            row_hash=audit.entry_mac(settings.key, prev, created, action, body),
        )
        s.add(entry)
        s.flush()
        return entry

    @staticmethod
    def _append_head(head: Optional[tuple]) -> None:
        """After the commit: the chain head goes to the append-only heads file, outside the database's reach."""
        if head is None or head[0] is None:
            return
        path, tag, entry_id, mac, action = head
        try:
            audit.append_head(path, tag, entry_id, mac, action)
        except OSError as e:  # the write is committed: failing it now would only lose it from the caller's view
            logging.getLogger(__name__).error(
                f"audit entry {entry_id} is committed but its head could not be appended "
                f"to {path} ({e}); deleting the newest rows would go unnoticed until the "
                "next head is written"
            )

    def audit_report(self, site_keys: Optional[dict] = None) -> AuditReport:
        """Everything audit_verify checks: chain links and MACs, every covered row against the entry that recorded
        it, the chain's head against the heads file, and (given the hospitals' public keys, site -> PublicKeys)
        every stored update signature."""
        settings = self.audit_settings(create=False)
        for _ in range(_RACE_RECHECKS):
            heads = audit.HeadsSnapshot(settings.heads_file)  # before the database (audit.HeadsSnapshot says why)
            with self._session() as s:
                self._one_snapshot(s)
                report = audit.verify(s, settings, site_keys, heads=heads)
            if not report.problems or not heads.moved():
                break
        return report

    def _one_snapshot(self, s: Session) -> None:
        """Make every read of this (fresh) session see one snapshot. By default each SELECT sees the latest commit
        (pysqlite reads outside a transaction; PostgreSQL's READ COMMITTED), so a row another job committed between
        reading the chain and reading its table looked inserted outside the record, and a writer refused it."""
        if self.engine.dialect.name == "sqlite":
            s.connection().exec_driver_sql("BEGIN")  # WAL: a read transaction's snapshot, writers not blocked
        elif self.engine.dialect.name == "postgresql":
            s.execute(text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ"))

    def chain_head(self):
        """The audit chain's tag and newest entry (fedmed.store.receipts.ChainHead), or None when it is empty."""
        from fedmed.store import receipts

        with self._session() as s:
            return receipts.chain_head(s)

    def last_ledger_heads(self) -> dict[str, tuple[SiteAnchor, str, int]]:
        """site -> (its newest anchor that names a ledger head, run uid, round): what the record holds of each site's
        privacy ledger, for the next job's check that the site's ledger still extends it (fedmed.server.anchors)."""
        with self._session() as s:
            rows = s.execute(
                select(SiteAnchorRow, Site.name, Run.uid)
                .join(Site, Site.id == SiteAnchorRow.site_id)
                .join(Run, Run.id == SiteAnchorRow.run_id)
                .where(SiteAnchorRow.ledger_entries.is_not(None))
                .order_by(SiteAnchorRow.id)
            ).all()
        out = {}
        for a, name, uid in rows:  # by id: the newest write of each site last
            anchor = SiteAnchor(
                name, a.ledger_entries, a.ledger_head, a.lifetime_epsilon, a.receipt_entry, a.receipt_mac
            )
            out[name] = (anchor, uid, a.round_num)
        return out

    def site_anchors(self, run_id: int) -> list[dict]:
        """Each round's anchors of a run (fedmed.job.records.SiteAnchor as dicts, with the round)."""
        rows = self._rows_with_site(SiteAnchorRow, run_id, SiteAnchorRow.round_num)
        fields = ("ledger_entries", "ledger_head", "lifetime_epsilon", "receipt_entry", "receipt_mac")
        return [{"round": a.round_num, "site": name, **_columns(a, *fields)} for a, name in rows]

    def receipt_problem(self, raw, server_public=None) -> Optional[str]:
        """Why the record does not hold the chain head a site's receipt names (fedmed.store.receipts.receipt_problem),
        None when it does."""
        from fedmed.store import receipts

        with self._session() as s:
            return receipts.receipt_problem(s, raw, server_public)

    def check_receipts(self, folder: Path, server_public=None) -> tuple[int, list]:
        """The record against hospitals' receipt logs (fedmed.store.receipts.check_receipts)."""
        from fedmed.store import receipts  # signing keys are needed only here

        with self._session() as s:
            return receipts.check_receipts(s, folder, server_public)

    def verify_audit(self) -> Optional[AuditProblem]:
        """The first problem audit_report finds, or None if the record is intact."""
        return self.audit_report().first

    def audit_rows(self) -> int:
        with self._session() as s:
            return len(s.scalars(select(AuditEntry.id)).all())

    @staticmethod
    def _sites(s: Session, names) -> dict[str, Site]:
        """name -> Site for each name, in one query; the missing ones are created (one flush)."""
        wanted = list(dict.fromkeys(names))  # in order: new sites get their ids as the rows name them
        found = {site.name: site for site in s.scalars(select(Site).where(Site.name.in_(wanted)))} if wanted else {}
        missing = [n for n in wanted if n not in found]
        for name in missing:
            found[name] = Site(name=name)
            s.add(found[name])
        if missing:
            s.flush()
        return found

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
        """The latest run recorded for an NVFlare job id (the job that started it or one that resumed it), or
        None."""
        with self._session() as s:
            started = s.execute(
                select(Run.started_at, Run.id).where(Run.job_id == job_id).order_by(Run.id.desc()).limit(1)
            ).first()
            resumed = s.execute(
                select(RunResumption.resumed_at, RunResumption.run_id)
                .where(RunResumption.job_id == job_id)
                .order_by(RunResumption.id.desc())
                .limit(1)
            ).first()
        # The simulator reuses its job id: the latest of the run it started and the run it resumed.
        latest = max((r for r in (started, resumed) if r is not None), default=None, key=lambda r: _aware(r[0]))
        return None if latest is None else latest[1]

    def run_id_of(self, uid: str) -> int:
        """The run number of a run uid; raises ValueError naming the uid if there is none."""
        with self._session() as s:
            return self._run_id(s, uid)

    def run_uids_starting_with(self, prefix: str) -> list[str]:
        """Every run uid that starts with prefix (the admin may give a unique prefix of a run's uid)."""
        if not prefix:
            return []
        with self._session() as s:
            uids = s.scalars(select(Run.uid).order_by(Run.id)).all()
        return [u for u in uids if u.startswith(prefix)]  # in Python: no LIKE wildcards from the admin's text

    def run_history(self, uid: str) -> RunHistory:
        """The run's status, config, jobs and recorded rounds; raises ValueError naming the uid if there is none."""
        with self._session() as s:
            run = s.scalar(select(Run).where(Run.uid == uid))
            if run is None:
                raise ValueError(f"no run with uid {uid!r}")
            jobs = s.scalars(
                select(RunResumption.job_id).where(RunResumption.run_id == run.id).order_by(RunResumption.id)
            ).all()
            rounds = s.execute(
                select(Round.round_num, Round.global_model_sha256, Round.score)
                .where(Round.run_id == run.id)
                .order_by(Round.round_num)
            ).all()
            return RunHistory(
                run.uid,
                run.name,
                run.status,
                run.num_rounds,
                json.loads(run.config_json or "{}"),
                (run.job_id, *jobs),
                tuple((r.round_num, r.global_model_sha256, r.score) for r in rounds),
            )

    def resumptions(self, run_id: int) -> list[dict]:
        """Each resumption of the run, in order: when, which job, from which round and model."""
        with self._session() as s:
            rows = s.scalars(
                select(RunResumption).where(RunResumption.run_id == run_id).order_by(RunResumption.id)
            ).all()
        return [
            {
                "job_id": r.job_id,
                "from_round": r.from_round,
                "model_sha256": r.model_sha256,
                "previous_status": r.previous_status,
                "resumed_at": r.resumed_at,
            }
            for r in rows
        ]

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
            rows.append(
                RoundRow(
                    r.round_num,
                    tuple(site for site, st in mine if st == "accepted"),
                    tuple((site, st) for site, st in mine if st != "accepted"),
                    r.score,
                    r.score_name,
                    r.score_source,
                    r.mean_auroc,
                    r.test_loss,
                )
            )
        return rows

    def client_updates(self, run_id: int) -> list[dict]:
        rows = self._rows_with_site(ClientUpdate, run_id, ClientUpdate.round_num)
        fields = (
            "status",
            "reason",
            "num_samples",
            "weight_samples",
            "update_norm",
            "aggregation_weight",
            "val_mean_auroc",
            "val_score",
            "distance",
            "round_score",
            "trust",
            "update_sha256",
            "update_blake3",
            "signature",
            "signed_digest",
        )
        return [{"round": u.round_num, "site": name, **_columns(u, *fields)} for u, name in rows]

    def round_metrics(self, run_id: int, scope: str) -> dict[int, dict[str, float]]:
        with self._session() as s:
            rows = s.execute(
                select(RoundMetric.round_num, RoundMetric.metric, RoundMetric.value).where(
                    RoundMetric.run_id == run_id, RoundMetric.scope == scope
                )
            ).all()
        out: dict[int, dict[str, float]] = {}
        for rn, metric, value in rows:
            out.setdefault(rn, {})[metric] = value
        return out

    def privacy_spend(self, run_id: int) -> list[dict]:
        rows = self._rows_with_site(PrivacySpend, run_id, PrivacySpend.round_num)
        fields = ("epsilon", "delta", "epsilon_budget", "noise_multiplier")
        return [{"round": p.round_num, "site": name, **_columns(p, *fields)} for p, name in rows]

    def alerts(self, run_id: int) -> list[dict]:
        with self._session() as s:
            rows = s.execute(
                select(Alert, Site.name)
                .outerjoin(Site, Site.id == Alert.site_id)
                .where(Alert.run_id == run_id)
                .order_by(Alert.round_num, Site.name, Alert.id)
            ).all()
        return [{"round": a.round_num, "site": name or "", "kind": a.kind, "message": a.message} for a, name in rows]

    def inference_logs(self) -> list[dict]:
        with self._session() as s:
            rows = s.scalars(select(InferenceLog).order_by(InferenceLog.id)).all()
        fields = (
            "created_at",
            "study_pseudonym",
            "patient_pseudonym",
            "model_sha256",
            "model_version",
            "num_images",
            "positive_findings",
            "status",
            "message",
        )
        return [_columns(r, *fields) for r in rows]


def _columns(row, *names: str) -> dict:
    """The named attributes of an ORM row, as the dicts the readers of the record take."""
    return {name: getattr(row, name) for name in names}
