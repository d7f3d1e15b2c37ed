"""Nothing lost when the database is down, and nothing blocked by one bad line.

Round records that cannot be written because the database is unreachable are appended to a journal file in the
workspace (one JSON line each, fsynced) and replayed in order when the database answers again. A line that can
never be written (torn by a crash, naming a run that does not exist, a value the database refuses) goes to a
dead-letter file with an alert, and the lines after it continue.

One journal per job (`fedmed_db_journal.<job id>.jsonl`), every read-modify-write under an fcntl lock on a side
file, rewrites through unique temporary files: jobs sharing a workspace cannot lose each other's lines. A job's
recorder also replays the journals earlier jobs left behind (including the older shared `fedmed_db_journal.jsonl`).

Replay is safe to repeat: Repository.record_round replaces a round, so a line written twice is stored once.

A write the record refuses (fedmed.store.audit.RecordRefused: no audit key configured, or a record that does not
verify) is neither an outage nor a bad line: it is raised to the caller with its one-line fix, never journaled as
"database unavailable" nor dead-lettered. A round refused mid-job is kept in the journal first, to be replayed once
an admin has dealt with the record.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import fcntl
import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Optional

from sqlalchemy import exc as sa_exc

from fedmed.server.crosssite import CrossSiteRecord
from fedmed.store.audit import RecordRefused
from fedmed.store.repository import AlertRecord, Repository, RoundRecord, SiteAnchor, TrustRecord, UpdateRecord

log = logging.getLogger(__name__)

JOURNAL_NAME = "fedmed_db_journal.jsonl"  # the shared name used before per-job journals; still replayed
JOURNAL_GLOB = "fedmed_db_journal*.jsonl"
DEAD_LETTER_NAME = "fedmed_db_dead_letters.jsonl"


def journal_path(workspace: Path, job_id: str) -> Path:
    """The journal of one job in a workspace. The job id is made file-name safe (NVFlare ids are UUIDs)."""
    if not job_id:
        raise ValueError("job id must be a non-empty string")
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", job_id)[:120]
    return Path(workspace) / f"fedmed_db_journal.{safe}.jsonl"


class RepositoryUnavailable(Exception):
    """Opening the repository failed (unreachable host, bad URL, failed migration): no line is to blame."""


def is_transient(error: BaseException) -> bool:
    """True when the error means 'the database cannot be reached right now' (keep the line for a retry); anything
    else (a value refused, a constraint, a run that does not exist, a torn line) will fail the same way forever."""
    if isinstance(error, RecordRefused):  # a configuration or tamper problem: waiting does not fix it
        return False
    if isinstance(error, (RepositoryUnavailable, sa_exc.DisconnectionError, sa_exc.TimeoutError)):
        return True
    if isinstance(error, sa_exc.DBAPIError) and error.connection_invalidated:
        return True
    return isinstance(error, (sa_exc.OperationalError, sa_exc.InterfaceError))


def _enc(o):
    if isinstance(o, dt.datetime):
        return {"__dt__": o.isoformat()}
    raise TypeError(f"cannot journal {type(o)}")


def _dec(d):
    return dt.datetime.fromisoformat(d["__dt__"]) if set(d) == {"__dt__"} else d


OPS = ("start_run", "resume_run", "record_round", "finish_run", "record_cross_site")
# Lines carry the round numbering they were written in; lines from before it (rounds from 0, the score in
# test_mean_auroc) are converted on replay as Alembic revision 0009 converted the database.
ROUNDS_FROM = 1


def op_to_json(op: str, args: dict) -> str:
    """One journal line: a repository write (one of OPS) and its arguments."""
    if op not in OPS:
        raise ValueError(f"journal op must be one of {OPS}, got {op!r}")
    args = dict(args)
    if isinstance(args.get("record"), RoundRecord):
        args["record"] = dataclasses.asdict(args["record"])
    if "records" in args:  # record_cross_site's cells
        args["records"] = [dataclasses.asdict(r) for r in args["records"]]
    return json.dumps({"op": op, "args": args, "rounds_from": ROUNDS_FROM}, default=_enc, sort_keys=True)


def _from_legacy(op: str, args: dict) -> None:
    """A line journaled before revision 0009: rounds from 0, the chest task's mean AUROC as the only score."""
    if op == "finish_run" and args.get("best_round") is not None:
        args["best_round"] += 1
    if op != "record_round":
        return
    rec = args["record"]
    rec["round_num"] = int(rec["round_num"]) + 1
    if "test_mean_auroc" in rec:
        mean_auroc = rec.pop("test_mean_auroc")
        rec.update(
            mean_auroc=mean_auroc,
            score=mean_auroc,
            score_name="mean_auroc",
            score_source="site_validation" if rec.get("test_loss") is None else "global_test",
        )
    for u in rec["updates"]:
        if "val_score" not in u:
            u["val_score"] = u.get("val_mean_auroc")


def op_from_json(line: str) -> tuple[str, dict]:
    raw = json.loads(line, object_hook=_dec)
    if not isinstance(raw, dict) or not isinstance(raw.get("args"), dict):
        raise ValueError("journal line is not an object with 'op' and 'args'")
    op, args = raw.get("op"), raw["args"]
    if op not in OPS:
        raise ValueError(f"unknown journal op {op!r}")
    if raw.get("rounds_from") != ROUNDS_FROM:
        _from_legacy(op, args)
    if op == "record_round":
        rec = args["record"]
        rec["updates"] = tuple(UpdateRecord(**u) for u in rec["updates"])
        rec["alerts"] = tuple(AlertRecord(**a) for a in rec.get("alerts", ()))
        rec["trust"] = tuple(TrustRecord(**t) for t in rec.get("trust", ()))
        rec["anchors"] = tuple(SiteAnchor(**a) for a in rec.get("anchors", ()))
        args["record"] = RoundRecord(**rec)
    if op == "record_cross_site":
        args["records"] = [CrossSiteRecord(**r) for r in args["records"]]
    return op, args


@contextlib.contextmanager
def _locked(path: Path, exclusive: bool = True) -> Iterator[None]:
    """fcntl lock on `<path>.lock`, a side file that is never replaced (the journal itself is, by os.replace)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def _append_durably(path: Path, text: str) -> None:
    with open(path, "ab") as f:
        if f.tell() > 0:  # a crash may have torn the last line: never glue a new line onto it
            with open(path, "rb") as r:
                r.seek(-1, os.SEEK_END)
                if r.read(1) != b"\n":
                    f.write(b"\n")
        f.write(text.encode("utf-8"))
        f.flush()
        os.fsync(f.fileno())


@dataclasses.dataclass(frozen=True)
class DeadLetter:
    journal: str
    line: str
    reason: str
    op: Optional[str] = None
    run_uid: Optional[str] = None
    round_num: Optional[int] = None


@dataclasses.dataclass
class ReplayOutcome:
    written: int = 0
    dead: list = dataclasses.field(default_factory=list)  # of DeadLetter
    stopped_by: Optional[BaseException] = None  # the transient error that left lines journaled
    left: int = 0


def _describe(line: str) -> tuple[Optional[str], Optional[str], Optional[int]]:
    """(op, run uid, round) of a line, best effort, for the dead-letter alert."""
    try:
        raw = json.loads(line)
        args = raw.get("args", {})
        rec = args.get("record") or {}
        return raw.get("op"), args.get("run_uid") or args.get("uid"), rec.get("round_num")
    except Exception:  # a torn line tells nothing more
        return None, None, None


class Journal:
    """Append-only JSONL file of pending writes. Appends are fsynced; replay rewrites it atomically with what is left;
    lines that can never be written move to the dead-letter file next to it."""

    def __init__(self, path: Path, dead_letters: Optional[Path] = None):
        self.path = Path(path)
        self.dead_letters = Path(dead_letters) if dead_letters else self.path.parent / DEAD_LETTER_NAME

    @classmethod
    def for_job(cls, workspace: Path, job_id: str) -> "Journal":
        return cls(journal_path(workspace, job_id))

    def append(self, op: str, args: dict) -> None:
        line = op_to_json(op, args)
        with _locked(self.path):
            _append_durably(self.path, line + "\n")

    def _read(self) -> list[str]:
        if not self.path.exists():
            return []
        text = self.path.read_text(encoding="utf-8", errors="replace")
        return [line for line in text.splitlines() if line.strip()]

    def pending(self) -> list[str]:
        with _locked(self.path, exclusive=False):
            return self._read()

    def dead_letter(self, line: str, reason: str) -> DeadLetter:
        """Move one line to the dead-letter file (fsynced, under its own lock)."""
        op, run_uid, round_num = _describe(line)
        entry = DeadLetter(str(self.path), line, reason, op, run_uid, round_num)
        record = json.dumps(
            {"at": dt.datetime.now(dt.timezone.utc).isoformat(), **dataclasses.asdict(entry)}, sort_keys=True
        )
        with _locked(self.dead_letters):
            _append_durably(self.dead_letters, record + "\n")
        return entry

    def replay(
        self, write: Callable[[str, dict], None], transient: Callable[[BaseException], bool] = is_transient
    ) -> ReplayOutcome:
        """Write pending lines in order. A transient error stops the replay and keeps that line and the rest; any
        other failure dead-letters the line and goes on. The whole replay holds the journal's lock."""
        out = ReplayOutcome()
        with _locked(self.path):
            lines = self._read()
            keep_from = len(lines)
            for i, line in enumerate(lines):
                try:
                    parsed = op_from_json(line)
                except Exception as e:  # torn or garbled: it can never be replayed
                    out.dead.append(self.dead_letter(line, f"unreadable journal line: {type(e).__name__}: {e}"))
                    continue
                try:
                    write(*parsed)
                    out.written += 1
                except Exception as e:
                    if transient(e):
                        out.stopped_by, keep_from = e, i
                        break
                    out.dead.append(self.dead_letter(line, f"{type(e).__name__}: {_short(e)}"))
            rest = lines[keep_from:]
            out.left = len(rest)
            if len(rest) != len(lines):
                self._rewrite(rest)
        return out

    def _rewrite(self, lines: list[str]) -> None:
        # A unique temp file per rewrite: two writers can never clobber one shared '.tmp'.
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name + ".", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write("".join(line + "\n" for line in lines))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise


def _short(e: BaseException, limit: int = 500) -> str:
    s = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
    return s if len(s) <= limit else s[:limit] + "..."


class ResilientRecorder:
    """The Controller's only way to the database: never blocks or fails training.

    Every write (run start, each round in one transaction, run finish) is tried at once. If the database cannot be
    reached it is journaled, in order, and the recorder is 'degraded' (one clear log line, not one per round) until
    a later write or flush() succeeds, which first replays the journal. A write the database refuses for good is
    dead-lettered with an alert (logged, and an alert row on this run once the database has it). Writes are
    idempotent, so a replay that is cut off and repeated stores each round exactly once.
    """

    def __init__(
        self, repo_factory: Callable[[], Repository], journal: Journal, logger=log, replay_earlier: bool = True
    ):
        self._factory = repo_factory
        self._repo: Optional[Repository] = None
        self.journal = journal
        self.degraded = False
        self.log = logger
        self.run_uid: Optional[str] = None
        self._alerts: list[str] = []  # dead-letter alert messages not yet in the database
        # Journals other jobs left in the same folder: replayed once, at this job's first flush.
        self._earlier: list[Journal] = []
        if replay_earlier and journal.path.parent.is_dir():
            others = [p for p in journal.path.parent.glob(JOURNAL_GLOB) if p != journal.path]
            self._earlier = [Journal(p, journal.dead_letters) for p in sorted(others, key=_mtime)]

    def _apply(self, op: str, args: dict) -> None:
        self._open()
        getattr(self._repo, op)(**args)

    def _open(self) -> None:
        if self._repo is None:
            try:
                self._repo = self._factory()
            except RecordRefused:  # no audit key: a configuration error, not an unreachable database
                raise
            except Exception as e:
                raise RepositoryUnavailable(f"{type(e).__name__}: {_short(e)}") from e

    def all_pending(self) -> int:
        return sum(len(j.pending()) for j in (*self._earlier, self.journal))

    def flush(self) -> bool:
        """Replay the earlier jobs' journals (once) and this job's; True when nothing of this job's is left."""
        while self._earlier:
            if not self._replay(self._earlier[0], "an earlier job"):
                return False
            self._earlier.pop(0)
        if not self._replay(self.journal, "this job"):
            return False
        if self.degraded:
            self.degraded = False
            self.log.info("database writes restored")
        self._write_alerts()
        return True

    def _replay(self, journal: Journal, whose: str) -> bool:
        out = journal.replay(self._apply, lambda e: isinstance(e, RecordRefused) or is_transient(e))
        if isinstance(out.stopped_by, RecordRefused):  # the lines stay journaled; the caller gets the reason
            raise self._refused(out.stopped_by)
        for d in out.dead:
            self._alert(
                f"journal line from {whose} ({d.op or 'unreadable'}, run {d.run_uid}, round {d.round_num}) "
                f"cannot be written and was moved to {journal.dead_letters}: {d.reason}"
            )
        if out.written:
            self.log.info(f"replayed {out.written} journaled write(s) from {journal.path}")
        if out.stopped_by is not None:
            self._degrade(out.stopped_by)
            return False
        return True

    def write(self, op: str, **args) -> bool:
        """True if written to the database now, False if journaled for later or dead-lettered. Raises
        RecordRefused (logged as an alert) when the record refuses the write: no audit key, or it does not verify."""
        if op in ("start_run", "resume_run"):
            self.run_uid = args.get("uid")
        try:
            if (self._earlier or self.journal.pending()) and not self.flush():
                self.journal.append(op, args)
                return False
        except RecordRefused as e:
            raise self._refused_write(op, args, e) from None
        try:
            self._apply(op, args)
        except RecordRefused as e:
            raise self._refused_write(op, args, e) from None
        except Exception as e:
            if is_transient(e):
                self.journal.append(op, args)
                self._degrade(e)
                return False
            d = self.journal.dead_letter(op_to_json(op, args), f"{type(e).__name__}: {_short(e)}")
            self._alert(
                f"{op} (run {d.run_uid}, round {d.round_num}) refused by the database and moved to "
                f"{self.journal.dead_letters}: {d.reason}"
            )
            self._write_alerts()
            return False
        self._write_alerts()
        return True

    def chain_head(self):
        """The audit chain's head after the last write (fedmed.store.receipts.ChainHead), or None while degraded:
        journaled writes are not in the chain yet, so no receipt is due for them."""
        if self.degraded or self._repo is None:
            return None
        try:
            return self._repo.chain_head()
        except sa_exc.SQLAlchemyError:
            return None

    def close(self) -> None:
        if self._repo is not None:
            self._repo.close()
            self._repo = None

    def _refused_write(self, op: str, args: dict, error: RecordRefused) -> RecordRefused:
        if op not in ("start_run", "resume_run"):  # a round already trained: kept for replay after the fix
            self.journal.append(op, args)
        return self._refused(error)

    def _refused(self, error: RecordRefused) -> RecordRefused:
        """Log the refusal once as an alert (it is no outage) and hand it back to raise."""
        if not getattr(error, "_alerted", False):
            self.log.error(f"ALERT record refused: {error}")
            error._alerted = True
        return error

    def _alert(self, message: str) -> None:
        self.log.error(f"ALERT dead letter: {message}")
        self._alerts.append(message)

    def _write_alerts(self) -> None:
        """Dead-letter alerts become alert rows on this run once the database has the run."""
        if not self._alerts or self.run_uid is None:
            return
        while self._alerts:
            try:
                self._open()
                self._repo.record_alert(self.run_uid, "dead_letter", self._alerts[0])
            except Exception as e:
                if not is_transient(e) and "no run with uid" not in str(e):
                    self.log.error(
                        f"dead-letter alert could not be recorded ({type(e).__name__}: {_short(e)}); "
                        f"it stays in the log and the dead-letter file"
                    )
                    self._alerts.pop(0)
                    continue
                return  # the database or this run's row is not there yet: try again after the next write
            self._alerts.pop(0)

    def _degrade(self, error: Exception) -> None:
        if not self.degraded:
            self.degraded = True
            self.log.error(
                f"database unavailable ({type(error).__name__}: {_short(error, 200)}); writes are journaled to "
                f"{self.journal.path} and replayed when it answers again"
            )
        self.close()  # reconnect next time


def _mtime(p: Path) -> float:
    try:
        return p.stat().st_mtime
    except FileNotFoundError:
        return 0.0
