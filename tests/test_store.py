import pytest

from fedmed.store.repository import Repository, RoundRecord, UpdateRecord, resolve_db_url


@pytest.fixture
def repo(db_url):
    r = Repository(db_url)
    yield r
    r.close()


def _round(n, auroc):
    return RoundRecord(
        round_num=n,
        updates=(
            UpdateRecord("hospital-a", "accepted", 100, update_norm=1.5, aggregation_weight=0.4, val_mean_auroc=0.7,
                         metrics={"val_auroc/Mass": 0.8}),
            UpdateRecord("hospital-b", "accepted", 150, update_norm=2.0, aggregation_weight=0.6),
            UpdateRecord("hospital-c", "missing", reason="no result before the round closed"),
        ),
        test_loss=0.3,
        test_mean_auroc=auroc,
        test_metrics={"auroc/Mass": auroc},
    )


def test_rounds_round_trip(repo):
    run = repo.start_run("uid-1", "demo", "job-1", "fedavg", 2, {"lr": 1e-3})
    repo.record_round("uid-1", _round(0, 0.6))
    repo.record_round("uid-1", _round(1, 0.7))
    repo.finish_run("uid-1", "finished", 1, 0.7)
    rows = repo.rounds_table(run)
    assert [r.round_num for r in rows] == [0, 1]
    assert rows[1].sites_accepted == ("hospital-a", "hospital-b")
    assert rows[1].sites_other == (("hospital-c", "missing"),)
    assert rows[1].test_mean_auroc == pytest.approx(0.7)
    assert repo.round_metrics(run, "global_test")[1]["auroc/Mass"] == pytest.approx(0.7)
    assert repo.round_metrics(run, "hospital-a")[0]["val_auroc/Mass"] == pytest.approx(0.8)
    assert repo.get_run(run).status == "finished" and repo.get_run(run).best_round == 1


def test_writes_are_idempotent(repo):
    run = repo.start_run("uid-1", "demo", "job-1", "fedavg", 1, {})
    assert repo.start_run("uid-1", "demo", "job-1", "fedavg", 1, {}) == run  # a replayed start is a no-op
    assert repo.start_run("uid-2", "demo", "job-1", "fedavg", 1, {}) != run  # the simulator reuses job ids
    repo.record_round("uid-1", _round(0, 0.6))
    repo.record_round("uid-1", _round(0, 0.65))  # replayed round replaces, never duplicates
    assert len(repo.rounds_table(run)) == 1
    assert len(repo.client_updates(run)) == 3
    assert repo.rounds_table(run)[0].test_mean_auroc == pytest.approx(0.65)


def test_bad_status_and_url_are_named(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="status must be one of"):
        UpdateRecord("h", "maybe")
    with pytest.raises(ValueError, match="dialect://"):
        Repository(str(tmp_path / "x.db"))
    monkeypatch.delenv("FEDMED_DB_URL", raising=False)
    assert resolve_db_url(tmp_path).startswith("sqlite:///")
    monkeypatch.setenv("FEDMED_DB_URL", "postgresql+psycopg2://u@127.0.0.1/db")
    assert resolve_db_url(tmp_path).startswith("postgresql")
    with pytest.raises(ValueError, match="no run with id"):
        Repository(f"sqlite:///{tmp_path / 'y.db'}").get_run(99)


def test_migrations_upgrade_and_downgrade(db_url):
    from sqlalchemy import create_engine, inspect

    from fedmed.store.migrate import downgrade, upgrade
    from fedmed.store.models import Base

    engine = create_engine(db_url)
    upgrade(engine)
    tables = set(inspect(engine).get_table_names())
    assert set(Base.metadata.tables) <= tables and "alembic_version" in tables
    downgrade(engine)
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    upgrade(engine)  # and back up again
    assert set(Base.metadata.tables) <= set(inspect(engine).get_table_names())


def test_models_and_migrations_do_not_drift(db_url):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext
    from sqlalchemy import create_engine

    from fedmed.store.migrate import upgrade
    from fedmed.store.models import Base

    engine = create_engine(db_url)
    upgrade(engine)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == [], f"models changed without a migration: {diff}"


def test_audit_chain_verifies_and_names_a_tampered_row(repo, db_url):
    import subprocess
    import sys
    from pathlib import Path

    from sqlalchemy import text

    repo.start_run("uid-a", "demo", "job", "fedavg", 2, {})
    repo.record_round("uid-a", _round(0, 0.6))
    repo.record_round("uid-a", _round(1, 0.7))
    repo.finish_run("uid-a", "finished", 1, 0.7)
    assert repo.verify_audit() is None and repo.audit_rows() == 4
    script = Path(__file__).resolve().parents[1] / "scripts" / "audit_verify.py"
    ok = subprocess.run([sys.executable, str(script), "--db-url", db_url], capture_output=True, text=True)
    assert ok.returncode == 0 and "intact: 4 rows" in ok.stdout

    with repo.engine.begin() as conn:  # an insider edits round 1's record
        row_id = conn.execute(text("SELECT id FROM audit_log WHERE payload_json LIKE :p"), {"p": '%"round":1,%'}).scalar()
        conn.execute(text("UPDATE audit_log SET payload_json = REPLACE(payload_json, 'accepted', 'rejected') WHERE id = :i"),
                     {"i": row_id})
    problem = repo.verify_audit()
    assert problem.row_id == row_id and "edited" in problem.reason
    bad = subprocess.run([sys.executable, str(script), "--db-url", db_url], capture_output=True, text=True)
    assert bad.returncode == 1 and f"row {row_id}" in bad.stderr

    with repo.engine.begin() as conn:  # or deletes a row: the next one no longer links
        conn.execute(text("DELETE FROM audit_log WHERE id = :i"), {"i": row_id})
    problem = repo.verify_audit()
    assert problem.row_id > row_id and "removed" in problem.reason


def test_runs_orphaned_by_a_server_restart_end_interrupted_with_their_rounds(repo):
    orphan = repo.start_run("uid-1", "demo", "job-1", "fedavg", 5, {})
    repo.record_round("uid-1", _round(0, 0.6))
    repo.record_round("uid-1", _round(1, 0.7))
    repo.record_round("uid-1", _round(2, 0.65))
    done = repo.start_run("uid-2", "demo", "job-2", "fedavg", 1, {})
    repo.finish_run("uid-2", "finished", 0, 0.5)
    other = repo.start_run("uid-3", "demo", "job-3", "fedavg", 1, {})
    assert repo.mark_interrupted(["job-1", "job-2"], "server restarted") == ["uid-1"]
    run = repo.get_run(orphan)
    assert run.status == "interrupted" and run.finished_at is not None
    assert (run.best_round, run.best_metric) == (1, pytest.approx(0.7))  # the best recorded round
    assert [r.round_num for r in repo.rounds_table(orphan)] == [0, 1, 2]
    assert repo.get_run(done).status == "finished" and repo.get_run(other).status == "running"
    assert repo.mark_interrupted(["job-1"], "again") == []  # only 'running' runs change
    assert repo.verify_audit() is None
    assert repo.run_id_for_job("job-1") == orphan and repo.run_id_for_job("nope") is None
