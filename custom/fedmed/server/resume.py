"""Resuming a run after a server crash or a failure: what a new NVFlare job needs to continue a recorded fedmed run.

Pure core (no NVFlare). NVFlare 2.9 cannot resume a ModelController job (fedmed.flare.recovery marks a job its dead
server left FINISHED_ABNORMAL and the fedmed run 'interrupted'); a resumption is a NEW job that continues the SAME
run in the database: from the global model of its last recorded round (a server file found by the sha256 the round
recorded, so a swapped or damaged file is refused), with rounds numbered on from there (no round twice), the trust
and quarantine state the federation's record holds, and the best round so far. plan_resume decides, from the
record alone, whether and from where; find_model_file then picks the file. Each refusal is one line naming why.

The server keeps each run's recent global models under <server workspace>/fedmed_runs/<run uid>/ (round_<n>.pt,
the last two: a crash between saving round n and recording it leaves round n-1's, which the record names; and the
best model); a finished run keeps its final round's and its best, which a cross-site evaluation of a recorded run
scores (pick_recorded_model names the model from the record, find_model_file finds its file the same way). The
simulator wipes its workspace at every run, so there they go to <--workspace>/fedmed_runs/.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

RESUMABLE = ("interrupted", "failed")
# Job options a resumption must keep: changing one would make the run's record mean two things at once.
FIXED_OPTIONS = ("task", "aggregation", "he_layers", "norm", "image_size", "num_rounds")
RUNS_DIR = "fedmed_runs"
_ROUND_FILE = re.compile(r"^round_(\d+)\.pt$")
KEEP_ROUND_FILES = 2


class ResumeRefused(ValueError):
    """A resumption that cannot go ahead; the message is the one line the admin reads. Nothing was written."""


class EvaluationRefused(ValueError):
    """A cross-site evaluation of a recorded run's model that cannot go ahead (no such run, no such model, its file
    missing or not the one recorded); the message is the one line the admin reads. Nothing was written."""


PURPOSES = {"resume": ResumeRefused, "cross-site evaluation": EvaluationRefused}  # what names a run, and its refusal


@dataclass(frozen=True)
class ResumePlan:
    run_uid: str
    from_round: int  # the first round this job runs, numbered from 1 (NVFlare's current_round is one less)
    model_round: int  # the recorded round whose global model the job starts from
    model_sha256: str
    best_round: Optional[int]
    best_score: Optional[float]
    previous_status: str
    job_ids: tuple  # the jobs that ran the run so far, first to last

    @property
    def first_wire_round(self) -> int:
        """The 0-based current_round the sites see for from_round."""
        return self.from_round - 1


def match_prefix(given: str, names: Iterable[str], what: str, where: str = "") -> str:
    """The one of `names` that `given` is or uniquely starts (an admin may paste a whole id or type its start);
    ValueError naming `what` otherwise. The one rule behind every run and job identifier a command takes."""
    given = (given or "").strip()
    if not given:
        raise ValueError(f"no {what} given (its id, or a unique prefix of it)")
    names = list(names)
    if given in names:
        return given  # the whole id, even if it prefixes another
    matches = [n for n in names if n.startswith(given)]
    if not matches:
        raise ValueError(f"no {what} {given!r}{where}")
    if len(matches) > 1:
        raise ValueError(f"{given!r} is the start of {len(matches)} {what}s ({', '.join(matches[:4])}): give more")
    return matches[0]


def resolve_run_uid(given: str, uids: Iterable[str], purpose: str = "resume", numbered: Optional[str] = None) -> str:
    """The run uid an admin means by `given`: the run number fedmed-rounds prints (`numbered`, that run's uid, when
    given is a number of a recorded run), its uid, or a unique prefix of it; for `purpose` (a key of PURPOSES: the
    refusal's class and the first word of its message)."""
    refused = PURPOSES[purpose]
    given = (given or "").strip()
    if is_run_number(given) and numbered:
        return numbered
    if not given:
        raise refused(f"{purpose}: no run given (its number, its uid or a unique prefix of it, as fedmed-rounds lists)")
    try:
        return match_prefix(given, uids, "run", " in the database")
    except ValueError as e:
        raise refused(f"{purpose}: {e}") from None


def is_run_number(given: str) -> bool:
    """A run number as fedmed-rounds prints it ("3"); "03" is the start of a uid, as uids are hex."""
    return given.isdigit() and given == str(int(given))


def find_run_uid(repo, given: str, purpose: str = "resume") -> str:
    """resolve_run_uid against a fedmed.store Repository: run number, uid or unique prefix."""
    given = (given or "").strip()
    numbered = None
    if is_run_number(given):
        try:
            numbered = repo.get_run(int(given)).uid
        except ValueError:  # no run with that number: maybe the start of a uid
            numbered = None
    return resolve_run_uid(given, repo.run_uids_starting_with(given), purpose, numbered)


def best_scored_round(rounds) -> Optional[tuple]:
    """(round, score) of the best scored round of (round, sha256, score) rows, the earliest of equals (the
    Controller's rule: a later round must beat the best, not match it); None when no round was scored."""
    scored = [(r, score) for r, _, score in rounds if score is not None]
    return min(scored, key=lambda rs: (-rs[1], rs[0])) if scored else None


def _normal(option: str, value):
    if option == "he_layers":
        return tuple(value) if value else None  # None, [] and () all mean "no HE"
    return value


def config_conflicts(recorded: dict, job: dict) -> list[str]:
    """The FIXED_OPTIONS on which the job differs from the recorded run's config (an option the record lacks, from a
    run recorded before it was kept, is not held against the job)."""
    return [o for o in FIXED_OPTIONS if o in recorded and o in job and _normal(o, recorded[o]) != _normal(o, job[o])]


def plan_resume(history, job: dict) -> ResumePlan:
    """Where a new job continues the run `history` (fedmed.store.repository.RunHistory) configured as `job` (the
    Controller's options by name). Raises ResumeRefused naming why: a run still running or finished, an option
    that conflicts with the recorded run's, no recorded round or no recorded global model."""
    uid = history.uid
    if history.status == "finished":
        raise ResumeRefused(f"resume: run {uid} is finished; nothing to resume")
    if history.status == "running":
        raise ResumeRefused(
            f"resume: run {uid} is recorded as running (job {history.job_ids[-1]}); if its server died, restarting "
            "the server marks it interrupted, otherwise abort that job first"
        )
    if history.status not in RESUMABLE:
        raise ResumeRefused(
            f"resume: run {uid} is {history.status}; only an {' or '.join(RESUMABLE)} run can be resumed"
        )
    for option in config_conflicts(history.config, job):
        raise ResumeRefused(
            f"resume: the job's {option} {job[option]!r} differs from run {uid}'s {history.config[option]!r}; "
            f"a resumed run keeps its {', '.join(FIXED_OPTIONS)}"
        )
    if not history.rounds:
        raise ResumeRefused(f"resume: run {uid} recorded no round; submit the job anew instead")
    last_round = history.rounds[-1][0]
    if last_round >= history.num_rounds:
        raise ResumeRefused(f"resume: run {uid} recorded all its {history.num_rounds} rounds; nothing to resume")
    with_model = [(r, sha) for r, sha, _ in history.rounds if sha]
    if not with_model:
        raise ResumeRefused(f"resume: run {uid} recorded no global model in its {last_round} round(s)")
    model_round, sha = with_model[-1]  # a round that aggregated nothing left the global model as it stood
    best = best_scored_round(history.rounds) or (None, None)
    return ResumePlan(uid, last_round + 1, model_round, sha, best[0], best[1], history.status, history.job_ids)


# --- a recorded run's model, scored in a cross-site evaluation of its own --------------------------------------------

EVAL_MODELS = ("final", "best")


@dataclass(frozen=True)
class RecordedModel:
    """A recorded run's final or best global model, as the record names it (find_model_file finds its file)."""

    run_uid: str
    which: str  # "final" | "best"
    model_round: int
    model_sha256: str


def pick_recorded_model(history, which: str) -> RecordedModel:
    """The run's final global model (its last recorded round's) or its best (the best scored round's). Raises
    EvaluationRefused naming why: no global model recorded, no round scored (no best), or HE layers (the model's
    head is encrypted and an evaluation-only job sends in clear)."""
    if which not in EVAL_MODELS:
        raise ValueError(f"which must be one of {EVAL_MODELS}, got {which!r}")
    uid = history.uid
    if history.config.get("he_layers"):
        raise EvaluationRefused(
            f"cross-site evaluation: run {uid} kept layers encrypted (HE): its model's head is not in clear, and an "
            "evaluation-only job sends the model in clear; HE runs are evaluated across sites at the end of training"
        )
    shas = {r: sha for r, sha, _ in history.rounds if sha}
    if not shas:
        raise EvaluationRefused(f"cross-site evaluation: run {uid} recorded no global model")
    if which == "final":
        model_round = max(shas)
    else:
        best = best_scored_round(history.rounds)
        if best is None or best[0] not in shas:
            raise EvaluationRefused(f"cross-site evaluation: run {uid} recorded no scored round: it has no best model")
        model_round = best[0]
    return RecordedModel(uid, which, model_round, shas[model_round])


# --- the server's model files of a run ------------------------------------------------------------------------------


def run_models_dir(runs_root: Path, run_uid: str) -> Path:
    """One run's model folder under runs_root (default <server workspace>/fedmed_runs)."""
    if not re.fullmatch(r"[0-9a-f]{8,64}", run_uid or ""):
        raise ValueError(f"run uid must be hex, got {run_uid!r}")  # it names a folder
    return Path(runs_root) / run_uid


def round_model_path(models_dir: Path, round_num: int) -> Path:
    return Path(models_dir) / f"round_{int(round_num)}.pt"


def stale_round_files(models_dir: Path, newest: int, keep: int = KEEP_ROUND_FILES) -> list[Path]:
    """The round files older than the `keep` newest (up to round `newest`): what may be deleted once `newest` is
    saved."""
    if not Path(models_dir).is_dir():
        return []
    out = []
    for p in Path(models_dir).iterdir():
        m = _ROUND_FILE.match(p.name)
        if m and int(m.group(1)) <= newest - keep:
            out.append(p)
    return sorted(out)


def finished_run_leftovers(models_dir: Path) -> list[Path]:
    """The round files of a finished run but its newest (its final global model): what may be deleted once the run
    is finished. The final and best models stay, for a cross-site evaluation of them (pick_recorded_model)."""
    if not Path(models_dir).is_dir():
        return []
    rounds = [int(m.group(1)) for p in Path(models_dir).iterdir() if (m := _ROUND_FILE.match(p.name))]
    return stale_round_files(models_dir, max(rounds), keep=1) if rounds else []


def find_model_file(plan, candidates: Iterable[Path], sha_of: Callable[[Path], str], purpose: str = "resume") -> Path:
    """The first candidate file whose content hash (sha_of) is the one the run recorded for its model round (plan: a
    ResumePlan or a RecordedModel). sha_of raises ValueError for a file it cannot read as a model. Refuses (for
    `purpose`, a key of PURPOSES) naming the files when none exists (missing) or none matches (swapped, edited or
    damaged: not the recorded model)."""
    refused = PURPOSES[purpose]
    files = [Path(p) for p in candidates if Path(p).is_file()]
    what = f"run {plan.run_uid}'s global model of round {plan.model_round} (sha256 {plan.model_sha256[:16]}...)"
    if not files:
        raise refused(f"{purpose}: {what} is missing: no saved model file of the run on the server")
    seen = []
    for path in files:
        try:
            sha = sha_of(path)
        except ValueError as e:
            seen.append(f"{path.name}: unreadable ({e})")
            continue
        if sha == plan.model_sha256:
            return path
        seen.append(f"{path} has sha256 {sha[:16]}...")
    raise refused(
        f"{purpose}: no saved file matches {what}: {'; '.join(seen)} (edited or swapped since it was recorded); "
        f"refusing to {'resume from' if purpose == 'resume' else 'evaluate'} it"
    )
