"""A keyed audit chain over the real rows.

Each audited write appends one audit_log entry in its own transaction. The entry's payload names what was written
and carries the SHA-256 of every row it wrote (run, round, each client update, privacy spend, alert, metric,
inference log, run resumption, cross-site evaluation result, site anchor) in a canonical JSON form read back from the database; its MAC is HMAC-SHA256, under a key kept
outside the database, over (previous MAC, time, action, payload). Someone with write access to the tables but not
the key can neither edit a row (its hash no longer matches the latest entry that covers it), nor edit an entry (its
MAC fails), nor drop rows and recompute the chain. After each write the chain head is appended to a separate
append-only heads file, so deleting the newest entries (which no chain can reveal by itself) is detected too.

Rows written before this scheme (audit_log.scheme NULL: plain SHA-256 chain) are checked as before; their last hash
is pinned by the first keyed entry's MAC. No downgrade: once the chain holds a keyed entry, an unkeyed one after it
fails; a chain with no keyed entry beside a heads file that records keyed heads fails (its entries were rewritten as
unkeyed ones); an empty chain beside rows fails. The server adopts rows it did not write (an unkeyed record, or rows
changed outside it) only by an explicit admin action, `fedmed-audit-verify --adopt --reason ...`, itself a keyed entry
(ADOPT_ACTION) naming the reason and the problems it accepted; it refuses to write on top of a chain that does not
verify (RecordTampered).

Key: $FEDMED_AUDIT_KEY (hex, >= 32 bytes), else a key file ($FEDMED_AUDIT_KEY_FILE or the one given; for a SQLite
database by default `<database folder>/local/audit_key`: the server kit's local/audit_key for the kit's own
fedmed.db, W/local/audit_key for `fedmed-federation --db-url sqlite:///W/fedmed.db`), created 0600 with 32 random
bytes on first write. Any other database (PostgreSQL) has no folder of its own: without a key configured the server
refuses to start (AuditKeyError); `site_configs/install.sh <kit> server --db-url URL` creates <kit>/local/audit_key
and names it in <kit>/local/fedmed.env. Heads file: $FEDMED_AUDIT_HEADS, else `audit_heads.log` in the folder above the key
file's (the kit's workspace), else next to the SQLite database.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import decimal
import fcntl
import hashlib
import hmac
import json
import os
import secrets
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

from sqlalchemy import select
from sqlalchemy.engine import make_url

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
)

ENV_AUDIT_KEY = "FEDMED_AUDIT_KEY"
ENV_AUDIT_KEY_FILE = "FEDMED_AUDIT_KEY_FILE"
ENV_AUDIT_HEADS = "FEDMED_AUDIT_HEADS"
KEY_FILE_NAME = "audit_key"
HEADS_NAME = "audit_heads.log"
SCHEME = "hmac-sha256"
GENESIS_HASH = "0" * 64
MIN_KEY_BYTES = 32
ADOPT_ACTION = "adopt_rows"


class RecordRefused(Exception):
    """The server will not write to this record until someone acts. Not an outage: retrying changes nothing, so a
    write refused this way is never journaled as 'database unavailable'."""


class AuditKeyError(RecordRefused, ValueError):
    """The audit key is missing, unreadable or malformed: a configuration error, named with where the key must be."""


class RecordTampered(RecordRefused):
    """The record does not verify against its keyed chain (rows or entries changed outside fedmed, an unkeyed or
    emptied chain): the server writes nothing on top of it until an admin adopts it (fedmed-audit-verify --adopt)."""


# --- key and heads file ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AuditSettings:
    key: bytes
    key_source: str  # where the key came from (for messages; never the key)
    heads_file: Optional[Path]


def _key_from_hex(text: str, source: str) -> bytes:
    try:
        key = bytes.fromhex(text.strip())
    except ValueError:
        raise AuditKeyError(f"audit key in {source} must be hex") from None
    if len(key) < MIN_KEY_BYTES:
        raise AuditKeyError(f"audit key in {source} has {len(key)} bytes, at least {MIN_KEY_BYTES} are needed")
    return key


def read_key_file(path: Path) -> bytes:
    path = Path(path)
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise AuditKeyError(f"audit key file {path} is readable by others (mode {mode:o}); chmod 600 it")
    return _key_from_hex(path.read_text(), str(path))


def create_key_file(path: Path) -> bytes:
    """Make a 0600 key file with 32 random bytes, atomically: a concurrent creator's key wins, never half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".audit_key.")  # mkstemp files are 0600
    try:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(MIN_KEY_BYTES) + "\n")
            f.flush()
            os.fsync(f.fileno())
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
    finally:
        os.unlink(tmp)
    return read_key_file(path)


def default_key_file(url: str) -> Optional[Path]:
    u = make_url(url)
    if u.get_backend_name() == "sqlite" and u.database and u.database != ":memory:":
        return Path(u.database).resolve().parent / "local" / KEY_FILE_NAME
    return None


def missing_key_message(url: str) -> str:
    """The one line that names the fix when a database has no audit key (any database but a SQLite file)."""
    return (
        f"no audit key for {make_url(url).render_as_string(hide_password=True)}: this database has no folder for "
        f"one, so the server will not write to it. Run `site_configs/install.sh <server kit> server --db-url URL` "
        f"(it creates <server kit>/local/{KEY_FILE_NAME} and sets {ENV_AUDIT_KEY_FILE} in <server kit>/local/"
        f"fedmed.env), or set {ENV_AUDIT_KEY_FILE}=<server kit>/local/{KEY_FILE_NAME} (or ${ENV_AUDIT_KEY}, hex)"
    )


def require_key_source(url: str, key: Optional[bytes] = None, key_file: Optional[Path] = None) -> None:
    """Raise AuditKeyError at once when nothing names a key for this database: checked before connecting, so a
    missing key is a configuration error at start, not a write that fails later and reads as an outage."""
    if (
        key is None
        and key_file is None
        and not os.environ.get(ENV_AUDIT_KEY)
        and not os.environ.get(ENV_AUDIT_KEY_FILE)
    ):
        if default_key_file(url) is None:
            raise AuditKeyError(missing_key_message(url))


def audit_settings(
    url: str,
    key: Optional[bytes] = None,
    key_file: Optional[Path] = None,
    heads_file: Optional[Path] = None,
    create: bool = True,
) -> AuditSettings:
    """Resolve the key and heads file for a database (order in the module docstring). create=False (verifying) never
    makes a new key: a missing one is an error naming where it was looked for."""
    env_heads = os.environ.get(ENV_AUDIT_HEADS)
    heads = Path(heads_file) if heads_file else Path(env_heads) if env_heads else None
    if key is not None:
        if len(key) < MIN_KEY_BYTES:
            raise AuditKeyError(f"audit key has {len(key)} bytes, at least {MIN_KEY_BYTES} are needed")
        source = "the caller"
    elif os.environ.get(ENV_AUDIT_KEY):
        key, source = _key_from_hex(os.environ[ENV_AUDIT_KEY], f"${ENV_AUDIT_KEY}"), f"${ENV_AUDIT_KEY}"
    else:
        path = (
            Path(key_file)
            if key_file
            else Path(os.environ[ENV_AUDIT_KEY_FILE])
            if os.environ.get(ENV_AUDIT_KEY_FILE)
            else default_key_file(url)
        )
        if path is None:
            raise AuditKeyError(missing_key_message(url))
        if path.exists():
            key = read_key_file(path)
        elif create:
            key = create_key_file(path)
        else:
            raise AuditKeyError(
                f"audit key file {path} does not exist (give the key the record was written with: the server "
                f"kit's local/{KEY_FILE_NAME}, or for a SQLite record <database folder>/local/{KEY_FILE_NAME})"
            )
        source = str(path)
        if heads is None:
            heads = path.parent.parent / HEADS_NAME
    if heads is None:
        sqlite_key = default_key_file(url)
        heads = sqlite_key.parent.parent / HEADS_NAME if sqlite_key else None
    return AuditSettings(key, source, heads)


# --- canonical rows -------------------------------------------------------------------------------------------------


def _canon(v):
    if isinstance(v, dt.datetime):  # SQLite hands back naive UTC, PostgreSQL aware: one form for both
        v = v if v.tzinfo else v.replace(tzinfo=dt.timezone.utc)
        return v.astimezone(dt.timezone.utc).isoformat()
    if isinstance(v, decimal.Decimal):
        return float(v)
    return v


def canonical_json(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def row_hash(values: dict) -> str:
    return hashlib.sha256(canonical_json({k: _canon(v) for k, v in values.items()}).encode()).hexdigest()


_SKIP = {"id", "run_id", "site_id"}  # surrogate keys: the run uid and site name stand for them


def _columns(model):
    return [c for c in model.__table__.columns if c.name not in _SKIP]


# table -> (model, has site, key columns after the run uid)
_TABLES = {
    "runs": (Run, False, ()),
    "rounds": (Round, False, ("round_num",)),
    "client_updates": (ClientUpdate, True, ("round_num", "site")),
    "privacy_spend": (PrivacySpend, True, ("round_num", "site")),
    "round_metrics": (RoundMetric, False, ("round_num", "scope", "metric")),
    "alerts": (Alert, True, ("round_num", "id")),
    "inference_logs": (InferenceLog, False, ("id",)),
    "run_resumptions": (RunResumption, False, ("job_id", "id")),
    "cross_site_results": (CrossSiteResult, True, ("model", "site")),
    "site_anchors": (SiteAnchorRow, True, ("round_num", "site")),
}
ROUND_TABLES = ("rounds", "client_updates", "privacy_spend", "round_metrics", "alerts", "site_anchors")
# Columns added to a covered table after rows were already chained, NULL in those rows: hashed only where set, so an
# earlier row hashes as it did (no migration entry), while a later row's value, blanked or moved, changes its hash.
LATE_COLUMNS = {"client_updates": ("update_blake3",)}  # revision 0013


@dataclass(frozen=True)
class CoveredRow:
    table: str
    key: tuple  # (run uid, ...natural key) or (id,) for inference logs
    row_id: int
    hash: str


def table_rows(
    s,
    table: str,
    run_id: Optional[int] = None,
    round_num: Optional[int] = None,
    row_id: Optional[int] = None,
    form=None,
) -> list[CoveredRow]:
    """The rows of one table as the audit chain sees them, read back from the database (so writer and verifier hash
    exactly the same values on either engine). form(table, values) -> values: the row as an earlier schema held it
    (e.g. before_0009), to check a migrated row against what the chain recorded before the migration."""
    model, has_site, key_cols = _TABLES[table]
    cols = [c.label(c.name) for c in _columns(model)]
    q = select(model.id.label("_id"), *cols)
    if model is not InferenceLog:
        q = q.add_columns(Run.uid.label("_uid"))
        q = q.join(Run, Run.id == model.run_id) if model is not Run else q
    if has_site:
        q = q.add_columns(Site.name.label("site")).outerjoin(Site, Site.id == model.site_id)
    if run_id is not None:
        q = q.where((model.id if model is Run else model.run_id) == run_id)
    if round_num is not None:
        q = q.where(model.round_num == round_num)
    if row_id is not None:
        q = q.where(model.id == row_id)
    out = []
    for r in s.execute(q.order_by(model.id)).mappings():
        values = {k: v for k, v in r.items() if not k.startswith("_")}
        for column in LATE_COLUMNS.get(table, ()):
            if values[column] is None:
                del values[column]
        if form is not None:
            values = form(table, values)
        ident = {**values, "id": r["_id"]}
        key = ((r["_uid"],) if model is not InferenceLog else ()) + tuple(ident[c] for c in key_cols)
        out.append(CoveredRow(table, key, r["_id"], row_hash(values)))
    return out


def rows_payload(rows: Iterable[CoveredRow]) -> list:
    return sorted([r.table, list(r.key), r.hash] for r in rows)


# --- schema migrations that change covered rows --------------------------------------------------------------------
# A migration that renames a covered column or changes a covered value changes the rows' hashes. The repository then
# writes one keyed entry (MIGRATION_ACTION) carrying every row's hash as it was before the migration, recomputed
# from the migrated row by the revision's inverse (`previous`), and as it is now (`rows`). The verifier checks
# `previous` against what the chain had recorded (so an edit made before the migration is still found) and
# continues from `rows`.

MIGRATION_ACTION = "schema_migration"


def before_0009(table: str, values: dict) -> dict:
    """A row as Alembic revision 0009 found it: rounds numbered from 0 (a run-level alert had -1), the round's mean
    AUROC in rounds.test_mean_auroc, and neither the score columns nor client_updates.val_score."""
    v = dict(values)
    if v.get("round_num") is not None:
        v["round_num"] -= 1
    if table == "runs" and v.get("best_round") is not None:
        v["best_round"] -= 1
    if table == "rounds":
        v["test_mean_auroc"] = v.pop("mean_auroc")
        for column in ("score", "score_name", "score_source"):
            v.pop(column)
    if table == "client_updates":
        v.pop("val_score")
    return v


MIGRATION_FORMS = {"0009": before_0009}


# --- MACs -----------------------------------------------------------------------------------------------------------


def legacy_hash(prev_hash: str, created_at: str, action: str, payload_json: str) -> str:
    content = json.dumps([prev_hash, created_at, action, payload_json], separators=(",", ":"))
    return hashlib.sha256(content.encode()).hexdigest()


def entry_mac(key: bytes, prev_hash: str, created_at: str, action: str, payload_json: str) -> str:
    content = json.dumps([SCHEME, prev_hash, created_at, action, payload_json], separators=(",", ":"))
    return hmac.new(key, content.encode(), hashlib.sha256).hexdigest()


# --- heads file -----------------------------------------------------------------------------------------------------


def append_head(path: Path, chain_tag: str, entry_id: int, mac: str, action: str) -> None:
    """One fsynced line per audited write, under an fcntl lock (several jobs may share a workspace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (
        canonical_json(
            {
                "chain": chain_tag,
                "id": entry_id,
                "mac": mac,
                "action": action,
                "at": dt.datetime.now(dt.timezone.utc).isoformat(),
            }
        )
        + "\n"
    )
    with open(path, "a", encoding="utf-8") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def read_heads(path: Path) -> list[dict]:
    # Under a shared lock: append_head writes under an exclusive one, so a concurrent job's head is read whole or
    # not at all (a torn line read mid-append looked malformed: a false alarm that refused the reader's write).
    with open(path, encoding="utf-8", errors="replace") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_SH)
        try:
            text = f.read()
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
    heads = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            h = json.loads(line)
            heads.append({"chain": str(h["chain"]), "id": int(h["id"]), "mac": str(h["mac"]), "line": n})
        except (ValueError, KeyError, TypeError):
            heads.append({"chain": None, "id": None, "mac": None, "line": n})
    return heads


# --- verification ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AuditProblem:
    row_id: int  # the audit_log id, or the table row's id when `table` is not audit_log
    reason: str
    table: str = "audit_log"
    # False where the chain itself is broken (an entry edited, removed or downgraded, the newest entries deleted):
    # adoption vouches for rows as they are, it cannot repair the entries that vouched for them before.
    adoptable: bool = True

    def __str__(self) -> str:
        return f"{self.table} row {self.row_id}: {self.reason}"


@dataclass
class AuditReport:
    entries: int = 0
    legacy_entries: int = 0
    rows_checked: int = 0
    heads_checked: int = 0
    signatures_checked: int = 0
    heads_file: Optional[str] = None
    problems: list = field(default_factory=list)  # of AuditProblem, first = earliest in the chain
    notes: list = field(default_factory=list)

    @property
    def first(self) -> Optional[AuditProblem]:
        return self.problems[0] if self.problems else None

    @property
    def keyed_entries(self) -> int:
        return self.entries - self.legacy_entries


def _key_str(key: tuple) -> str:
    return ", ".join(str(k) for k in key)


class HeadsSnapshot:
    """The heads file as read at one moment. Read it BEFORE the database: a head is appended only after its entry
    commits, so every head read first is in any database snapshot taken after it. Read after the database, a head
    another job appended in between looks like a deleted entry (a false alarm that refused concurrent writers)."""

    def __init__(self, path: Optional[Path]):
        self.path, self.heads, self.error = path, None, None
        self._stat = _file_state(path)
        if path is not None and Path(path).exists():
            try:
                self.heads = read_heads(path)
            except OSError as e:  # a folder, no permission: the tail cannot be checked
                self.error = e

    def moved(self) -> bool:
        """True when the file was created, appended to or replaced since this snapshot: another job wrote while the
        database was read, so a problem seen against this snapshot may be that job's head racing its commit (the
        file created just after the entry committed looked like a deleted heads file). Check again, afresh."""
        return _file_state(self.path) != self._stat


def _file_state(path: Optional[Path]) -> Optional[tuple]:
    try:
        st = os.stat(path) if path is not None else None
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns) if st else None


def verify(
    session, settings: AuditSettings, site_keys: Optional[dict] = None, heads: Optional[HeadsSnapshot] = None
) -> AuditReport:
    """Walk the chain (links, MACs), rebuild from it what every covered row must hash to, compare with the tables,
    then compare the chain's newest entries with the heads file, then (site_keys: site -> fedmed.security.signing.PublicKeys)
    re-verify every stored update signature. Problems come in the order found. heads: the heads file as read before
    the session's first query (read here when not given, which is before it only for a fresh session)."""
    heads = heads if heads is not None else HeadsSnapshot(settings.heads_file)
    rep = AuditReport(heads_file=str(settings.heads_file) if settings.heads_file else None)
    expected: dict[tuple, tuple[str, int]] = {}  # (table, key) -> (row hash, audit entry id that recorded it)
    trust: dict[str, tuple] = {}  # site -> (its trust state as the newest round recorded it, that entry's id)
    prev, keyed_seen, chain_tag, macs = GENESIS_HASH, False, None, {}
    for row in session.scalars(select(AuditEntry).order_by(AuditEntry.id)).yield_per(1000):
        rep.entries += 1
        chain_tag = chain_tag or row.row_hash
        macs[row.id] = row.row_hash
        if row.prev_hash != prev:
            rep.problems.append(
                AuditProblem(
                    row.id, "prev_hash does not match the previous entry (an entry was removed or reordered)", **_BROKEN
                )
            )
            return rep
        if row.scheme is None:
            if keyed_seen:
                rep.problems.append(
                    AuditProblem(row.id, "an unkeyed entry after keyed ones (forged or downgraded)", **_BROKEN)
                )
                return rep
            rep.legacy_entries += 1
            if legacy_hash(row.prev_hash, row.created_at, row.action, row.payload_json) != row.row_hash:
                rep.problems.append(
                    AuditProblem(row.id, "content does not match its hash (the entry was edited)", **_BROKEN)
                )
                return rep
        else:
            keyed_seen = True
            if row.scheme != SCHEME:
                rep.problems.append(AuditProblem(row.id, f"unknown scheme {row.scheme!r}", **_BROKEN))
                return rep
            if not hmac.compare_digest(
                entry_mac(settings.key, row.prev_hash, row.created_at, row.action, row.payload_json), row.row_hash
            ):
                rep.problems.append(
                    AuditProblem(
                        row.id,
                        "MAC does not verify: the entry was edited (or the audit "
                        f"key from {settings.key_source} is not this database's)",
                        **_BROKEN,
                    )
                )
                return rep
            _apply_entry(expected, row, rep)
            if row.action == "record_round":
                trust.update(trust_states_of(json.loads(row.payload_json), row.id))
            elif row.action == ADOPT_ACTION:  # an adoption vouches for every site's trust as it stood, whole
                trust = trust_states_of(json.loads(row.payload_json), row.id)
        prev = row.row_hash
    if keyed_seen:
        _compare_tables(session, expected, rep)
        _compare_trust(session, trust, rep)
    elif rep.entries:
        rep.notes.append(
            f"the chain holds no keyed entry ({rep.entries} unkeyed): a record from before the keyed chain, or one "
            "rewritten without the key whose heads file is gone; the server writes on it only after an admin's "
            "fedmed-audit-verify --adopt"
        )
    else:
        held = record_row_counts(session)
        if held:
            rep.problems.append(
                AuditProblem(
                    0,
                    f"the audit chain is empty but the record holds {_counts_str(held)}: the chain was emptied, or "
                    "the rows were written outside fedmed",
                )
            )
    _compare_heads(heads, chain_tag, macs, rep, keyed_seen)
    if site_keys is not None:
        _check_signatures(session, site_keys, rep)
    return rep


_BROKEN = {"adoptable": False}


def record_row_counts(session) -> dict[str, int]:
    """table -> number of rows, for every covered table (and site_trust) that holds any."""
    counts = {t: len(table_rows(session, t)) for t in _TABLES}
    counts["site_trust"] = len(site_trust_table(session))
    return {t: n for t, n in counts.items() if n}


def _counts_str(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {t} row(s)" for t, n in counts.items())


def extends(session, settings: AuditSettings, vouched: tuple) -> bool:
    """True when the chain still holds the entry `vouched` = (id, MAC) unchanged and everything after it is keyed,
    linked and MAC-verified (entries another keyed writer appended since). A writer that verified the record in full
    then needs only this; anything else (the entry gone or changed, a bad link or MAC) calls for the full verify()."""
    vouched_id, vouched_mac = vouched
    rows = session.scalars(select(AuditEntry).where(AuditEntry.id >= vouched_id).order_by(AuditEntry.id))
    prev = None
    for row in rows:
        if prev is None:
            if row.id != vouched_id or row.row_hash != vouched_mac:
                return False
        elif row.prev_hash != prev or row.scheme != SCHEME:
            return False
        elif not hmac.compare_digest(
            entry_mac(settings.key, row.prev_hash, row.created_at, row.action, row.payload_json), row.row_hash
        ):
            return False
        prev = row.row_hash
    return prev is not None


def _check_signatures(session, site_keys: dict, rep: AuditReport) -> None:
    from fedmed.security import signing  # only when asked: the record itself needs no signing keys

    rows = session.execute(
        select(
            ClientUpdate.id,
            ClientUpdate.round_num,
            ClientUpdate.signature,
            ClientUpdate.signed_digest,
            ClientUpdate.status,
            Site.name,
            Run.uid,
        )
        .join(Site, Site.id == ClientUpdate.site_id)
        .join(Run, Run.id == ClientUpdate.run_id)
        .order_by(ClientUpdate.id)
    ).all()
    unsigned = absent = 0
    for r in rows:
        if r.signature is None:
            # a `missing` row records a site that sent nothing (refused the job, gone): no update, so no signature
            absent += r.status == "missing"
            unsigned += r.status != "missing"
            continue
        rep.signatures_checked += 1
        where = f"({r.uid}, {r.round_num}, {r.name})"
        keys = site_keys.get(r.name)
        if keys is None:
            rep.problems.append(
                AuditProblem(r.id, f"{where} is signed but no public key of {r.name!r} is installed", "client_updates")
            )
            continue
        try:
            signing.verify(bytes.fromhex(r.signed_digest or ""), bytes.fromhex(r.signature), keys)
        except ValueError as e:  # SignatureError, or hex that is not hex
            rep.problems.append(AuditProblem(r.id, f"{where} signature check failed: {e}", "client_updates"))
    if unsigned:
        rep.notes.append(f"{unsigned} client update(s) carry no signature")
    if absent:
        rep.notes.append(f"{absent} row(s) record a site that sent no update (status missing): nothing to verify")


def _apply_entry(expected: dict, row, rep: AuditReport) -> None:
    payload = json.loads(row.payload_json)
    if row.action == MIGRATION_ACTION:  # every row re-vouched for as migrated: check the rows as they were, go on
        _check_before_migration(expected, row.id, payload, rep)
        expected.clear()
    if row.action == ADOPT_ACTION:  # an admin vouched for every row as it was (the entry names why): start from it
        expected.clear()
    if row.action == "record_round":  # a round is replaced whole: forget what an earlier entry said about it
        prefix = (payload["run"], payload["round"])
        for k in [k for k in expected if k[0] in ROUND_TABLES and k[1][:2] == prefix]:
            del expected[k]
    if row.action == "record_cross_site":  # a run's cross-site table is replaced whole, like a round
        for k in [k for k in expected if k[0] == "cross_site_results" and k[1][0] == payload["run"]]:
            del expected[k]
    for table, key, h in payload.get("rows", ()):
        expected[(table, tuple(key))] = (h, row.id)


def _check_before_migration(expected: dict, entry_id: int, payload: dict, rep: AuditReport) -> None:
    revision = payload.get("revision")
    before = {(t, tuple(k)): h for t, k, h in payload.get("previous", ())}
    for (table, key), (want, recorded_by) in sorted(expected.items(), key=lambda kv: kv[1][1]):
        got = before.pop((table, key), None)
        if got is None:
            rep.problems.append(
                AuditProblem(
                    recorded_by,
                    f"{table} row ({_key_str(key)}) recorded by this entry was "
                    f"missing when migration {revision} ran (audit entry "
                    f"{entry_id}): deleted",
                )
            )
        elif got != want:
            rep.problems.append(
                AuditProblem(
                    recorded_by,
                    f"{table} row ({_key_str(key)}) did not match what this "
                    f"entry recorded when migration {revision} ran (audit "
                    f"entry {entry_id}): edited before the migration",
                )
            )
    for table, key in sorted(before):
        rep.problems.append(
            AuditProblem(
                entry_id,
                f"{table} row ({_key_str(key)}) was covered by no audit entry when "
                f"migration {revision} ran: inserted outside the record",
            )
        )


def _compare_tables(session, expected: dict, rep: AuditReport) -> None:
    found = []
    for table in _TABLES:
        for r in table_rows(session, table):
            rep.rows_checked += 1
            want = expected.pop((table, r.key), None)
            if want is None:
                found.append(
                    (
                        0,
                        AuditProblem(
                            r.row_id,
                            f"({_key_str(r.key)}) is covered by no audit entry (inserted outside the record)",
                            table,
                        ),
                    )
                )
            elif want[0] != r.hash:
                found.append(
                    (
                        want[1],
                        AuditProblem(
                            r.row_id,
                            f"({_key_str(r.key)}) does not match what audit entry "
                            f"{want[1]} recorded (the row was edited)",
                            table,
                        ),
                    )
                )
    for (table, key), (_, entry_id) in expected.items():
        found.append(
            (
                entry_id,
                AuditProblem(entry_id, f"{table} row ({_key_str(key)}) recorded by this entry is missing (deleted)"),
            )
        )
    rep.problems.extend(p for _, p in sorted(found, key=lambda x: (x[0], x[1].table, x[1].row_id)))


def trust_states_of(payload: dict, entry_id: int) -> dict[str, tuple]:
    """site -> ((trust, quarantined, good_streak), entry_id) from one record_round payload."""
    return {
        str(site): ((float(value), bool(quarantined), int(streak)), entry_id)
        for site, value, quarantined, streak in payload.get("trust", ())
    }


def site_trust_table(session) -> dict[str, tuple]:
    """site -> (trust, quarantined, good_streak, row id) as the site_trust table holds it now."""
    rows = session.execute(
        select(
            Site.name,
            SiteTrustState.site_id,
            SiteTrustState.trust,
            SiteTrustState.quarantined,
            SiteTrustState.good_streak,
        ).join(SiteTrustState, SiteTrustState.site_id == Site.id)
    ).all()
    return {r.name: (float(r.trust), bool(r.quarantined), int(r.good_streak), r.site_id) for r in rows}


def trust_differences(table: dict[str, tuple], audited: dict[str, tuple]) -> list[tuple[str, int, str]]:
    """(site, audit entry id or 0, why) for each site whose site_trust row differs from the trust state the newest
    keyed record_round entry holds for it. site_trust is rewritten every round and read at the next job's start, so
    an edit there (lifting a quarantine, deleting a row to reset a site to initial trust) would otherwise go unseen."""
    out = []
    for site in sorted(set(table) | set(audited)):
        have, want = table.get(site), audited.get(site)
        if want is None:
            out.append((site, 0, "is covered by no audit entry (inserted outside the record)"))
        elif have is None:
            out.append((site, want[1], f"recorded by audit entry {want[1]} is missing (deleted)"))
        elif tuple(have[:3]) != want[0]:
            out.append(
                (
                    site,
                    want[1],
                    f"is (trust {have[0]:.4g}, quarantined {have[1]}, good streak {have[2]}) but audit entry "
                    f"{want[1]} recorded (trust {want[0][0]:.4g}, quarantined {want[0][1]}, good streak "
                    f"{want[0][2]}) (the row was edited)",
                )
            )
    return out


def _compare_trust(session, audited: dict, rep: AuditReport) -> None:
    table = site_trust_table(session)
    rep.rows_checked += len(table)
    for site, entry_id, why in trust_differences(table, audited):
        row_id = table[site][3] if site in table else entry_id
        rep.problems.append(AuditProblem(row_id, f"({site}) {why}", "site_trust" if site in table else "audit_log"))


def audited_trust(session, settings: AuditSettings) -> tuple[dict[str, tuple], list[str]]:
    """Each site's trust state as the newest MAC-verified record_round entry holds it, and what stands in the way of
    believing it (an entry whose MAC fails, newest entries deleted per the heads file). Cheaper than verify(): it
    reads only record_round entries and checks the MACs of those it uses."""
    problems: list[str] = []
    found: dict[str, tuple] = {}
    rows = session.scalars(
        select(AuditEntry)
        .where(AuditEntry.action.in_(("record_round", ADOPT_ACTION)), AuditEntry.scheme == SCHEME)
        .order_by(AuditEntry.id.desc())
    )
    for row in rows:
        states = trust_states_of(json.loads(row.payload_json), row.id)
        if row.action != ADOPT_ACTION and not set(states) - set(found):
            continue
        if not hmac.compare_digest(
            entry_mac(settings.key, row.prev_hash, row.created_at, row.action, row.payload_json), row.row_hash
        ):
            problems.append(f"audit entry {row.id} ({row.action}) fails its MAC: edited")
            continue
        for site, state in states.items():
            found.setdefault(site, state)
        if row.action == ADOPT_ACTION:  # every site as it stood then: nothing older counts
            break
    problems.extend(_tail_problems(session, settings))
    return found, problems


def _tail_problems(session, settings: AuditSettings) -> list[str]:
    if settings.heads_file is None or not Path(settings.heads_file).exists():
        return []
    tag = session.scalar(select(AuditEntry.row_hash).order_by(AuditEntry.id).limit(1))
    mine = [h for h in read_heads(settings.heads_file) if h["chain"] is not None and h["chain"] == tag]
    if not mine:
        return []
    newest = max(mine, key=lambda h: h["id"])
    mac = session.scalar(select(AuditEntry.row_hash).where(AuditEntry.id == newest["id"]))
    if mac is None:
        return [
            f"{settings.heads_file} records audit entry {newest['id']}, which is gone (the newest entries were deleted)"
        ]
    if mac != newest["mac"]:
        return [f"audit entry {newest['id']} differs from {settings.heads_file} (entry replaced)"]
    return []


def _compare_heads(
    snapshot: HeadsSnapshot, chain_tag: Optional[str], macs: dict, rep: AuditReport, keyed: bool = True
) -> None:
    path, heads = snapshot.path, snapshot.heads
    if path is None:
        rep.notes.append("no heads file configured: deleting the newest entries cannot be detected")
        return
    if heads is None and snapshot.error is None:
        if keyed:
            rep.problems.append(
                AuditProblem(0, f"heads file {path} is missing (it gets a line at every keyed write)", "heads_file")
            )
        return
    if snapshot.error is not None:
        why = f"heads file {path} cannot be read ({type(snapshot.error).__name__})"
        if macs:
            rep.problems.append(AuditProblem(0, why, "heads_file"))
        else:
            rep.notes.append(why)
        return
    mine = [h for h in heads if h["chain"] is not None and h["chain"] == chain_tag]
    other = [h for h in heads if h["chain"] != chain_tag]
    if other and chain_tag is None:
        rep.problems.append(
            AuditProblem(
                0,
                f"the audit chain is empty but {path} records {len(other)} head(s): the record was emptied, or this "
                f"is a new database beside another record's heads file (give it its own ${ENV_AUDIT_HEADS})",
                "heads_file",
            )
        )
        return
    readable = [h for h in other if h["chain"] is not None]
    if readable and not mine:
        # Every keyed write appends its head: a chain none of whose heads is here is not the chain that was written
        # (rewritten as unkeyed entries, or re-keyed), unless the heads file belongs to another record.
        what = "holds no keyed entry" if not keyed else "has no head in it"
        rep.problems.append(
            AuditProblem(
                0,
                f"the audit chain {what}, but {path} records {len(readable)} keyed head(s) of another chain (up to "
                f"entry {max(h['id'] for h in readable)}): the chain was rewritten (a downgrade to unkeyed entries, "
                "or recomputed), or this heads file is another record's (give --heads for this record's own)",
                "heads_file",
            )
        )
        return
    if other:
        rep.notes.append(f"{len(other)} line(s) of {path} belong to other chains or are unreadable")
    for h in mine:
        rep.heads_checked += 1
        if h["id"] not in macs:
            rep.problems.append(
                AuditProblem(
                    h["id"],
                    f"missing: {path} line {h['line']} records entry {h['id']}, "
                    f"the chain ends at {max(macs)} (the newest entries were deleted)",
                    **_BROKEN,
                )
            )
            return
        if macs[h["id"]] != h["mac"]:
            rep.problems.append(
                AuditProblem(h["id"], f"MAC differs from {path} line {h['line']} (entry replaced)", **_BROKEN)
            )
            return
