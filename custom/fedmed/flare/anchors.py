"""The Controller's side of fedmed.server.anchors: the check's memory from the record, and the record's answer to a receipt.

The check itself is pure (fedmed.server.anchors.AnchorWatch); this module only reads the store for it, through one
Repository held for the job (close_watch at the run's end), not one opened per receipt per site per round.
"""

from __future__ import annotations

from typing import Callable, Optional

from sqlalchemy.exc import SQLAlchemyError

from fedmed.server.anchors import AnchorWatch, from_record
from fedmed.store.repository import Repository


class RecordReceipts:
    """The record's answer to a site's receipt (AnchorWatch.receipt_check), from one Repository kept for the job.
    A read that fails is logged and answers None (the receipt is not held against the site); the connection is
    dropped then and opened again at the next receipt, so an outage does not last the job."""

    def __init__(self, db_url: str, server_public, log_error: Callable[[str], None]):
        self.db_url, self.server_public, self.log_error = db_url, server_public, log_error
        self._repo: Optional[Repository] = None

    def repository(self) -> Repository:
        if self._repo is None:
            self._repo = Repository(self.db_url, create_schema=False)
        return self._repo

    def __call__(self, raw) -> Optional[str]:
        try:
            return self.repository().receipt_problem(raw, self.server_public)
        except (SQLAlchemyError, ValueError) as e:  # a driver message may hold the URL: the class name only
            self.log_error(f"cannot check a site's audit receipt against the record ({type(e).__name__})")
            self.close()
            return None

    def close(self) -> None:
        if self._repo is not None:
            repo, self._repo = self._repo, None
            repo.close()


def open_watch(db_url: str, server_public, log_error: Callable[[str], None]) -> AnchorWatch:
    """An AnchorWatch that remembers the newest ledger head the record holds for each site (from earlier runs), and
    checks receipts against the record (with server_public, only receipts the server signed are held). A record it
    cannot read leaves it empty, logged: the job's own rounds are still checked against each other."""
    receipts = RecordReceipts(db_url, server_public, log_error)
    try:
        earlier = receipts.repository().last_ledger_heads()
    except (SQLAlchemyError, ValueError) as e:  # a driver message may hold the URL: the class name only
        log_error(
            f"cannot read the sites' earlier ledger heads from the record ({type(e).__name__}); this job checks "
            "each site's ledger against its own earlier rounds only"
        )
        receipts.close()
        earlier = {}
    return AnchorWatch(from_record(earlier), receipts)


def close_watch(watch: AnchorWatch) -> None:
    """The job's end: the record's connection open_watch holds, closed (a watch without one: nothing to do)."""
    if isinstance(watch.receipt_check, RecordReceipts):
        watch.receipt_check.close()
