"""Verify the record against its keyed audit chain. Exit 0 if intact; exit 1 naming the first row that differs.

Checks every audit entry's link and HMAC (key outside the database), recomputes the hash of every run, round,
client update, privacy spend, metric, alert and inference row and compares it with the latest entry that recorded
it, and compares the chain with the append-only heads file (so deleted newest rows are found too).

No downgrade: unkeyed entries after keyed ones, a chain with no keyed entry beside a heads file that records keyed
heads, an empty chain beside rows, or a missing heads file beside a keyed chain all fail.

    fedmed-audit-verify [--db-url URL] [--key-file KIT/local/audit_key] [--heads WORKSPACE/audit_heads.log]
                        [--site-keys KIT/local/site_keys] [--receipts DIR [--server-key FILE]]
    fedmed-audit-verify --adopt --reason TEXT [--db-url URL] [--key-file ...] [--heads ...]

--receipts DIR: also check the record against hospitals' receipt logs (*.jsonl in DIR, e.g. copies of each
hospital's local/audit_receipts.jsonl; fedmed/store/receipts.py): the chain heads the server signed and sent them.
A record rewritten together with its key (by whoever holds it) no longer holds the MACs the hospitals kept. With
--server-key (the server's public bundle, a hospital kit's local/server_signing.pub) each receipt's signature is
checked too.

--adopt: the admin's explicit act after checking the record: vouch for every row as it is now (a record written
before the keyed chain, or rows changed outside fedmed and accepted) in one keyed audit entry that names the reason
and every problem it accepted. The server never does this by itself: it refuses to write on top of a record that
does not verify. Refused (exit 1) when the chain itself was changed (an entry edited, removed or downgraded after
keyed ones, the newest entries deleted): restore from a backup then.

Defaults: $FEDMED_DB_URL; $FEDMED_AUDIT_KEY or $FEDMED_AUDIT_KEY_FILE, else (SQLite) <db folder>/local/audit_key
(the server kit's local/audit_key for the kit's own fedmed.db; W/local/audit_key for `fedmed-federation --db-url
sqlite:///W/fedmed.db`); $FEDMED_AUDIT_HEADS, else audit_heads.log above the key file's folder. Exit 0 intact (or
adopted), 1 broken (or adoption refused), 2 cannot verify (no key, bad arguments). See fedmed/store/audit.py.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from fedmed.job.constants import ENV_DB_URL
from fedmed.security import signing
from fedmed.store.audit import RecordTampered
from fedmed.store.repository import Repository
from fedmed.store.urls import DatabaseUrlError, check_reader_url


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--db-url", default=os.environ.get(ENV_DB_URL))
    p.add_argument("--key-file", type=Path, help="the server kit's local/audit_key")
    p.add_argument("--heads", type=Path, help="the append-only heads file (audit_heads.log)")
    p.add_argument(
        "--site-keys",
        type=Path,
        help="the server kit's local/site_keys/: re-verify every stored update "
        "signature with the hospitals' public keys",
    )
    p.add_argument("--receipts", type=Path, help="folder of hospitals' receipt logs (audit_receipts.jsonl copies)")
    p.add_argument("--server-key", type=Path, help="with --receipts: the server's public signing bundle")
    p.add_argument("--adopt", action="store_true", help="vouch for every row as it is now, in one keyed entry")
    p.add_argument("--reason", help="with --adopt: who checked the record and why its rows are accepted (recorded)")
    a = p.parse_args(argv)
    if not a.db_url:
        p.error(f"give --db-url or set {ENV_DB_URL}")
    try:
        check_reader_url(a.db_url)  # a misspelt SQLite path would otherwise be created, empty, and verify as intact
    except DatabaseUrlError as e:
        print(f"cannot verify: {e}", file=sys.stderr)
        return 2
    if a.server_key and not a.receipts:
        p.error("--server-key checks receipts: give --receipts DIR too")
    if a.adopt and not (a.reason or "").strip():
        p.error("--adopt needs --reason TEXT: the adoption entry records who checked the record and why")
    repo = Repository(a.db_url, create_schema=False, audit_key_file=a.key_file, heads_file=a.heads)
    if a.adopt:
        return _adopt(repo, a.reason)
    try:
        site_keys = signing.load_public_keys_dir(a.site_keys) if a.site_keys else None
        report = repo.audit_report(site_keys)
        if a.receipts:
            server_public = signing.load_public_keys(a.server_key) if a.server_key else None
            receipts_checked, problems = repo.check_receipts(a.receipts, server_public)
            report.problems.extend(problems)
    except ValueError as e:
        print(f"cannot verify: {e}", file=sys.stderr)
        return 2
    finally:
        repo.close()
    for note in report.notes:
        print(f"note: {note}", file=sys.stderr)
    if report.problems:
        print(f"audit BROKEN at {report.first} ({len(report.problems)} problem(s) in all)", file=sys.stderr)
        for more in report.problems[1:10]:
            print(f"  also: {more}", file=sys.stderr)
        return 1
    print(
        f"audit chain intact: {report.entries} rows ({report.legacy_entries} unkeyed from before the keyed chain), "
        f"{report.rows_checked} table rows match it, {report.heads_checked} head(s) in {report.heads_file}"
        + (f", {report.signatures_checked} update signature(s) verify" if a.site_keys else "")
        + (f", {receipts_checked} hospital receipt(s) match" if a.receipts else "")
    )
    return 0


def _adopt(repo: Repository, reason: str) -> int:
    try:
        entry, rows, accepted = repo.adopt(reason)
    except RecordTampered as e:
        print(str(e), file=sys.stderr)
        return 1
    except ValueError as e:
        print(f"cannot adopt: {e}", file=sys.stderr)
        return 2
    finally:
        repo.close()
    print(f"adopted {rows} row(s) as they are now in audit entry {entry} (reason: {reason.strip()})")
    for problem in accepted:
        print(f"  accepted: {problem}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
