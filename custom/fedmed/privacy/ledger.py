"""A hospital's lifetime privacy ledger: every DP release made from its images, across all jobs, in one file.

Pure core (no NVFlare). The file is JSON lines in the site kit's local/ folder (its path comes from the site's own
config or kit, never from a job). Each line is one charge: the RDP history of what was (or is about to be) released,
as Opacus' RDPAccountant keeps it ((noise_multiplier, sample_rate, steps) entries), so composing all jobs is exact
RDP composition, not a sum of epsilons.

Per image and per patient (format 2). A charge names the identity set it touched (fedmed.privacy.identity: one
pseudonymous token tuple per image: its pixels, its SOPInstanceUID, its patient), by digest; the set itself is
stored once, in <ledger>.identities/<digest>.json. Images that share any token are one identity (so every image of
a patient is one), and an identity's lifetime spend is the composition of every charge that touched any of its
images. The ceiling holds for the most-charged identity of the dataset a round reads: a re-tagged, re-exported,
subset or superset dataset composes with what its images and patients already spent.

The chain (format 2). `prev` is the sha256 of the previous line's bytes and `mac` an HMAC-SHA256 of the line's
fields under the site's ledger key (<ledger>.key, created on first use, mode 0600, which also keys the identity
tokens), so a torn write, a flipped byte, an edited line or a chain recomputed without the key is found by
verify(). <ledger>.head records the entry count and the newest line's hash, under the same key: a deleted ledger,
or one whose newest lines were removed, no longer matches it. Whoever holds the key can still rewrite all three;
head_report() is the small value a site puts into each signed update so that such a reset shows in the federation's
record too (head_extends() is the server's check, run by fedmed.server.anchors).

Charge once per (run, round). A charge carries a key (run, round, mechanism). A resumed run's job that charges a
key one of the run's earlier jobs charged, with the same parameters, writes a zero-cost `replay_of` line and
returns the recorded charge; other parameters are refused (ChargeConflict). One free replay per key, ever: a
re-trained round releases a second, freshly noised update, so a server that crashes on purpose gains at most one
extra release per round (docs/THREAT_MODEL.md).

Format 1 ledgers (sha256 chain, a dataset keyed on its files' bytes) stay readable; a site's first format-2 use adds
the key and head file. Format-1 charges cannot be traced to images, so each counts against every identity (the
safe side). A format-1 line after a format-2 one is refused (no downgrade).

A charge is written (and fsynced) before the data is trained on, under an exclusive lock, after checking the
lifetime ceiling: a crash after the charge can only over-count, never under-count, and two jobs at one site cannot
both pass the check on the same remaining budget. A damaged ledger refuses every further charge until the privacy
officer has looked at it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

from fedmed.privacy.accounting import BudgetExceeded, HistoryEntry, epsilon_of
from fedmed.privacy.identity import IdentitySet, dataset_identities

LEDGER_FILENAME = "privacy_ledger.jsonl"  # default place: <site kit>/local/
GENESIS = "0" * 64  # `prev` of the first line
FORMAT = 2
LEGACY_FORMAT = 1
MECHANISMS = ("dp_sgd", "user_level")
Dataset = Union[IdentitySet, str]  # a str names an opaque dataset (IdentitySet.named)


class LedgerError(RuntimeError):
    """The ledger file is damaged or unreadable; the message names the line. Nothing more is charged to it."""


class ChargeConflict(LedgerError):
    """A (run, round, mechanism) already charged is charged again with other parameters; nothing was written."""


class LifetimeBudgetExceeded(BudgetExceeded):
    """The charge would take an image or patient past its lifetime epsilon ceiling; nothing was written."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _canonical(fields: dict) -> bytes:
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def _as_identities(dataset: Dataset) -> IdentitySet:
    return dataset if isinstance(dataset, IdentitySet) else IdentitySet.named(str(dataset))


def _read_all(fd: int) -> bytes:
    """The whole file from its start, whatever the descriptor's offset (it is shared with its dups)."""
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def _fsync_dir(path: Path) -> None:
    dfd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


@dataclass(frozen=True)
class LedgerKey:
    """The site's ledger key: MACs the chain and the head file, and keys the identity tokens (derived subkeys)."""

    secret: bytes

    @property
    def key_id(self) -> str:
        return _sha256(b"fedmed-ledger-key-id\x00" + self.secret)[:16]

    def _sub(self, purpose: bytes) -> bytes:
        return hmac.new(self.secret, purpose, hashlib.sha256).digest()

    def mac(self, data: bytes) -> str:
        return hmac.new(self._sub(b"fedmed-ledger-mac"), data, hashlib.sha256).hexdigest()

    @property
    def identity_key(self) -> bytes:
        return self._sub(b"fedmed-ledger-identity")


def _load_key(path: Path) -> Optional[LedgerKey]:
    if not path.exists():
        return None
    try:
        secret = bytes.fromhex(path.read_text().strip())
    except (OSError, ValueError) as e:
        raise LedgerError(f"{path}: the ledger key is unreadable ({e})") from e
    if len(secret) != 32:
        raise LedgerError(f"{path}: the ledger key must be 32 bytes of hex, has {len(secret)} bytes")
    return LedgerKey(secret)


@dataclass(frozen=True)
class LedgerEntry:
    seq: int
    prev: str
    dataset: str  # format 2: the digest of the identity set charged; format 1: the file-bytes fingerprint
    job_id: str
    round: int
    mechanism: str  # "dp_sgd" (example-level DP-SGD) or "user_level" (UpdateNoiseFilter's Gaussian mechanism)
    history: tuple  # ((noise_multiplier, sample_rate, steps), ...) at the example level, composed for the ceiling
    delta: float
    epsilon_after: float  # the most-charged identity's lifetime epsilon at delta once this entry counts
    lifetime_ceiling: Optional[float]
    recorded_at: float
    details: dict = field(default_factory=dict)
    hash: str = ""  # format 1: sha256 of the fields; format 2: HMAC-SHA256 under the ledger key
    format: int = FORMAT
    charge_key: Optional[str] = None  # "<run>/<round>/<mechanism>": what a resumed run's job does not charge again
    replay_of: Optional[int] = None  # a zero-cost line: this key was charged at entry `replay_of`
    key_id: Optional[str] = None

    def fields(self) -> dict:
        base = {
            "format": self.format,
            "seq": self.seq,
            "prev": self.prev,
            "job_id": self.job_id,
            "round": self.round,
            "mechanism": self.mechanism,
            "history": [list(h) for h in self.history],
            "delta": self.delta,
            "epsilon_after": self.epsilon_after,
            "lifetime_ceiling": self.lifetime_ceiling,
            "recorded_at": self.recorded_at,
            "details": self.details,
        }
        if self.format == LEGACY_FORMAT:
            return {**base, "dataset": self.dataset}
        return {
            **base,
            "identities": self.dataset,
            "charge_key": self.charge_key,
            "replay_of": self.replay_of,
            "key_id": self.key_id,
        }

    def line(self) -> bytes:
        return _canonical({**self.fields(), "hash" if self.format == LEGACY_FORMAT else "mac": self.hash})


def _parse_line(
    raw: bytes, lineno: int, prev: str, keyed_before: bool, key: Optional[LedgerKey], ledger
) -> LedgerEntry:
    where = f"{ledger.path} line {lineno}"
    try:
        d = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LedgerError(f"{where}: not a JSON object (torn or edited line?): {e}") from e
    if not isinstance(d, dict) or d.get("format") not in (LEGACY_FORMAT, FORMAT):
        raise LedgerError(f"{where}: not a fedmed ledger entry of format {LEGACY_FORMAT} or {FORMAT}")
    fmt = d["format"]
    if fmt == LEGACY_FORMAT:
        if keyed_before:
            raise LedgerError(
                f"{where}: an unkeyed (format 1) line after keyed lines: a keyed ledger never goes back to unkeyed "
                "entries, so the line was written or rewritten by something other than fedmed"
            )
        claimed = d.pop("hash", None)
        if claimed != _sha256(_canonical(d)):
            raise LedgerError(f"{where}: its hash does not match its content (the line was edited or damaged)")
    else:
        claimed = d.pop("mac", None)
        if key is None:
            raise LedgerError(
                f"{where}: a keyed entry, but the ledger's key {ledger.key_path} is missing, so the chain cannot be "
                "checked (restore the key from the site's backup)"
            )
        if d.get("key_id") != key.key_id:
            raise LedgerError(
                f"{where}: written under ledger key {d.get('key_id')!r}, but {ledger.key_path} is key {key.key_id!r}"
            )
        if not isinstance(claimed, str) or not hmac.compare_digest(claimed, key.mac(_canonical(d))):
            raise LedgerError(
                f"{where}: its MAC does not match its content (the line was edited, or re-hashed without the "
                "ledger's key, or damaged)"
            )
    if d.get("prev") != prev:
        raise LedgerError(
            f"{where}: 'prev' does not match the sha256 of line {lineno - 1} (a line before it was "
            "edited, removed or inserted)"
        )
    if d.get("seq") != lineno:
        raise LedgerError(f"{where}: sequence number {d.get('seq')!r}, expected {lineno}")
    try:
        history = tuple((float(s), float(q), int(n)) for s, q, n in d["history"])
        entry = LedgerEntry(
            lineno,
            prev,
            str(d["dataset"] if fmt == LEGACY_FORMAT else d["identities"]),
            str(d["job_id"]),
            int(d["round"]),
            str(d["mechanism"]),
            history,
            float(d["delta"]),
            float(d["epsilon_after"]),
            None if d["lifetime_ceiling"] is None else float(d["lifetime_ceiling"]),
            float(d["recorded_at"]),
            dict(d.get("details") or {}),
            claimed,
            fmt,
            None if d.get("charge_key") is None else str(d["charge_key"]),
            None if d.get("replay_of") is None else int(d["replay_of"]),
            d.get("key_id"),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise LedgerError(f"{where}: malformed field ({e!r})") from e
    if entry.mechanism not in MECHANISMS:
        raise LedgerError(f"{where}: unknown mechanism {entry.mechanism!r}")
    if not entry.history and entry.replay_of is None:
        raise LedgerError(f"{where}: a charge with no history")
    return entry


@dataclass(frozen=True)
class ChargeTag:
    """What a charge records beside its spend: details (the mechanism's parameters, shown to the officer), and
    its key (run, round, mechanism) with the run's earlier jobs, which decide a resumed round's free replay."""

    details: Optional[dict] = None
    charge_key: Optional[str] = None
    resumes: Sequence[str] = ()


@dataclass(frozen=True)
class LedgerHead:
    """What a site reports of its ledger to the federation (in its signed update): how many entries, the newest
    line's sha256, the lifetime epsilon of the dataset this job reads, and (when asked for the count the server
    recorded before) the hash its line at that count has now."""

    entries: int
    head: str
    lifetime_epsilon: float
    at_previous: Optional[tuple[int, str]] = None  # (count, sha256 of the line at that count; GENESIS for 0)

    def to_wire(self) -> dict:
        return {
            "entries": self.entries,
            "head": self.head,
            "lifetime_epsilon": self.lifetime_epsilon,
            "at_previous": list(self.at_previous) if self.at_previous else None,
        }

    @classmethod
    def from_wire(cls, raw) -> "LedgerHead":
        try:
            at = raw.get("at_previous")
            head = cls(
                int(raw["entries"]),
                str(raw["head"]),
                float(raw["lifetime_epsilon"]),
                (int(at[0]), str(at[1])) if at else None,
            )
        except (AttributeError, KeyError, TypeError, ValueError, IndexError) as e:
            raise ValueError(f"not a ledger head report: {str(raw)[:200]} ({e!r})") from e
        hashes = [head.head] + ([head.at_previous[1]] if head.at_previous else [])
        if head.entries < 0 or not all(len(h) == 64 and all(c in "0123456789abcdef" for c in h) for h in hashes):
            raise ValueError("not a ledger head report: an entry count below 0 or a hash that is not sha256 hex")
        if not 0 <= head.lifetime_epsilon < float("inf"):
            raise ValueError(f"not a ledger head report: lifetime epsilon {head.lifetime_epsilon}")
        return head


def head_extends(previous: Optional[LedgerHead], new: LedgerHead) -> Optional[str]:
    """None when `new` can be the same ledger as `previous` grown by appends, else why not (for the server's alert:
    a site whose ledger was deleted, truncated or rewritten since its last report)."""
    if previous is None:
        return None
    if new.entries < previous.entries:
        return (
            f"the site's privacy ledger holds {new.entries} entries, {previous.entries} before: it was deleted, "
            "truncated or replaced"
        )
    if new.entries == previous.entries:
        return (
            None
            if new.head == previous.head
            else (
                f"the site's privacy ledger holds {new.entries} entries, as it reported before, but entry "
                f"{new.entries} is another line: its newest line(s) were removed and charged again, or it was "
                "rewritten"
            )
        )
    if new.at_previous is None or new.at_previous[0] != previous.entries:
        return (
            f"the site's report does not say what its ledger's entry {previous.entries} is now, so it cannot be "
            "shown to extend the ledger it reported before"
        )
    if new.at_previous[1] != previous.head:
        return (
            f"the site's privacy ledger entry {previous.entries} is not the one it reported before: the ledger was "
            "rewritten (its lines edited and re-MACed with its key) or replaced"
        )
    return None


class _Spend:
    """Which charges touched which identity: images sharing any token are joined (union-find), and each joined
    identity composes every charge whose identity set holds one of its images."""

    def __init__(self, entries: Sequence[LedgerEntry], sets: dict[str, IdentitySet], current: Optional[IdentitySet]):
        self._parent: dict[str, str] = {}
        all_sets = dict(sets)
        if current is not None:
            all_sets[current.digest] = current
        for s in all_sets.values():
            for img in s.images:
                root = self._find(img[0])
                for t in img[1:]:
                    other = self._find(t)
                    if other != root:
                        self._parent[other] = root
        self.legacy = [e for e in entries if e.format == LEGACY_FORMAT]  # untraceable: against every identity
        self._by_set = {d: [e for e in entries if e.format == FORMAT and e.dataset == d] for d in sets}
        # root -> the identity sets that hold one of its images (few per root, whatever the number of images)
        self._sets_of_root: dict[str, set[str]] = {}
        for digest, s in sets.items():
            for root in self.roots(s):
                self._sets_of_root.setdefault(root, set()).add(digest)

    def _find(self, t: str) -> str:
        self._parent.setdefault(t, t)
        while self._parent[t] != t:
            self._parent[t] = self._parent[self._parent[t]]
            t = self._parent[t]
        return t

    def roots(self, s: IdentitySet) -> set[str]:
        return {self._find(img[0]) for img in s.images}

    def _charges(self, digests: frozenset) -> list[LedgerEntry]:
        return self.legacy + [e for d in sorted(digests) for e in self._by_set[d]]

    def worst(self, s: IdentitySet, delta: float, extra: Sequence[HistoryEntry] = ()) -> tuple[float, list]:
        """(the highest lifetime epsilon of any identity in s with `extra` added, that identity's charges)."""
        best, best_charges, memo = 0.0, list(self.legacy), {}
        for root in self.roots(s):
            digests = frozenset(self._sets_of_root.get(root, ()))
            if digests not in memo:  # identities charged by the same sets spent the same
                charges = self._charges(digests)
                memo[digests] = (epsilon_of([h for e in charges for h in e.history] + list(extra), delta), charges)
            if memo[digests][0] > best:
                best, best_charges = memo[digests]
        return best, best_charges


class PrivacyLedger:
    """The append-only ledger file of one hospital (all its datasets), with its key, head file and identity index
    beside it: <stem>.key, <stem>.head and <stem>.identities/ (stem: the ledger's name without .jsonl)."""

    def __init__(self, path: Path, key_path: Optional[Path] = None):
        self.path = Path(path)
        self.key_path = Path(key_path) if key_path else self.path.with_suffix(".key")
        self.heads_path = self.path.with_suffix(".head")
        self.index_dir = self.path.with_suffix(".identities")
        self._sets: dict[str, IdentitySet] = {}

    # -- reading -------------------------------------------------------------------------------------------------

    def _parse(self, data: bytes, key: Optional[LedgerKey]) -> list[LedgerEntry]:
        if data and not data.endswith(b"\n"):
            raise LedgerError(
                f"{self.path}: the last line is incomplete (a write was torn); "
                "nothing more is charged until the privacy officer has checked the ledger"
            )
        entries, prev = [], GENESIS
        for i, raw in enumerate(data.split(b"\n")[:-1] if data else [], start=1):
            entry = _parse_line(raw, i, prev, bool(entries) and entries[-1].format == FORMAT, key, self)
            entries.append(entry)
            prev = _sha256(raw)
        return entries

    def _check_heads(self, heads: Optional[bytes], data: bytes, entries: list, key: Optional[LedgerKey]) -> None:
        if heads is None:
            if key is not None:
                raise LedgerError(
                    f"{self.heads_path} is missing while the ledger is keyed ({self.key_path} exists): the ledger "
                    "cannot be shown to be whole (deleted with its head file, or replaced)"
                )
            return
        if key is None:
            raise LedgerError(f"{self.heads_path} exists but the ledger's key {self.key_path} is missing")
        try:
            raw = json.loads(heads)
            mac = raw.pop("mac")
            count, head = int(raw["entries"]), str(raw["head"])
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise LedgerError(f"{self.heads_path}: not a ledger head file ({e!r})") from e
        if raw.get("key_id") != key.key_id or not hmac.compare_digest(str(mac), key.mac(_canonical(raw))):
            raise LedgerError(f"{self.heads_path}: its MAC does not match (edited, or written under another key)")
        if len(entries) < count:
            what = "is missing or empty" if not data else f"holds {len(entries)} entries"
            raise LedgerError(
                f"{self.path} {what}, but its head file records {count}: the ledger was deleted, or its newest "
                f"line(s) removed"
            )
        if count and _sha256(data.split(b"\n")[count - 1]) != head:
            raise LedgerError(
                f"{self.path} entry {count} is not the one its head file records: the ledger was rewritten"
            )

    def _load(self) -> tuple[list[LedgerEntry], bytes]:
        # Under a shared lock: a writer changes the ledger, its head file and (once) the key under the exclusive one.
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            fd = None
        try:
            if fd is not None:
                fcntl.flock(fd, fcntl.LOCK_SH)
            heads = self.heads_path.read_bytes() if self.heads_path.exists() else None
            key = _load_key(self.key_path)
            data = b""
            if fd is not None:
                data = _read_all(fd)
        finally:
            if fd is not None:
                os.close(fd)
        entries = self._parse(data, key)
        self._check_heads(heads, data, entries, key)
        return entries, data

    def entries(self) -> list[LedgerEntry]:
        """Every entry, chain and head file verified; raises LedgerError naming the first problem. A ledger never
        used (no file, no key, no head file) is empty."""
        return self._load()[0]

    def verify(self) -> Optional[str]:
        """None if the ledger is whole (and every identity set its entries name is there), else what is wrong."""
        try:
            entries = self.entries()
            self._sets_of(entries)
        except (LedgerError, OSError) as e:
            return str(e)
        return None

    def head(self) -> str:
        """sha256 of the last line (GENESIS for an empty ledger): what a privacy officer records to pin the file."""
        data = self.path.read_bytes() if self.path.exists() else b""
        lines = data.split(b"\n")[:-1] if data.endswith(b"\n") else []
        return _sha256(lines[-1]) if lines else GENESIS

    def identity_set(self, digest: str) -> IdentitySet:
        """The identity set an entry names, from the index (checked against its digest)."""
        if digest not in self._sets:
            path = self.index_dir / f"{digest}.json"
            try:
                raw = path.read_bytes()
            except FileNotFoundError as e:
                raise LedgerError(
                    f"{path} is missing: the ledger's charges to identity set {digest[:12]} cannot be traced to "
                    "images (restore it from the site's backup)"
                ) from e
            if _sha256(raw) != digest:
                raise LedgerError(f"{path} does not match its digest (edited or damaged)")
            self._sets[digest] = IdentitySet.of(json.loads(raw))
        return self._sets[digest]

    def _sets_of(self, entries: Sequence[LedgerEntry]) -> dict[str, IdentitySet]:
        return {d: self.identity_set(d) for d in dict.fromkeys(e.dataset for e in entries if e.format == FORMAT)}

    def spend(self, entries: Optional[Sequence[LedgerEntry]] = None, current: Optional[IdentitySet] = None):
        """Who spent what: the identities of every charged set (and `current`), joined, with their charges."""
        entries = self.entries() if entries is None else entries
        return _Spend(entries, self._sets_of(entries), current)

    def lifetime_epsilon(self, dataset: Dataset, delta: float, extra: Sequence[HistoryEntry] = ()) -> float:
        """The lifetime epsilon of the dataset's most-charged image or patient, with `extra` added."""
        s = _as_identities(dataset)
        return self.spend(current=s).worst(s, delta, extra)[0]

    def check(self, dataset: Dataset, history: Sequence[HistoryEntry], delta: float, ceiling: Optional[float]) -> float:
        """The lifetime epsilon the dataset's most-charged identity would reach with `history` added; raises
        LifetimeBudgetExceeded past the ceiling. Writes nothing (the pre-training check of a round)."""
        entries = self.entries()
        return self._check(entries, _as_identities(dataset), history, delta, ceiling)

    def _check(self, entries, s: IdentitySet, history, delta, ceiling) -> float:
        spend = self.spend(entries, s)
        before, _ = spend.worst(s, delta)
        after, charges = spend.worst(s, delta, history)
        if ceiling is not None and after > ceiling * (1 + 1e-6):
            jobs = sorted({e.job_id for e in charges})
            raise LifetimeBudgetExceeded(
                f"lifetime privacy budget: this round would bring the lifetime epsilon of the most-charged image or "
                f"patient of dataset {s.digest[:12]} ({s.describe()}) from {before:.3f} to {after:.3f} (delta {delta}), over "
                f"the site's lifetime ceiling {ceiling}; {len(jobs)} earlier job(s) charged its images ({self.path})"
            )
        return after

    # -- writing -------------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        created = not self.path.exists()
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if created:  # make the new file's directory entry durable too
                _fsync_dir(self.path.parent)
            yield fd
        finally:
            os.close(fd)  # releases the lock

    def _write_heads(self, key: LedgerKey, data: bytes) -> None:
        lines = data.split(b"\n")[:-1] if data else []
        fields = {"entries": len(lines), "head": _sha256(lines[-1]) if lines else GENESIS, "key_id": key.key_id}
        _write_atomic(self.heads_path, _canonical({**fields, "mac": key.mac(_canonical(fields))}))

    def _key_locked(self, fd) -> LedgerKey:
        """The ledger's key, created (with the head file) on first use; call under the lock."""
        key = _load_key(self.key_path)
        if key is not None:
            return key
        data = _read_all(fd)
        entries = self._parse(data, None)  # raises on keyed lines: their key is gone, a new one would not do
        if self.heads_path.exists():
            raise LedgerError(
                f"{self.key_path} is missing but {self.heads_path} exists: the ledger's key was removed; restore it "
                "from the site's backup (a new key would cut the ledger's history off)"
            )
        key = LedgerKey(secrets.token_bytes(32))
        tmp = self.key_path.with_name(f".{self.key_path.name}.{secrets.token_hex(4)}.tmp")
        tfd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(tfd, key.secret.hex().encode() + b"\n")
            os.fsync(tfd)
        finally:
            os.close(tfd)
        try:
            os.link(tmp, self.key_path)  # never replaces a key another process made meanwhile
        finally:
            os.unlink(tmp)
        _fsync_dir(self.key_path.parent)
        self._write_heads(key, data if entries else b"")
        return key

    def open_key(self) -> LedgerKey:
        """The site's ledger key, created on first use (mode 0600, with the head file)."""
        with self._locked() as fd:
            return self._key_locked(fd)

    def dataset_identities(self, images: Iterable[tuple[Path, Optional[str]]]) -> IdentitySet:
        """The pseudonymous identities of (image path, patient id or None) pairs under this ledger's key."""
        return dataset_identities(images, self.open_key().identity_key)

    def _store_set(self, s: IdentitySet) -> None:
        path = self.index_dir / f"{s.digest}.json"
        if not path.exists():
            self.index_dir.mkdir(mode=0o700, exist_ok=True)
            _write_atomic(path, IdentitySet.canonical(s.images))
        self._sets[s.digest] = s

    def charge(
        self,
        dataset: Dataset,
        job_id: str,
        round_num: int,
        mechanism: str,
        history: Sequence[HistoryEntry],
        delta: float,
        ceiling: Optional[float],
        tag: Optional["ChargeTag"] = None,
    ) -> LedgerEntry:
        """Check the lifetime ceiling and append one entry, fsynced, under an exclusive lock (so concurrent jobs
        at the site are serialised). Raises LifetimeBudgetExceeded (nothing written) or LedgerError.

        tag (ChargeTag): the entry's details, and its charge key: a job resuming a run (tag.resumes: the run's
        earlier jobs) that charges a key one of those jobs charged gets the recorded charge back and a zero-cost
        replay line, once per key (module docstring); with other parameters it raises ChargeConflict."""
        tag = tag or ChargeTag()
        details, charge_key, resumes = tag.details, tag.charge_key, tag.resumes
        if mechanism not in MECHANISMS:
            raise ValueError(f"mechanism must be one of {MECHANISMS}, got {mechanism!r}")
        history = tuple((float(s), float(q), int(n)) for s, q, n in history)
        if not history or any(not (s > 0 and 0 < q <= 1 and n >= 1) for s, q, n in history):
            raise ValueError(f"ledger history entries must be (sigma > 0, 0 < q <= 1, steps >= 1), got {history}")
        s = _as_identities(dataset)
        with self._locked() as fd:
            key = self._key_locked(fd)
            heads = self.heads_path.read_bytes() if self.heads_path.exists() else None
            data = _read_all(fd)
            entries = self._parse(data, key)
            self._check_heads(heads, data, entries, key)
            replayed = self._replay(entries, s, mechanism, history, float(delta), charge_key, resumes)
            if replayed is not None:
                after = self.spend(entries, s).worst(s, delta)[0]
                history, replay_of = (), replayed.seq
            else:
                after = self._check(entries, s, history, delta, ceiling)
                replay_of = None
            self._store_set(s)  # before the line that names it; after the check, so a refusal writes nothing
            entry = LedgerEntry(
                len(entries) + 1,
                _sha256(data.split(b"\n")[-2]) if entries else GENESIS,
                s.digest,
                str(job_id),
                int(round_num),
                mechanism,
                history,
                float(delta),
                after,
                ceiling,
                time.time(),
                dict(details or {}),
                format=FORMAT,
                charge_key=charge_key,
                replay_of=replay_of,
                key_id=key.key_id,
            )
            entry = LedgerEntry(**{**entry.__dict__, "hash": key.mac(_canonical(entry.fields()))})
            line = entry.line() + b"\n"
            os.write(fd, line)
            os.fsync(fd)
            self._write_heads(key, data + line)
        return replayed if replayed is not None else entry

    @staticmethod
    def _replay(entries, s, mechanism, history, delta, charge_key, resumes) -> Optional[LedgerEntry]:
        """The earlier charge of this key by one of the run's earlier jobs, if this charge repeats it for free."""
        if not charge_key or not resumes:
            return None
        if any(e.replay_of is not None for e in entries if e.charge_key == charge_key):
            return None  # the one free replay of this key is used: charged in full
        earlier = [e for e in entries if e.charge_key == charge_key and e.replay_of is None and e.job_id in resumes]
        if not earlier:
            return None
        first = earlier[0]
        if (first.dataset, first.mechanism, first.history, first.delta) != (s.digest, mechanism, history, delta):
            raise ChargeConflict(
                f"{charge_key} was charged by job {first.job_id} (entry {first.seq}) with identity set "
                f"{first.dataset[:12]}, {first.mechanism} {list(first.history)}, delta {first.delta}; this job "
                f"charges {s.digest[:12]}, {mechanism} {list(history)}, delta {delta}: a resumed round must repeat "
                "what was charged (same images, same DP parameters), so it is refused"
            )
        return first

    def replays(self, dataset: Dataset, mechanism: str, history, delta: float, charge_key: str, resumes) -> bool:
        """Whether charge() with these arguments would be a free replay; writes nothing, raises ChargeConflict as
        charge() would."""
        history = tuple((float(s), float(q), int(n)) for s, q, n in history)
        s = _as_identities(dataset)
        return self._replay(self.entries(), s, mechanism, history, float(delta), charge_key, resumes) is not None

    def head_report(self, dataset: Dataset, delta: float, previous_count: Optional[int] = None) -> LedgerHead:
        """The value a site puts into its signed update (LedgerHead); previous_count: the entry count the server
        recorded last, so the report proves (or fails to prove) that this ledger extends that one."""
        entries, data = self._load()
        s = _as_identities(dataset)
        lines = data.split(b"\n")[:-1] if data else []
        at = None
        if previous_count is not None and 0 <= previous_count <= len(lines):
            at = (previous_count, _sha256(lines[previous_count - 1]) if previous_count else GENESIS)
        head = _sha256(lines[-1]) if lines else GENESIS
        return LedgerHead(len(entries), head, self.spend(entries, s).worst(s, delta)[0], at)


@dataclass
class LedgerBinding:
    """What a site's trainer and result filter need to charge one dataset: its ledger, the dataset's identities,
    the job, and the dataset's lifetime ceiling and delta (from the site's own config). continue_run() names the
    run's earlier jobs when this job resumes a run, which keys its charges to the run, not to this job."""

    ledger: PrivacyLedger
    dataset: Dataset
    job_id: str
    delta: float
    lifetime_ceiling: Optional[float]
    run: str = ""  # a random id of this job process: tells apart runs that share a job id (the simulator's)
    resumes: tuple = ()  # the run's earlier jobs, first to last, when this job resumes a run

    @property
    def identities(self) -> IdentitySet:
        return _as_identities(self.dataset)

    def continue_run(self, earlier_jobs) -> None:
        """This job continues a run whose earlier jobs are `earlier_jobs` (the global model's meta; None or
        empty: a new run). Anything but a list of job-id strings is ignored: it can only make charges fresh."""
        if isinstance(earlier_jobs, (list, tuple)) and earlier_jobs and all(isinstance(j, str) for j in earlier_jobs):
            self.resumes = tuple(earlier_jobs)

    def charge_key(self, round_num: int, mechanism: str) -> str:
        run = self.resumes[0] if self.resumes else self.job_id  # the run's first job names the run
        return f"{run}/{int(round_num)}/{mechanism}"

    def check(self, history: Sequence[HistoryEntry]) -> float:
        return self.ledger.check(self.dataset, history, self.delta, self.lifetime_ceiling)

    def check_round(self, round_num: int, releases: dict) -> float:
        """check() of what a round will release, by mechanism ({"dp_sgd": [...], "user_level": [...]}), leaving
        out what charge() would replay free (a resumed run's round its earlier job charged), so the pre-training
        check refuses exactly what the charge would."""
        history = [
            h
            for mechanism, hist in releases.items()
            if hist
            and not self.ledger.replays(
                self.dataset, mechanism, hist, self.delta, self.charge_key(round_num, mechanism), self.resumes
            )
            for h in hist
        ]
        return self.check(history)

    def charge(
        self, round_num: int, mechanism: str, history: Sequence[HistoryEntry], details: Optional[dict] = None
    ) -> LedgerEntry:
        return self.ledger.charge(
            self.dataset,
            self.job_id,
            round_num,
            mechanism,
            history,
            self.delta,
            self.lifetime_ceiling,
            ChargeTag({**(details or {}), "run": self.run}, self.charge_key(round_num, mechanism), self.resumes),
        )

    def lifetime_epsilon(self) -> float:
        return self.ledger.lifetime_epsilon(self.dataset, self.delta)

    def head_report(self, previous_count: Optional[int] = None) -> LedgerHead:
        return self.ledger.head_report(self.dataset, self.delta, previous_count)

    def history_of_jobs(self, job_ids: Sequence[str], mechanism: str) -> list[HistoryEntry]:
        """What these jobs charged to this dataset by this mechanism (e.g. a resumed run's earlier jobs), in order."""
        jobs = {str(j) for j in job_ids}
        digest = self.identities.digest
        return [
            h
            for e in self.ledger.entries()
            if e.dataset == digest and e.job_id in jobs and e.mechanism == mechanism
            for h in e.history
        ]


def user_level_example_history(clip_norm: float, noise_std: float) -> HistoryEntry:
    """One UpdateNoiseFilter round as an example-level RDP entry: the released update is the reference plus a delta
    clipped to norm C, so changing anything in the site's data (one image included) moves it by at most 2C; with
    noise std s that is the Gaussian mechanism with noise multiplier s / (2C), sampled with rate 1, once."""
    return (noise_std / (2.0 * clip_norm), 1.0, 1)
