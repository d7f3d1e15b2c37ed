"""The round's record types: what the round engine decides about each site and round, as plain frozen dataclasses.

Pure core: the engine (fedmed.server.rounds) builds them and the store (fedmed.store.repository) maps them to tables, never
the other way round, so deciding a round needs no database code.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Optional

UPDATE_STATUSES = ("accepted", "rejected", "quarantined", "refused", "missing")
# global_model_unusable: the round's aggregate gives NaN/infinite or input-independent outputs (fedmed.models.model_health)
ALERT_KINDS = (
    "quarantined",
    "readmitted",
    "rejected",
    "refused",
    "dead_letter",
    "record_edited",
    "global_model_unusable",
    "collusion",  # near-copy updates counted once (fedmed.server.robust.collusion)
    "suspicion",  # a round not committed: its rules would have turned on half of the sites or more
    "ledger_reset",  # a site's privacy ledger head does not extend the one it reported before (fedmed.server.anchors)
    "receipt_mismatch",  # a site's audit receipt names a chain head the record does not hold (fedmed.server.anchors)
)


@dataclass(frozen=True)
class UpdateRecord:
    site: str
    status: str  # one of UPDATE_STATUSES
    num_samples: int = 0  # as the site claimed it
    reason: Optional[str] = None
    weight_samples: Optional[float] = None  # the count after the cap (fedmed.server.aggregation.capped_counts)
    update_norm: Optional[float] = None
    update_sha256: Optional[str] = None  # records written before BLAKE3 (old rows, journal lines): kept as they were
    update_blake3: Optional[str] = None  # the update's digest (fedmed.models.hashing.update_blake3), new records
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
    val_score: Optional[float] = None  # the task's score on the site's validation set (accuracy for brain_mri)
    metrics: dict = field(default_factory=dict)  # metric name -> value, stored under scope = site
    signature: Optional[str] = None  # hex fedmed.security.signing signature of the update, as received
    signed_digest: Optional[str] = None  # hex update_digest the server computed from the update and verified

    def __post_init__(self):
        if self.status not in UPDATE_STATUSES:
            raise ValueError(f"status must be one of {UPDATE_STATUSES}, got {self.status!r}")
        if self.update_sha256 is not None and self.update_blake3 is not None:
            raise ValueError(
                f"update of {self.site}: one digest per update, update_blake3 (since revision 0013) or update_sha256 "
                "(records written before), not both"
            )


@dataclass(frozen=True)
class AlertRecord:
    site: Optional[str]  # None: about the round's global model, not one site
    kind: str  # one of ALERT_KINDS
    message: str

    def __post_init__(self):
        if self.kind not in ALERT_KINDS:
            raise ValueError(f"alert kind must be one of {ALERT_KINDS}, got {self.kind!r}")


SCORE_SOURCES = ("global_test", "site_validation")


@dataclass(frozen=True)
class RoundRecord:
    """round_num counts from 1, as the logs do. score: the task's score (score_name, e.g. "accuracy"), from
    score_source: the server's global test set, or the aggregated sites' validation scores weighted by their capped
    counts. mean_auroc comes from the same source."""

    round_num: int
    updates: tuple  # of UpdateRecord
    test_loss: Optional[float] = None
    score: Optional[float] = None
    score_name: Optional[str] = None
    score_source: Optional[str] = None
    mean_auroc: Optional[float] = None
    test_metrics: dict = field(default_factory=dict)  # metric name -> value, scope 'global_test'
    global_model_sha256: Optional[str] = None
    started_at: Optional[dt.datetime] = None
    alerts: tuple = ()  # of AlertRecord
    trust: tuple = ()  # of TrustRecord: each scored site's state after this round, kept across jobs
    anchors: tuple = ()  # of SiteAnchor: what each site vouched for in its signed update (fedmed.server.anchors)

    def __post_init__(self):
        if isinstance(self.round_num, bool) or not isinstance(self.round_num, int) or self.round_num < 1:
            raise ValueError(f"round_num counts from 1, got {self.round_num!r}")
        if self.score_source is not None and self.score_source not in SCORE_SOURCES:
            raise ValueError(f"score_source must be one of {SCORE_SOURCES}, got {self.score_source!r}")


@dataclass(frozen=True)
class TrustRecord:
    site: str
    trust: float
    quarantined: bool
    good_streak: int


@dataclass(frozen=True)
class SiteAnchor:
    """What one site vouched for in its signed update of a round (fedmed.server.anchors): its privacy ledger's entry count,
    newest line's sha256 and the lifetime epsilon of the dataset the job reads (None: the job keeps no ledger at the
    site), and the audit receipt it last saw (entry id and MAC; None: it had none)."""

    site: str
    ledger_entries: Optional[int] = None
    ledger_head: Optional[str] = None
    lifetime_epsilon: Optional[float] = None
    receipt_entry: Optional[int] = None
    receipt_mac: Optional[str] = None
