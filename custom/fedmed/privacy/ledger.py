"""A hospital's lifetime privacy ledger: every DP release made from one dataset, across all jobs, in one file.

Pure core (no NVFlare). The file is JSON lines in the site kit's local/ folder (its path comes from the site's own
config or kit, never from a job). Each line is one charge: the RDP history of what was (or is about to be) released,
as Opacus' RDPAccountant keeps it ((noise_multiplier, sample_rate, steps) entries), so composing all jobs on a
dataset is exact RDP composition, not a sum of epsilons. Lines are chained: `prev` is the sha256 of the previous
line's bytes and `hash` the sha256 of the line's own fields, so a torn write, a flipped byte or an edited line
anywhere is found by verify(); an edit of the *last* line that also recomputes its hash is only found against a
head hash recorded elsewhere (scripts/privacy_ledger.py show prints it; the privacy officer keeps it).

A charge is written (and fsynced) before the data is trained on, under an exclusive lock, after checking the
lifetime ceiling: a crash after the charge can only over-count, never under-count, and two jobs at one site cannot
both pass the check on the same remaining budget. A damaged ledger refuses every further charge until the privacy
officer has looked at it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

from fedmed.privacy.accounting import BudgetExceeded, HistoryEntry, epsilon_of

LEDGER_FILENAME = "privacy_ledger.jsonl"  # default place: <site kit>/local/
GENESIS = "0" * 64  # `prev` of the first line
FORMAT = 1
MECHANISMS = ("dp_sgd", "user_level")


class LedgerError(RuntimeError):
    """The ledger file is damaged or unreadable; the message names the line. Nothing more is charged to it."""


class LifetimeBudgetExceeded(BudgetExceeded):
    """The charge would take the dataset past its lifetime epsilon ceiling; nothing was written."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _canonical(fields: dict) -> bytes:
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def dataset_fingerprint(image_files: Iterable[Path], chunk: int = 1 << 20) -> str:
    """sha256 over the sorted sha256 digests of the images' file contents.

    Keyed by content, not by path or label: the same images moved to another folder, re-split into train/val by
    another job seed, or relabelled for another task are the same people and keep the same budget. Reads each file
    once."""
    digests = []
    for path in image_files:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(chunk), b""):
                h.update(block)
        digests.append(h.hexdigest())
    if not digests:
        raise ValueError("dataset_fingerprint: no images")
    return _sha256("\n".join(sorted(digests)).encode())


@dataclass(frozen=True)
class LedgerEntry:
    seq: int
    prev: str
    dataset: str
    job_id: str
    round: int
    mechanism: str  # "dp_sgd" (example-level DP-SGD) or "user_level" (UpdateNoiseFilter's Gaussian mechanism)
    history: tuple  # ((noise_multiplier, sample_rate, steps), ...) at the example level, composed for the ceiling
    delta: float
    epsilon_after: float  # the dataset's lifetime epsilon at delta once this entry counts
    lifetime_ceiling: Optional[float]
    recorded_at: float
    details: dict = field(default_factory=dict)
    hash: str = ""

    def fields(self) -> dict:
        return {
            "format": FORMAT,
            "seq": self.seq,
            "prev": self.prev,
            "dataset": self.dataset,
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

    def line(self) -> bytes:
        return _canonical({**self.fields(), "hash": self.hash})


def _parse_line(raw: bytes, lineno: int, prev: str, seq: int, path: Path) -> LedgerEntry:
    where = f"{path} line {lineno}"
    try:
        d = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LedgerError(f"{where}: not a JSON object (torn or edited line?): {e}") from e
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise LedgerError(f"{where}: not a fedmed ledger entry of format {FORMAT}")
    claimed = d.pop("hash", None)
    if claimed != _sha256(_canonical(d)):
        raise LedgerError(f"{where}: its hash does not match its content (the line was edited or damaged)")
    if d.get("prev") != prev:
        raise LedgerError(
            f"{where}: 'prev' does not match the sha256 of line {lineno - 1} (a line before it was "
            "edited, removed or inserted)"
        )
    if d.get("seq") != seq:
        raise LedgerError(f"{where}: sequence number {d.get('seq')!r}, expected {seq}")
    try:
        history = tuple((float(s), float(q), int(n)) for s, q, n in d["history"])
        entry = LedgerEntry(
            seq,
            prev,
            str(d["dataset"]),
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
        )
    except (KeyError, TypeError, ValueError) as e:
        raise LedgerError(f"{where}: malformed field ({e!r})") from e
    if entry.mechanism not in MECHANISMS:
        raise LedgerError(f"{where}: unknown mechanism {entry.mechanism!r}")
    return entry


class PrivacyLedger:
    """The append-only ledger file of one hospital (all its datasets)."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def _parse(self, data: bytes) -> list[LedgerEntry]:
        if data and not data.endswith(b"\n"):
            raise LedgerError(
                f"{self.path}: the last line is incomplete (a write was torn); "
                "nothing more is charged until the privacy officer has checked the ledger"
            )
        entries, prev = [], GENESIS
        for i, raw in enumerate(data.split(b"\n")[:-1] if data else [], start=1):
            entry = _parse_line(raw, i, prev, i, self.path)
            entries.append(entry)
            prev = _sha256(raw)
        return entries

    def entries(self) -> list[LedgerEntry]:
        """Every entry, chain verified; raises LedgerError naming the first bad line. A missing file is empty."""
        if not self.path.exists():
            return []
        return self._parse(self.path.read_bytes())

    def verify(self) -> Optional[str]:
        """None if the file is whole, else what is wrong (the first problem, with its line)."""
        try:
            self.entries()
        except (LedgerError, OSError) as e:
            return str(e)
        return None

    def head(self) -> str:
        """sha256 of the last line (GENESIS for an empty ledger): what a privacy officer records to pin the file."""
        data = self.path.read_bytes() if self.path.exists() else b""
        lines = data.split(b"\n")[:-1] if data.endswith(b"\n") else []
        return _sha256(lines[-1]) if lines else GENESIS

    @staticmethod
    def history_of(entries: Sequence[LedgerEntry], dataset: str) -> list[HistoryEntry]:
        return [h for e in entries if e.dataset == dataset for h in e.history]

    def lifetime_epsilon(self, dataset: str, delta: float, extra: Sequence[HistoryEntry] = ()) -> float:
        return epsilon_of(self.history_of(self.entries(), dataset) + list(extra), delta)

    def check(self, dataset: str, history: Sequence[HistoryEntry], delta: float, ceiling: Optional[float]) -> float:
        """The lifetime epsilon the dataset would reach with `history` added; raises LifetimeBudgetExceeded past the
        ceiling. Writes nothing (the pre-training check of a round)."""
        entries = self.entries()
        return self._check(entries, dataset, history, delta, ceiling)

    def _check(self, entries, dataset, history, delta, ceiling) -> float:
        before = epsilon_of(self.history_of(entries, dataset), delta)
        after = epsilon_of(self.history_of(entries, dataset) + list(history), delta)
        if ceiling is not None and after > ceiling * (1 + 1e-6):
            jobs = sorted({e.job_id for e in entries if e.dataset == dataset})
            raise LifetimeBudgetExceeded(
                f"lifetime privacy budget: this round would bring dataset {dataset[:12]}'s lifetime epsilon from "
                f"{before:.3f} to {after:.3f} (delta {delta}), over the site's lifetime ceiling {ceiling}; "
                f"{len(jobs)} earlier job(s) spent it ({self.path})"
            )
        return after

    def charge(
        self,
        dataset: str,
        job_id: str,
        round_num: int,
        mechanism: str,
        history: Sequence[HistoryEntry],
        delta: float,
        ceiling: Optional[float],
        details: Optional[dict] = None,
    ) -> LedgerEntry:
        """Check the lifetime ceiling and append one entry, fsynced, under an exclusive lock (so concurrent jobs
        at the site are serialised). Raises LifetimeBudgetExceeded (nothing written) or LedgerError."""
        if mechanism not in MECHANISMS:
            raise ValueError(f"mechanism must be one of {MECHANISMS}, got {mechanism!r}")
        history = tuple((float(s), float(q), int(n)) for s, q, n in history)
        if not history or any(not (s > 0 and 0 < q <= 1 and n >= 1) for s, q, n in history):
            raise ValueError(f"ledger history entries must be (sigma > 0, 0 < q <= 1, steps >= 1), got {history}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        created = not self.path.exists()
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            with os.fdopen(os.dup(fd), "rb") as f:
                data = f.read()
            entries = self._parse(data)
            after = self._check(entries, dataset, history, delta, ceiling)
            prev = _sha256(data.split(b"\n")[-2]) if entries else GENESIS
            entry = LedgerEntry(
                len(entries) + 1,
                prev,
                dataset,
                str(job_id),
                int(round_num),
                mechanism,
                history,
                float(delta),
                after,
                ceiling,
                time.time(),
                dict(details or {}),
            )
            entry = LedgerEntry(**{**entry.__dict__, "hash": _sha256(_canonical(entry.fields()))})
            os.write(fd, entry.line() + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)  # releases the lock
        if created:  # make the new file's directory entry durable too
            dfd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        return entry


@dataclass(frozen=True)
class LedgerBinding:
    """What a site's trainer and result filter need to charge one dataset: its ledger, the dataset's key, the job,
    and the dataset's lifetime ceiling and delta (from the site's own config)."""

    ledger: PrivacyLedger
    dataset: str
    job_id: str
    delta: float
    lifetime_ceiling: Optional[float]
    run: str = ""  # a random id of this job process: tells apart runs that share a job id (the simulator's)

    def check(self, history: Sequence[HistoryEntry]) -> float:
        return self.ledger.check(self.dataset, history, self.delta, self.lifetime_ceiling)

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
            {**(details or {}), "run": self.run},
        )

    def lifetime_epsilon(self) -> float:
        return self.ledger.lifetime_epsilon(self.dataset, self.delta)

    def history_of_jobs(self, job_ids: Sequence[str], mechanism: str) -> list[HistoryEntry]:
        """What these jobs charged to this dataset by this mechanism (e.g. a resumed run's earlier jobs), in order."""
        jobs = {str(j) for j in job_ids}
        return [
            h
            for e in self.ledger.entries()
            if e.dataset == self.dataset and e.job_id in jobs and e.mechanism == mechanism
            for h in e.history
        ]


def user_level_example_history(clip_norm: float, noise_std: float) -> HistoryEntry:
    """One UpdateNoiseFilter round as an example-level RDP entry: the released update is the reference plus a delta
    clipped to norm C, so changing anything in the site's data (one image included) moves it by at most 2C; with
    noise std s that is the Gaussian mechanism with noise multiplier s / (2C), sampled with rate 1, once."""
    return (noise_std / (2.0 * clip_norm), 1.0, 1)
