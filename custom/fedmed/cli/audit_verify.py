"""Verify the hash-chained audit log. Exit 0 if intact; exit 1 naming the first bad row.

    python scripts/audit_verify.py [--db-url URL]          (default $FEDMED_DB_URL)
"""

from __future__ import annotations

import argparse
import os
import sys

from fedmed.constants import ENV_DB_URL
from fedmed.store.repository import Repository


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--db-url", default=os.environ.get(ENV_DB_URL))
    a = p.parse_args(argv)
    if not a.db_url:
        p.error(f"give --db-url or set {ENV_DB_URL}")
    repo = Repository(a.db_url, create_schema=False)
    try:
        problem = repo.verify_audit()
        n = repo.audit_rows()
    finally:
        repo.close()
    if problem:
        print(f"audit chain BROKEN at row {problem.row_id}: {problem.reason}", file=sys.stderr)
        return 1
    print(f"audit chain intact: {n} rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
