"""The Controller's side of fedmed.server.anchors: the check's memory from the record, and the record's answer to a receipt.

The check itself is pure (fedmed.server.anchors.AnchorWatch); this module only reads the store for it.
"""

from __future__ import annotations

from typing import Callable, Optional

from sqlalchemy.exc import SQLAlchemyError

from fedmed.server.anchors import AnchorWatch, from_record
from fedmed.store.repository import Repository


def open_watch(db_url: str, server_public, log_error: Callable[[str], None]) -> AnchorWatch:
    """An AnchorWatch that remembers the newest ledger head the record holds for each site (from earlier runs), and
    checks receipts against the record (with server_public, only receipts the server signed are held). A record it
    cannot read leaves it empty, logged: the job's own rounds are still checked against each other."""
    try:
        repo = Repository(db_url, create_schema=False)
        try:
            earlier = repo.last_ledger_heads()
        finally:
            repo.close()
    except (SQLAlchemyError, ValueError) as e:  # a driver message may hold the URL: the class name only
        log_error(
            f"cannot read the sites' earlier ledger heads from the record ({type(e).__name__}); this job checks "
            "each site's ledger against its own earlier rounds only"
        )
        earlier = {}

    def receipt_check(raw) -> Optional[str]:
        try:
            repo = Repository(db_url, create_schema=False)
            try:
                return repo.receipt_problem(raw, server_public)
            finally:
                repo.close()
        except (SQLAlchemyError, ValueError) as e:
            log_error(f"cannot check a site's audit receipt against the record ({type(e).__name__})")
            return None

    return AnchorWatch(from_record(earlier), receipt_check)
