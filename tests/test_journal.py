import json
import logging

import pytest

from fedmed.store.journal import (
    DEAD_LETTER_NAME,
    JOURNAL_NAME,
    Journal,
    ResilientRecorder,
    journal_path,
    op_from_json,
    op_to_json,
)
from fedmed.store.models import utcnow
from fedmed.store.repository import AlertRecord, Repository, RoundRecord, SiteAnchor, UpdateRecord


def _record(n):
    return RoundRecord(
        n,
        (
            UpdateRecord("hospital-a", "accepted", 10, trust=0.9, metrics={"val_auroc/Mass": 0.7}),
            UpdateRecord("hospital-b", "missing", reason="timeout"),
        ),
        score=0.5 + n / 10,
        score_name="mean_auroc",
        score_source="site_validation",
        mean_auroc=0.5 + n / 10,
        started_at=utcnow(),
        alerts=(AlertRecord("hospital-b", "rejected", "NaN"),),
        anchors=(SiteAnchor("hospital-a", 2, "ab" * 32, 1.5, 7, "cd" * 32),),  # journaled like the rest
    )


def test_a_line_journaled_before_rounds_counted_from_1_is_replayed_in_todays_numbering():
    """A journal left by the version before revision 0009 (rounds from 0, the mean AUROC in test_mean_auroc) is
    converted on replay as the migration converted the database."""
    legacy = json.dumps(
        {
            "op": "record_round",
            "args": {
                "run_uid": "u",
                "record": {
                    "round_num": 0,
                    "updates": [{"site": "hospital-a", "status": "accepted", "num_samples": 10, "val_mean_auroc": 0.7}],
                    "test_loss": 0.4,
                    "test_mean_auroc": 0.66,
                    "test_metrics": {},
                    "alerts": [],
                    "trust": [],
                },
            },
        }
    )
    op, args = op_from_json(legacy)
    rec = args["record"]
    assert (rec.round_num, rec.score, rec.score_name, rec.score_source) == (1, 0.66, "mean_auroc", "global_test")
    assert rec.updates[0].val_score == 0.7
    _, finish = op_from_json(
        json.dumps(
            {"op": "finish_run", "args": {"run_uid": "u", "status": "finished", "best_round": 0, "best_metric": 0.66}}
        )
    )
    assert finish["best_round"] == 1
    _, today = op_from_json(
        op_to_json("finish_run", {"run_uid": "u", "status": "finished", "best_round": 1, "best_metric": 0.66})
    )
    assert today["best_round"] == 1  # a line written today is not shifted again


def test_journal_lines_round_trip():
    rec = _record(3)
    op, args = op_from_json(op_to_json("record_round", {"run_uid": "u", "record": rec}))
    assert op == "record_round" and args["record"] == rec and args["run_uid"] == "u"
    with pytest.raises(ValueError, match="journal op must be one of"):
        op_to_json("drop_table", {})


def test_rounds_written_while_the_database_is_unreachable_are_replayed_once(tmp_path, caplog):
    # A real failure, not a mock: the SQLite file's folder does not exist yet, so every connect fails.
    db_dir = tmp_path / "not-yet"
    url = f"sqlite:///{db_dir / 'fedmed.db'}"
    rec = ResilientRecorder(lambda: Repository(url), Journal(tmp_path / "journal.jsonl"), logging.getLogger("t"))
    with caplog.at_level(logging.ERROR):
        assert (
            rec.write("start_run", uid="u1", name="demo", job_id="j", aggregation="fedavg", num_rounds=3, config={})
            is False
        )
        for n in (1, 2, 3):
            assert rec.write("record_round", run_uid="u1", record=_record(n)) is False
    assert rec.degraded and len(rec.journal.pending()) == 4
    assert caplog.text.count("database unavailable") == 1  # warned once per outage, not per round

    db_dir.mkdir()  # the database is back
    assert rec.write("finish_run", run_uid="u1", status="finished", best_round=3, best_metric=0.8) is True
    assert not rec.degraded and rec.journal.pending() == []
    assert rec.flush()  # replaying again changes nothing
    repo = Repository(url)
    run_id = repo.latest_run_id()
    rows = repo.rounds_table(run_id)
    assert [r.round_num for r in rows] == [1, 2, 3]  # each round exactly once, in order
    assert repo.get_run(run_id).status == "finished"
    assert len(repo.client_updates(run_id)) == 6 and len(repo.alerts(run_id)) == 3


def _start_args(uid):
    return {"uid": uid, "name": "n", "job_id": "j", "aggregation": "fedavg", "num_rounds": 3, "config": {}}


def _dead_letters(path):
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_unreplayable_lines_are_dead_lettered_and_the_rest_continue(tmp_path, caplog):
    """A torn line, a round of a run that does not exist and an over-long metric name each move to the dead-letter
    file with an alert; every line around them is still written, in order."""
    journal = Journal(journal_path(tmp_path, "job-1"))
    journal.append("start_run", _start_args("u"))
    journal.append("record_round", {"run_uid": "u", "record": _record(1)})
    with open(journal.path, "a") as f:
        f.write('{"op": "record_round", "args": {"run_uid": "u", "rec')  # a crash tore this line mid-write
    journal.append("record_round", {"run_uid": "missing-run", "record": _record(2)})
    evil = RoundRecord(2, (UpdateRecord("hospital-a", "accepted", 10, metrics={"m" * 300: 0.5}),))
    journal.append("record_round", {"run_uid": "u", "record": evil})
    journal.append("record_round", {"run_uid": "u", "record": _record(3)})
    url = f"sqlite:///{tmp_path / 'x.db'}"
    rec = ResilientRecorder(lambda: Repository(url), Journal(journal_path(tmp_path, "job-2")), logging.getLogger("t"))
    with caplog.at_level(logging.ERROR):
        assert rec.write("start_run", **_start_args("v")) is True  # the next job starts: replays job-1's journal
    assert journal.pending() == [] and not rec.degraded
    dead = _dead_letters(journal.dead_letters)
    assert [d["reason"].split(":")[0] for d in dead] == ["unreadable journal line", "ValueError", "ValueError"]
    assert "no run with uid 'missing-run'" in dead[1]["reason"] and dead[1]["round_num"] == 2
    assert "must match" in dead[2]["reason"] and "300 characters" in dead[2]["reason"]
    assert dead[0]["line"].endswith('"rec')  # the torn text is kept as it was
    assert caplog.text.count("ALERT dead letter") == 3
    repo = Repository(url)
    u = repo.run_id_for_job("j")
    runs = {repo.get_run(r).uid: r for r in (u - 1, u)}
    assert [r.round_num for r in repo.rounds_table(runs["u"])] == [1, 3]
    alerts = [a for a in repo.alerts(runs["v"]) if a["kind"] == "dead_letter"]
    assert len(alerts) == 3 and all(a["round"] == 0 and a["site"] == "" for a in alerts)
    assert repo.verify_audit() is None


def test_an_over_long_metric_name_is_dead_lettered_and_the_run_goes_on(tmp_path):
    url = f"sqlite:///{tmp_path / 'x.db'}"
    rec = ResilientRecorder(lambda: Repository(url), Journal.for_job(tmp_path, "job"), logging.getLogger("t"))
    assert rec.write("start_run", **_start_args("u"))
    evil = RoundRecord(
        1,
        (
            UpdateRecord("hospital-a", "accepted", 10, metrics={"x" * 201: 1.0}),
            UpdateRecord("hospital-b", "accepted", 10),
        ),
    )
    assert rec.write("record_round", run_uid="u", record=evil) is False  # refused, not journaled for ever
    assert rec.journal.pending() == [] and not rec.degraded
    assert rec.write("record_round", run_uid="u", record=_record(2)) is True  # later rounds still land
    assert rec.write("finish_run", run_uid="u", status="finished", best_round=2, best_metric=0.7) is True
    (dead,) = _dead_letters(rec.journal.dead_letters)
    assert "site 'hospital-a'" in dead["reason"] and dead["round_num"] == 1
    repo = Repository(url)
    run = repo.latest_run_id()
    assert [r.round_num for r in repo.rounds_table(run)] == [2]
    (alert,) = [a for a in repo.alerts(run) if a["kind"] == "dead_letter"]
    assert "201 characters" in alert["message"]


def test_the_repository_refuses_values_too_long_for_their_column_on_every_engine(db_url):
    repo = Repository(db_url)
    with pytest.raises(ValueError, match=r"runs.name is 300 characters, at most 200 fit"):
        repo.start_run("u", "n" * 300, "j", "fedavg", 1, {})
    assert repo.latest_run_id() is None  # nothing half-written
    repo.close()


def test_an_unopenable_database_keeps_lines_journaled_never_dead_lettered(tmp_path):
    """A database that cannot be opened is no line's fault: everything stays journaled. (With a key given: a URL
    with no audit key is refused before any of this, test_audit.py.)"""
    rec = ResilientRecorder(
        lambda: Repository("nosuchdialect://x/y", audit_key=b"k" * 32),
        Journal.for_job(tmp_path, "j"),
        logging.getLogger("t"),
    )
    assert rec.write("start_run", **_start_args("u")) is False
    assert rec.write("record_round", run_uid="u", record=_record(1)) is False
    assert len(rec.journal.pending()) == 2 and rec.degraded
    assert not rec.journal.dead_letters.exists()


def test_a_new_line_is_never_glued_onto_a_torn_one(tmp_path):
    journal = Journal(tmp_path / "j.jsonl")
    journal.path.write_text('{"op": "start_r')  # torn, no newline
    journal.append("start_run", _start_args("u"))
    lines = journal.pending()
    assert len(lines) == 2 and op_from_json(lines[1])[1]["uid"] == "u"


def test_journal_names_are_per_job_and_file_safe(tmp_path):
    assert journal_path(tmp_path, "1b2c-3d").name == "fedmed_db_journal.1b2c-3d.jsonl"
    assert journal_path(tmp_path, "../../etc/x").parent == tmp_path
    with pytest.raises(ValueError, match="job id"):
        journal_path(tmp_path, "")


def _reasons(dead) -> str:
    """Each dead letter's op, run, round and reason (the line itself is long and says less)."""
    rows = [json.loads(x) for x in dead.read_text().splitlines() if x.strip()]
    return "\n".join(f"{r.get('op')} {r.get('run_uid')} {r.get('round_num')}: {r.get('reason')}" for r in rows)


_WORKER = """
import sys
from fedmed.store.journal import Journal
from fedmed.store.repository import Repository, RoundRecord, UpdateRecord
path, url, uid, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
journal = Journal(path)
repo = Repository(url)
write = lambda op, args: getattr(repo, op)(**args)
journal.append("start_run", {"uid": uid, "name": uid, "job_id": uid, "aggregation": "fedavg", "num_rounds": n,
                             "config": {}})
for r in range(n):
    journal.append("record_round", {"run_uid": uid, "record": RoundRecord(r + 1, (UpdateRecord("h", "accepted", r),))})
    if r % 3 == 2:
        journal.replay(write)  # rewrites the journal while the others append to theirs (or to the same one)
"""


@pytest.mark.integration
@pytest.mark.parametrize("shared", [False, True], ids=["journal-per-job", "one-shared-journal"])
def test_four_jobs_sharing_a_workspace_lose_no_journal_line(tmp_path, shared):
    import os
    import subprocess
    import sys

    url = f"sqlite:///{tmp_path / 'fedmed.db'}"
    Repository(url).close()  # schema first, so the workers do not race to migrate
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the workers import the installed fedmed
    n, jobs = 30, [f"job{i}" for i in range(4)]
    paths = [tmp_path / JOURNAL_NAME if shared else journal_path(tmp_path, j) for j in jobs]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(p), url, j, str(n)], env=env, stderr=subprocess.PIPE, text=True
        )
        for p, j in zip(paths, jobs)
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    # What the workers left (e.g. 'database is locked' is transient) the next job replays.
    rec = ResilientRecorder(lambda: Repository(url), Journal.for_job(tmp_path, "next"), logging.getLogger("t"))
    assert rec.flush()
    dead = tmp_path / DEAD_LETTER_NAME
    assert rec.all_pending() == 0
    assert not dead.exists(), f"dead letters (why each line failed):\n{_reasons(dead)}"
    assert not list(tmp_path.glob("*.tmp"))
    repo = Repository(url)
    for j in jobs:
        assert [r.round_num for r in repo.rounds_table(repo.run_id_for_job(j))] == list(range(1, n + 1)), j
    assert repo.verify_audit() is None
