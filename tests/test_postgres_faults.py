"""Nothing is lost when the real PostgreSQL server goes away in the middle of a run."""

import logging

import pytest

from fedmed.store.journal import Journal, ResilientRecorder
from fedmed.store.repository import Repository, RoundRecord, UpdateRecord

pytestmark = pytest.mark.integration


def _record(n):
    return RoundRecord(
        n,
        tuple(UpdateRecord(s, "accepted", 10 + n, trust=1.0) for s in ("hospital-a", "hospital-b")),
        score=0.5 + n / 100,
        score_name="mean_auroc",
        score_source="site_validation",
    )


def test_server_stopped_mid_run_then_restarted_loses_nothing(pg_cluster, pg_audit_key, tmp_path, caplog):
    url = pg_cluster.create_database()
    rec = ResilientRecorder(lambda: Repository(url), Journal(tmp_path / "journal.jsonl"), logging.getLogger("fault"))
    assert rec.write(
        "start_run", uid="run-1", name="fault", job_id="j", aggregation="geometric_median", num_rounds=8, config={}
    )
    for n in range(1, 4):
        assert rec.write("record_round", run_uid="run-1", record=_record(n)) is True

    pg_cluster.stop()  # the database goes away mid-run
    try:
        with caplog.at_level(logging.ERROR):
            for n in range(4, 7):
                assert rec.write("record_round", run_uid="run-1", record=_record(n)) is False  # training goes on
        assert rec.degraded and len(rec.journal.pending()) == 3
        assert "database unavailable" in caplog.text
    finally:
        pg_cluster.start()  # and comes back later

    for n in range(7, 9):
        assert rec.write("record_round", run_uid="run-1", record=_record(n)) is True  # replays first, in order
    assert rec.write("finish_run", run_uid="run-1", status="finished", best_round=8, best_metric=0.58)
    rec.close()

    repo = Repository(url)
    run_id = repo.latest_run_id()
    rows = repo.rounds_table(run_id)
    assert [r.round_num for r in rows] == list(range(1, 9))  # every round exactly once
    assert len(repo.client_updates(run_id)) == 16
    assert rec.journal.pending() == []
    assert repo.verify_audit() is None  # 1 start + 8 rounds + 1 finish, chained
    assert repo.audit_rows() == 10
    repo.close()


def test_a_value_postgresql_refuses_is_dead_lettered_and_later_rounds_land(pg_cluster, pg_audit_key, tmp_path, caplog):
    """A site claims 2**40 samples: SQLite would store it, PostgreSQL's integer column refuses it (DataError). That
    line can never be written, so it must not hold back the rounds after it."""
    from fedmed.store.journal import journal_path

    url = pg_cluster.create_database()
    rec = ResilientRecorder(lambda: Repository(url), Journal(journal_path(tmp_path, "job")), logging.getLogger("fault"))
    assert rec.write("start_run", uid="run-1", name="dl", job_id="j", aggregation="fedavg", num_rounds=3, config={})
    evil = RoundRecord(1, (UpdateRecord("hospital-a", "accepted", 2**40),))
    with caplog.at_level(logging.ERROR):
        assert rec.write("record_round", run_uid="run-1", record=evil) is False
    assert "DataError" in caplog.text and not rec.degraded and rec.journal.pending() == []
    for n in (1, 2):
        assert rec.write("record_round", run_uid="run-1", record=_record(n)) is True
    rec.close()
    dead = rec.journal.dead_letters.read_text().splitlines()
    assert len(dead) == 1 and "DataError" in dead[0]
    repo = Repository(url)
    run_id = repo.latest_run_id()
    assert [r.round_num for r in repo.rounds_table(run_id)] == [1, 2]
    assert [a["kind"] for a in repo.alerts(run_id)] == ["dead_letter"]
    assert repo.verify_audit() is None
    repo.close()
