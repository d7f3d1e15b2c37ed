import logging

import pytest

from fedmed.store.journal import Journal, ResilientRecorder, op_from_json, op_to_json
from fedmed.store.models import utcnow
from fedmed.store.repository import AlertRecord, Repository, RoundRecord, UpdateRecord


def _record(n):
    return RoundRecord(n, (UpdateRecord("hospital-a", "accepted", 10, trust=0.9, metrics={"val_auroc/Mass": 0.7}),
                           UpdateRecord("hospital-b", "missing", reason="timeout")),
                       test_mean_auroc=0.5 + n / 10, started_at=utcnow(),
                       alerts=(AlertRecord("hospital-b", "rejected", "NaN"),))


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
        assert rec.write("start_run", uid="u1", name="demo", job_id="j", aggregation="fedavg", num_rounds=3, config={}) is False
        for n in range(3):
            assert rec.write("record_round", run_uid="u1", record=_record(n)) is False
    assert rec.degraded and len(rec.journal.pending()) == 4
    assert caplog.text.count("database unavailable") == 1  # warned once per outage, not per round

    db_dir.mkdir()  # the database is back
    assert rec.write("finish_run", run_uid="u1", status="finished", best_round=2, best_metric=0.7) is True
    assert not rec.degraded and rec.journal.pending() == []
    assert rec.flush()  # replaying again changes nothing
    repo = Repository(url)
    run_id = repo.latest_run_id()
    rows = repo.rounds_table(run_id)
    assert [r.round_num for r in rows] == [0, 1, 2]  # each round exactly once, in order
    assert repo.get_run(run_id).status == "finished"
    assert len(repo.client_updates(run_id)) == 6 and len(repo.alerts(run_id)) == 3


def test_replay_keeps_what_it_could_not_write(tmp_path):
    journal = Journal(tmp_path / "j.jsonl")
    journal.append("start_run", {"uid": "u", "name": "n", "job_id": "j", "aggregation": "fedavg", "num_rounds": 1, "config": {}})
    journal.append("record_round", {"run_uid": "missing-run", "record": _record(0)})  # fails: no such run
    journal.append("record_round", {"run_uid": "u", "record": _record(1)})
    repo = Repository(f"sqlite:///{tmp_path / 'x.db'}")
    with pytest.raises(ValueError, match="no run with uid 'missing-run'"):
        journal.replay(lambda op, args: getattr(repo, op)(**args))
    assert len(journal.pending()) == 2  # the failed write and everything after it stay, in order
