"""Nothing lost when the database is down: round records that cannot be written are appended to a journal file in
the workspace (one JSON line each, fsynced) and replayed in order when the database answers again.

Replay is safe to repeat: Repository.record_round replaces a round, so a line written twice is stored once.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import os
from pathlib import Path
from typing import Callable, Optional

from sqlalchemy.exc import SQLAlchemyError

from fedmed.store.repository import AlertRecord, Repository, RoundRecord, TrustRecord, UpdateRecord

log = logging.getLogger(__name__)

JOURNAL_NAME = "fedmed_db_journal.jsonl"


def _enc(o):
    if isinstance(o, dt.datetime):
        return {"__dt__": o.isoformat()}
    raise TypeError(f"cannot journal {type(o)}")


def _dec(d):
    return dt.datetime.fromisoformat(d["__dt__"]) if set(d) == {"__dt__"} else d


def op_to_json(op: str, args: dict) -> str:
    """One journal line: a repository write ('start_run', 'record_round' or 'finish_run') and its arguments."""
    if op not in OPS:
        raise ValueError(f"journal op must be one of {OPS}, got {op!r}")
    args = dict(args)
    if isinstance(args.get("record"), RoundRecord):
        args["record"] = dataclasses.asdict(args["record"])
    return json.dumps({"op": op, "args": args}, default=_enc, sort_keys=True)


def op_from_json(line: str) -> tuple[str, dict]:
    raw = json.loads(line, object_hook=_dec)
    op, args = raw["op"], raw["args"]
    if op not in OPS:
        raise ValueError(f"unknown journal op {op!r}")
    if op == "record_round":
        rec = args["record"]
        rec["updates"] = tuple(UpdateRecord(**u) for u in rec["updates"])
        rec["alerts"] = tuple(AlertRecord(**a) for a in rec.get("alerts", ()))
        rec["trust"] = tuple(TrustRecord(**t) for t in rec.get("trust", ()))
        args["record"] = RoundRecord(**rec)
    return op, args


OPS = ("start_run", "record_round", "finish_run")


class Journal:
    """Append-only JSONL file. Appends are fsynced; replay rewrites the file atomically with what is left."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def append(self, op: str, args: dict) -> None:
        line = op_to_json(op, args)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())

    def pending(self) -> list[str]:
        if not self.path.exists():
            return []
        return [line for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]

    def replay(self, write: Callable[[str, dict], None]) -> int:
        """Write pending records in order; stops at the first failure, keeping it and everything after.
        Returns the number written."""
        lines = self.pending()
        done = 0
        try:
            for line in lines:
                write(*op_from_json(line))
                done += 1
        finally:
            rest = lines[done:]
            if done:
                tmp = self.path.with_suffix(".tmp")
                tmp.write_text("".join(line + "\n" for line in rest), encoding="utf-8")
                os.replace(tmp, self.path)
        return done


class ResilientRecorder:
    """The Controller's only way to the database: never blocks or fails training because the DB is down.

    Every write (run start, each round in one transaction, run finish) is tried at once; on a database error it is
    journaled, in order, and the recorder is 'degraded' (one clear log line, not one per round) until a later
    write or flush() succeeds, which first replays the journal. Writes are idempotent, so a replay that is cut off
    and repeated stores each round exactly once.
    """

    def __init__(self, repo_factory: Callable[[], Repository], journal: Journal, logger=log):
        self._factory = repo_factory
        self._repo: Optional[Repository] = None
        self.journal = journal
        self.degraded = False
        self.log = logger

    def _apply(self, op: str, args: dict) -> None:
        if self._repo is None:
            self._repo = self._factory()
        getattr(self._repo, op)(**args)

    def flush(self) -> bool:
        """Replay the journal; True when nothing is left pending."""
        try:
            n = self.journal.replay(self._apply)
        except SQLAlchemyError as e:
            self._degrade(e)
            return False
        if n:
            self.log.info(f"database reachable again: replayed {n} journaled write(s) from {self.journal.path}")
        if self.degraded:
            self.degraded = False
            self.log.info("database writes restored")
        return True

    def write(self, op: str, **args) -> bool:
        """True if written to the database now, False if journaled for later."""
        if self.journal.pending() and not self.flush():
            self.journal.append(op, args)
            return False
        try:
            self._apply(op, args)
            return True
        except SQLAlchemyError as e:
            self.journal.append(op, args)
            self._degrade(e)
            return False

    def close(self) -> None:
        if self._repo is not None:
            self._repo.close()
            self._repo = None

    def _degrade(self, error: Exception) -> None:
        if not self.degraded:
            self.degraded = True
            self.log.error(f"database unavailable ({type(error).__name__}); writes are journaled to "
                           f"{self.journal.path} and replayed when it answers again")
        self.close()  # reconnect next time
