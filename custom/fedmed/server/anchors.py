"""What each site vouches for in its signed update, checked by the server: its privacy ledger's head and the audit
receipt it last saw. Anchors that no single party holds.

Pure core (no NVFlare, no fedmed.store). The NVFlare Controller (through fedmed.flare.anchors) and the tests call the
same AnchorWatch.

Ledger heads. A hospital's privacy ledger is its own (fedmed.privacy.ledger): whoever holds the site's files and its
ledger key can delete the ledger, cut its newest lines, or rewrite and re-MAC it, and it verifies again at the site.
What they cannot do is make the federation forget what the site reported. Each signed update carries the ledger's
head (entry count, newest line's sha256, lifetime epsilon of the dataset the job reads) and the sha256 of its line
at the count the record held before (the server sends that count with the global model); the server keeps the last
head of each site (this job's earlier rounds, else the newest the record holds from an earlier run) and raises a
`ledger_reset` alert when the new head does not extend it (fedmed.privacy.ledger.head_extends). The new head is
then the one later rounds are checked against: the reset is alerted once, in the round it is seen, and recorded.

Receipts. After each recorded round the server signs the audit chain's head and sends it with the next global
model (fedmed.store.receipts); each hospital keeps it in its receipt log and echoes the last one it saw in its next
update, this job's or, in a job's first round, its log's newest from an earlier job. The server checks that its
record holds that head and raises `receipt_mismatch` when not: the record (with its key) was rewritten after the
hospital saw it, or the hospital sent a receipt the server never signed.

Only what an authenticated update says is taken: a refusal, a site that cannot take part, and an update whose
signature failed (signatures on) vouch for nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Mapping, Optional, Sequence

from fedmed.job.records import AlertRecord, RoundRecord, SiteAnchor
from fedmed.privacy.ledger import LedgerHead, head_extends
from fedmed.server.rounds import SiteResult

ReceiptCheck = Callable[[Mapping], Optional[str]]  # receipt -> why the record does not hold it, None when it does


@dataclass(frozen=True)
class Reported:
    """The last ledger head a site reported, and where the record holds it (for the alert's message)."""

    head: LedgerHead
    where: str  # e.g. "run 3f2a..., round 4" or "round 2 of this job"


def from_record(earlier: Mapping[str, tuple]) -> dict[str, Reported]:
    """site -> Reported, from the store's {site: (SiteAnchor, run uid, round)} (Repository.last_ledger_heads)."""
    return {
        site: Reported(
            LedgerHead(int(a.ledger_entries), str(a.ledger_head), float(a.lifetime_epsilon or 0.0)),
            f"run {str(run)[:12]}, round {round_num}",
        )
        for site, (a, run, round_num) in earlier.items()
        if a.ledger_entries is not None and a.ledger_head is not None
    }


@dataclass
class AnchorWatch:
    """The server's memory of what each site vouched for, for the length of a job. earlier: site -> its last
    reported ledger head (from the record, at job start); receipt_check: the record's answer to a receipt (None:
    receipts are not checked, e.g. no record to check them against)."""

    earlier: dict = field(default_factory=dict)
    receipt_check: Optional[ReceiptCheck] = None
    _pending: tuple = ((), ())  # (anchors, alerts) of the round checked last, until attach() takes them

    def ledger_counts(self) -> dict[str, int]:
        """{site: the ledger entry count the record holds}, sent with the global model (meta fedmed_ledger_seen)."""
        return {site: r.head.entries for site, r in sorted(self.earlier.items())}

    def check(self, round_num: int, results: Sequence[SiteResult]) -> tuple[tuple, tuple]:
        """(SiteAnchor per site that vouched for anything, AlertRecord per problem) of one round (round_num from 0);
        kept for attach() too."""
        anchors, alerts = [], []
        for r in sorted(results, key=lambda r: r.site):
            if r.refused is not None or r.unavailable is not None or r.authentication is not None:
                continue
            anchor, problems = self._check_one(round_num, r)
            if anchor is not None:
                anchors.append(anchor)
            alerts += problems
        self._pending = (tuple(anchors), tuple(alerts))
        return self._pending

    def attach(self, record: RoundRecord) -> RoundRecord:
        """The round's record with the anchors and alerts of the last check() (once)."""
        anchors, alerts = self._pending
        self._pending = ((), ())
        if not anchors and not alerts:
            return record
        return replace(record, anchors=record.anchors + anchors, alerts=record.alerts + alerts)

    def _check_one(self, round_num: int, r: SiteResult) -> tuple[Optional[SiteAnchor], list]:
        alerts, head, receipt = [], None, None
        if r.ledger_head is not None:
            try:
                head = LedgerHead.from_wire(r.ledger_head)
            except ValueError as e:
                alerts.append(AlertRecord(r.site, "ledger_reset", f"the site's ledger head is unreadable: {e}"[:500]))
            else:
                before = self.earlier.get(r.site)
                problem = head_extends(before.head if before else None, head)
                if problem:
                    alerts.append(
                        AlertRecord(
                            r.site,
                            "ledger_reset",
                            f"{problem} (it reported {before.head.entries} entries, head {before.head.head[:12]}..., "
                            f"lifetime epsilon {before.head.lifetime_epsilon:.3f} at {before.where}; now "
                            f"{head.entries} entries, head {head.head[:12]}..., lifetime epsilon "
                            f"{head.lifetime_epsilon:.3f})"[:500],
                        )
                    )
                self.earlier[r.site] = Reported(head, f"round {round_num + 1} of this job")
        if r.receipt is not None:
            receipt = r.receipt if isinstance(r.receipt, Mapping) else {}
            why = self.receipt_check(receipt) if self.receipt_check is not None else None
            if why:
                alerts.append(AlertRecord(r.site, "receipt_mismatch", why[:500]))
        if head is None and receipt is None:
            return None, alerts
        return (
            SiteAnchor(
                r.site,
                head.entries if head else None,
                head.head if head else None,
                head.lifetime_epsilon if head else None,
                _int_or_none((receipt or {}).get("entry")),
                _str_or_none((receipt or {}).get("mac")),
            ),
            alerts,
        )


def _int_or_none(v) -> Optional[int]:
    try:
        return None if v is None or isinstance(v, bool) else int(v)
    except (TypeError, ValueError):
        return None


def _str_or_none(v) -> Optional[str]:
    return v[:64] if isinstance(v, str) else None
