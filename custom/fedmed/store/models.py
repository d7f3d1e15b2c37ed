"""SQLAlchemy 2 models of the FL record: runs, sites, rounds, client updates, round metrics.

Portable types only (no JSONB, no arrays) so one schema runs on SQLite and PostgreSQL. Natural unique keys make
every write idempotent: replaying a round cannot duplicate it.

Rounds are numbered from 1, as the logs, the report and the model files' meta number them (Alembic revision 0009
converted the 0-based rows of older databases); round_num 0 on an alert means "about the run, no round".
Scores are named for what they are: each round's `score` is the task's score (fedmed.job.tasks: mean AUROC for the
chest task, accuracy for the brain task), named by `score_name`, from `score_source` ("global_test": the server's
test set; "site_validation": the aggregated sites' validation scores weighted by their capped counts).
"""

from __future__ import annotations

import datetime as dt
from typing import Optional

from sqlalchemy import Boolean, DateTime, Float, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class Base(DeclarativeBase):
    pass


class Run(Base):
    __tablename__ = "runs"
    id: Mapped[int] = mapped_column(primary_key=True)
    uid: Mapped[str] = mapped_column(String(64), unique=True)  # made by the server before the DB is reached
    name: Mapped[str] = mapped_column(String(200))
    job_id: Mapped[str] = mapped_column(String(200), index=True)  # the simulator reuses "simulate_job"
    aggregation: Mapped[str] = mapped_column(String(50))
    num_rounds: Mapped[int] = mapped_column(Integer)
    config_json: Mapped[str] = mapped_column(Text, default="{}")
    # running / finished / failed / aborted / interrupted
    status: Mapped[str] = mapped_column(String(30), default="running")
    started_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[Optional[dt.datetime]] = mapped_column(DateTime(timezone=True), nullable=True)
    best_round: Mapped[Optional[int]] = mapped_column(Integer, nullable=True)
    best_metric: Mapped[Optional[float]] = mapped_column(Float, nullable=True)  # the best round's score


class RunResumption(Base):
    """A run continued by another NVFlare job after it was interrupted or failed (fedmed.server.resume): which job, from which
    round (the first round it ran, numbered from 1), from which recorded global model, and when."""

    __tablename__ = "run_resumptions"
    # The simulator reuses one job id for every job, so a job id alone does not name a resumption.
    __table_args__ = (UniqueConstraint("run_id", "job_id", "from_round"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    job_id: Mapped[str] = mapped_column(String(200))
    from_round: Mapped[int] = mapped_column(Integer)
    model_sha256: Mapped[Optional[str]] = mapped_column(String(64), nullable=True)
    previous_status: Mapped[str] = mapped_column(String(30))  # interrupted / failed / aborted, before this resumption
    resumed_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Site(Base):
    __tablename__ = "sites"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    first_seen: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Round(Base):
    __tablename__ = "rounds"
    __table_args__ = (UniqueConstraint("run_id", "round_num"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    round_num: Mapped[int] = mapped_column(Integer)
    num_sites: Mapped[int] = mapped_column(Integer)
    test_loss: Mapped[Optional[float]] = mapped_column(Float, nullable=True)
    score: Mapped[Optional[float]] = mapped_column(Float, nullable=True)  # the task's score: picks the best round
    score_name: Mapped[Optional[str]] = mapped_column(String(64), nullable=True)  # e.g. "mean_auroc", "accuracy"
    score_source: Mapped[Optional[str]] = mapped_column(String(30), nullable=True)  # global_test / site_validation
    mean_auroc: Mapped[Optional[float]] = mapped_column(Float, nullable=True)  # from the same source as score
    global_model_sha256: Mapped[Optional[str]] = mapped_column(String(64), nullable=True)
    started_at: Mapped[Optional[dt.datetime]] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ClientUpdate(Base):
    __tablename__ = "client_updates"
    __table_args__ = (UniqueConstraint("run_id", "round_num", "site_id"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    round_num: Mapped[int] = mapped_column(Integer)
    site_id: Mapped[int] = mapped_column(ForeignKey("sites.id"))
    status: Mapped[str] = mapped_column(String(30))  # accepted / rejected / quarantined / missing
    reason: Mapped[Optional[str]] = mapped_column(Text, nullable=True)
    num_samples: Mapped[int] = mapped_column(Integer, default=0)  # as the site claimed it
    weight_samples: Mapped[Optional[float]] = mapped_column(Float, nullable=True)  # after the cap: what weighed
    update_norm: Mapped[Optional[float]] = mapped_column(Float, nullable=True)
    update_sha256: Mapped[Optional[str]] = mapped_column(String(64), nullable=True)  # rows written before revision 0013
    # The update's BLAKE3 (fedmed.models.hashing.update_blake3), from revision 0013 on: update_sha256 is then NULL.
    update_blake3: Mapped[Optional[str]] = mapped_column(String(64), nullable=True)
    aggregation_weight: Mapped[Optional[float]] = mapped_column(Float, nullable=True)
    distance: Mapped[Optional[float]] = mapped_column(Float, nullable=True)  # to this round's aggregate
    round_score: Mapped[Optional[float]] = mapped_column(Float, nullable=True)  # this round's trust score
    trust: Mapped[Optional[float]] = mapped_column(Float, nullable=True)  # smoothed trust after this round
    train_loss: Mapped[Optional[float]] = mapped_column(Float, nullable=True)
    val_loss: Mapped[Optional[float]] = mapped_column(Float, nullable=True)
    val_mean_auroc: Mapped[Optional[float]] = mapped_column(Float, nullable=True)
    val_score: Mapped[Optional[float]] = mapped_column(Float, nullable=True)  # the task's score on its validation set
    # The site's fedmed.security.signing signature (hex) over signed_digest (hex update_digest, recomputed by the server from
    # the update it received): audit_verify re-checks it offline with the site's installed public key.
    signature: Mapped[Optional[str]] = mapped_column(Text, nullable=True)
    signed_digest: Mapped[Optional[str]] = mapped_column(String(64), nullable=True)
    received_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class SiteTrustState(Base):
    """Each site's trust after the latest round it was scored in, across jobs: a new job of the federation starts
    from it (a site quarantined in one job is still quarantined in the next)."""

    __tablename__ = "site_trust"
    site_id: Mapped[int] = mapped_column(ForeignKey("sites.id"), primary_key=True)
    trust: Mapped[float] = mapped_column(Float)
    quarantined: Mapped[bool] = mapped_column(Boolean, default=False)
    good_streak: Mapped[int] = mapped_column(Integer, default=0)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    round_num: Mapped[int] = mapped_column(Integer)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class RoundMetric(Base):
    """One number per (run, round, scope, metric): scope is 'global_test' or a site name; metric e.g. 'auroc/Mass'."""

    __tablename__ = "round_metrics"
    __table_args__ = (UniqueConstraint("run_id", "round_num", "scope", "metric"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    round_num: Mapped[int] = mapped_column(Integer)
    scope: Mapped[str] = mapped_column(String(200))
    metric: Mapped[str] = mapped_column(String(200))
    value: Mapped[float] = mapped_column(Float)


class Alert(Base):
    """Something the FL admin should see: a site quarantined or re-admitted, an update rejected."""

    __tablename__ = "alerts"
    __table_args__ = (UniqueConstraint("run_id", "round_num", "site_id", "kind"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    round_num: Mapped[int] = mapped_column(Integer)
    site_id: Mapped[Optional[int]] = mapped_column(ForeignKey("sites.id"), nullable=True)  # None: about the run
    kind: Mapped[str] = mapped_column(String(50))  # quarantined / readmitted / rejected / refused / dead_letter
    message: Mapped[str] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class AuditEntry(Base):
    """Append-only, chained record of every write (fedmed.store.audit): row_hash = HMAC-SHA256 under a key kept
    outside the database over (prev_hash, time, action, payload), the payload carrying the hashes of the rows the write
    left, so editing an entry or a covered row is detected (scripts/audit_verify.py names the first that differs).
    scheme NULL: an entry from before the keyed chain, row_hash = sha256 of the same content."""

    __tablename__ = "audit_log"
    id: Mapped[int] = mapped_column(primary_key=True)
    created_at: Mapped[str] = mapped_column(String(40))  # ISO text: hashed exactly as stored on both engines
    action: Mapped[str] = mapped_column(String(50))
    payload_json: Mapped[str] = mapped_column(Text)
    prev_hash: Mapped[str] = mapped_column(String(64))
    row_hash: Mapped[str] = mapped_column(String(64), unique=True)
    scheme: Mapped[Optional[str]] = mapped_column(String(20), nullable=True)


class PrivacySpend(Base):
    """Cumulative (epsilon, delta) a site reports after a round of DP-SGD, from its own accountant."""

    __tablename__ = "privacy_spend"
    __table_args__ = (UniqueConstraint("run_id", "round_num", "site_id"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    round_num: Mapped[int] = mapped_column(Integer)
    site_id: Mapped[int] = mapped_column(ForeignKey("sites.id"))
    epsilon: Mapped[float] = mapped_column(Float)
    delta: Mapped[float] = mapped_column(Float)
    epsilon_budget: Mapped[Optional[float]] = mapped_column(Float, nullable=True)
    noise_multiplier: Mapped[Optional[float]] = mapped_column(Float, nullable=True)
    accountant: Mapped[Optional[str]] = mapped_column(String(30), nullable=True)


class InferenceLog(Base):
    """One clinician inference run on one study. Identifiers are pseudonymised (keyed hash), never in clear."""

    __tablename__ = "inference_logs"
    id: Mapped[int] = mapped_column(primary_key=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    study_pseudonym: Mapped[str] = mapped_column(String(64), index=True)
    patient_pseudonym: Mapped[str] = mapped_column(String(64))
    model_sha256: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[str] = mapped_column(String(100))
    num_images: Mapped[int] = mapped_column(Integer)
    positive_findings: Mapped[str] = mapped_column(Text)  # '|'-joined finding names
    status: Mapped[str] = mapped_column(String(30))  # ok / skipped
    message: Mapped[Optional[str]] = mapped_column(Text, nullable=True)


class CrossSiteResult(Base):
    """Cross-site evaluation (fedmed.server.crosssite): `site` scored `model` ("global", or the site name whose last local
    model it was) on its own validation data, or why not (status refused / rejected / missing / not_shared)."""

    __tablename__ = "cross_site_results"
    __table_args__ = (UniqueConstraint("run_id", "model", "site_id"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    model: Mapped[str] = mapped_column(String(200))
    model_sha256: Mapped[Optional[str]] = mapped_column(String(64), nullable=True)
    site_id: Mapped[int] = mapped_column(ForeignKey("sites.id"))
    status: Mapped[str] = mapped_column(String(30))  # evaluated / refused / rejected / missing / not_shared
    reason: Mapped[Optional[str]] = mapped_column(Text, nullable=True)
    score: Mapped[Optional[float]] = mapped_column(Float, nullable=True)  # the task's score
    score_name: Mapped[Optional[str]] = mapped_column(String(64), nullable=True)
    num_samples: Mapped[Optional[int]] = mapped_column(Integer, nullable=True)
    metrics_json: Mapped[str] = mapped_column(Text, default="{}")  # per-class scores, as checked and recorded
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class SiteAnchorRow(Base):
    """What a site vouched for in its signed update of a round (fedmed.job.records.SiteAnchor, fedmed.server.anchors): its
    privacy ledger's entry count, newest line's sha256 and lifetime epsilon, and the audit receipt it last saw."""

    __tablename__ = "site_anchors"
    __table_args__ = (UniqueConstraint("run_id", "round_num", "site_id"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    round_num: Mapped[int] = mapped_column(Integer)
    site_id: Mapped[int] = mapped_column(ForeignKey("sites.id"))
    ledger_entries: Mapped[Optional[int]] = mapped_column(Integer, nullable=True)
    ledger_head: Mapped[Optional[str]] = mapped_column(String(64), nullable=True)
    lifetime_epsilon: Mapped[Optional[float]] = mapped_column(Float, nullable=True)
    receipt_entry: Mapped[Optional[int]] = mapped_column(Integer, nullable=True)
    receipt_mac: Mapped[Optional[str]] = mapped_column(String(64), nullable=True)
