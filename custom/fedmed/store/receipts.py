"""Receipts: the audit chain's head as a hospital saw it, an anchor the server operator does not hold.

The server operator holds the audit key and the heads file, so together with the database they can rewrite the
record and its chain and still pass fedmed-audit-verify. A receipt is the chain head (run, round, chain tag, audit
entry id, MAC) after a round, signed by the server's signing key (fedmed.security.signing, purpose RECEIPT_PURPOSE); each
hospital checks it against the server's public key in its kit and appends it to its own receipt log,
`local/audit_receipts.jsonl` (one canonical JSON object a line, fsynced, under an fcntl lock). `fedmed-audit-verify
--receipts DIR` then checks the record against every receipt log in DIR (copied from any hospital): a record
rewritten after the hospital saw it no longer holds the MAC the hospital kept. A receipt signed by another key is
reported too, so a hospital cannot frame the server with a made-up one.

Log line: {"chain": <first entry's MAC>, "entry": <audit entry id>, "mac": <its MAC>, "round": <round from 1>,
"run": <run uid>, "signature": <hex fedmed.security.signing signature over receipt_digest>}.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from sqlalchemy import select

from fedmed.security import signing
from fedmed.store.audit import AuditProblem, canonical_json
from fedmed.store.models import AuditEntry

RECEIPTS_FILE = "audit_receipts.jsonl"
RECEIPT_PURPOSE = b"audit-receipt"


@dataclass(frozen=True)
class ChainHead:
    chain: str  # the chain's tag: its first entry's MAC (as the heads file names it)
    entry: int
    mac: str


@dataclass(frozen=True)
class Receipt:
    run: str
    round: int
    chain: str
    entry: int
    mac: str
    signature: str  # hex


def chain_head(session) -> Optional[ChainHead]:
    """The chain's tag and newest entry, or None for an empty chain."""
    tag = session.scalar(select(AuditEntry.row_hash).order_by(AuditEntry.id).limit(1))
    last = session.execute(select(AuditEntry.id, AuditEntry.row_hash).order_by(AuditEntry.id.desc()).limit(1)).first()
    return None if tag is None else ChainHead(tag, int(last.id), last.row_hash)


def receipt_digest(run: str, round_num: int, head: ChainHead) -> bytes:
    return hashlib.sha256(canonical_json([run, int(round_num), head.chain, head.entry, head.mac]).encode()).digest()


def make_receipt(run: str, round_num: int, head: ChainHead, server_keys: signing.SiteKeys) -> Receipt:
    """The server's side: sign the head the round left."""
    sig = signing.sign(receipt_digest(run, round_num, head), server_keys, RECEIPT_PURPOSE)
    return Receipt(run, int(round_num), head.chain, head.entry, head.mac, sig.hex())


def check_signature(receipt: Receipt, server_public: signing.PublicKeys) -> None:
    """Raises signing.SignatureError when the receipt is not the server's."""
    head = ChainHead(receipt.chain, receipt.entry, receipt.mac)
    try:
        sig = bytes.fromhex(receipt.signature)
    except ValueError:
        raise signing.SignatureError("receipt signature is not hex") from None
    signing.verify(receipt_digest(receipt.run, receipt.round, head), sig, server_public, RECEIPT_PURPOSE)


def append_receipt(path: Path, receipt: Receipt, server_public: signing.PublicKeys) -> None:
    """The hospital's side: keep the receipt only if the server signed it; one fsynced line under a lock."""
    check_signature(receipt, server_public)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            f.write(canonical_json(asdict(receipt)) + "\n")
            f.flush()
            os.fsync(f.fileno())
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def parse_receipt(raw) -> Receipt:
    """A receipt from its JSON object; raises ValueError naming what is wrong."""
    try:
        return Receipt(str(raw["run"]), int(raw["round"]), str(raw["chain"]), int(raw["entry"]), str(raw["mac"]),
                       str(raw["signature"]))  # fmt: skip
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"not an audit receipt ({type(e).__name__}: {e})") from None


def read_receipts(path: Path) -> list[tuple[int, Optional[Receipt]]]:
    """(line number, Receipt or None for an unreadable line) for each non-empty line."""
    out = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append((n, parse_receipt(json.loads(line))))
        except ValueError:
            out.append((n, None))
    return out


def last_receipt(path: Path) -> Optional[dict]:
    """The newest readable receipt of a hospital's log (what it echoes in its next update), None when there is none."""
    path = Path(path)
    if not path.is_file():
        return None
    kept = [r for _, r in read_receipts(path) if r is not None]
    return asdict(kept[-1]) if kept else None


def _chain_tag(session) -> Optional[str]:
    return session.scalar(select(AuditEntry.row_hash).order_by(AuditEntry.id).limit(1))


def _not_held(session, r: Receipt, tag: Optional[str]) -> Optional[str]:
    """Why the record does not hold the head the receipt names (None when it does)."""
    seen = f"run {r.run}, round {r.round}"
    mac = session.scalar(select(AuditEntry.row_hash).where(AuditEntry.id == r.entry))
    if r.chain != tag:
        return f"the receipt ({seen}) names chain {r.chain[:16]}..., the record's is {(tag or 'empty')[:16]}..."
    if mac is None:
        return f"the receipt ({seen}) records audit entry {r.entry}, which is gone"
    if mac != r.mac:
        return f"the receipt ({seen}) records audit entry {r.entry} with MAC {r.mac[:16]}..., the record holds {mac[:16]}..."
    return None


def receipt_problem(session, raw, server_public: Optional[signing.PublicKeys] = None) -> Optional[str]:
    """The server's check of the receipt a site echoes in its update (fedmed.server.anchors): None when the record holds
    the chain head it names, else why not: the record was rewritten after the site saw it, or (with server_public)
    the receipt is not one the server signed."""
    try:
        r = parse_receipt(raw)
    except ValueError as e:
        return f"the site's receipt is unreadable: {e}"
    if server_public is not None:
        try:
            check_signature(r, server_public)
        except signing.SignatureError as e:
            return f"the site's receipt is not one the server signed ({e}): made up or altered at the site"
    why = _not_held(session, r, _chain_tag(session))
    return None if why is None else f"{why}: the record was rewritten after the site received it"


def check_receipts(
    session, folder: Path, server_public: Optional[signing.PublicKeys] = None
) -> tuple[int, list[AuditProblem]]:
    """Check the record against every *.jsonl receipt log in folder (or the one file given). Returns (receipts
    checked, problems): a receipt whose entry is gone or holds another MAC, or that names another chain, means the
    record was rewritten after that hospital saw it; with server_public, a receipt the server did not sign is named
    (and not held against the record)."""
    folder = Path(folder)
    files = [folder] if folder.is_file() else sorted(folder.glob("*.jsonl"))
    if not files:
        raise ValueError(f"no receipt log (*.jsonl) in {folder}")
    tag = _chain_tag(session)
    checked, problems = 0, []
    for path in files:
        for line, r in read_receipts(path):
            where = f"{path.name} line {line}"
            if r is None:
                problems.append(AuditProblem(0, f"{where} is not a receipt", "receipts"))
                continue
            if server_public is not None:
                try:
                    check_signature(r, server_public)
                except signing.SignatureError as e:
                    problems.append(AuditProblem(r.entry, f"{where} is not the server's: {e}", "receipts"))
                    continue
            checked += 1
            why = _not_held(session, r, tag)
            if why is not None:
                problems.append(
                    AuditProblem(
                        r.entry, f"{where}: {why}: the record was rewritten after the hospital received it", "receipts"
                    )
                )
    return checked, problems
