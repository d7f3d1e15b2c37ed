import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedmed.store.repository import Repository, RoundRecord, UpdateRecord, resolve_db_url

RECORD_0008 = Path(__file__).parent / "data" / "record_0008.json"
RECORD_0012 = Path(__file__).parent / "data" / "record_0012.json"  # update digests by SHA-256 (before 0013)


@pytest.fixture
def repo(db_url):
    r = Repository(db_url)
    yield r
    r.close()


def _round(n, auroc):
    return RoundRecord(
        round_num=n,
        updates=(
            UpdateRecord(
                "hospital-a",
                "accepted",
                100,
                update_norm=1.5,
                aggregation_weight=0.4,
                val_mean_auroc=0.7,
                metrics={"val_auroc/Mass": 0.8},
            ),
            UpdateRecord("hospital-b", "accepted", 150, update_norm=2.0, aggregation_weight=0.6),
            UpdateRecord("hospital-c", "missing", reason="no result before the round closed"),
        ),
        test_loss=0.3,
        score=auroc,
        score_name="mean_auroc",
        score_source="global_test",
        mean_auroc=auroc,
        test_metrics={"auroc/Mass": auroc},
    )


def test_rounds_round_trip(repo):
    run = repo.start_run("uid-1", "demo", "job-1", "fedavg", 2, {"lr": 1e-3})
    repo.record_round("uid-1", _round(1, 0.6))
    repo.record_round("uid-1", _round(2, 0.7))
    repo.finish_run("uid-1", "finished", 2, 0.7)
    rows = repo.rounds_table(run)
    assert [r.round_num for r in rows] == [1, 2]  # rounds count from 1, as the logs do
    assert rows[1].sites_accepted == ("hospital-a", "hospital-b")
    assert rows[1].sites_other == (("hospital-c", "missing"),)
    assert (rows[1].score, rows[1].score_name, rows[1].score_source) == (
        pytest.approx(0.7),
        "mean_auroc",
        "global_test",
    )
    assert repo.round_metrics(run, "global_test")[2]["auroc/Mass"] == pytest.approx(0.7)
    assert repo.round_metrics(run, "hospital-a")[1]["val_auroc/Mass"] == pytest.approx(0.8)
    assert repo.get_run(run).status == "finished" and repo.get_run(run).best_round == 2
    with pytest.raises(ValueError, match="round_num counts from 1"):
        _round(0, 0.5)
    with pytest.raises(ValueError, match="score_source must be one of"):
        RoundRecord(1, (), score_source="test")


def test_writes_are_idempotent(repo):
    run = repo.start_run("uid-1", "demo", "job-1", "fedavg", 1, {})
    assert repo.start_run("uid-1", "demo", "job-1", "fedavg", 1, {}) == run  # a replayed start is a no-op
    assert repo.start_run("uid-2", "demo", "job-1", "fedavg", 1, {}) != run  # the simulator reuses job ids
    repo.record_round("uid-1", _round(1, 0.6))
    repo.record_round("uid-1", _round(1, 0.65))  # replayed round replaces, never duplicates
    assert len(repo.rounds_table(run)) == 1
    assert len(repo.client_updates(run)) == 3
    assert repo.rounds_table(run)[0].score == pytest.approx(0.65)


def test_bad_status_and_url_are_named(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="status must be one of"):
        UpdateRecord("h", "maybe")
    with pytest.raises(ValueError, match="update of h: one digest per update"):
        UpdateRecord("h", "accepted", update_sha256="a" * 64, update_blake3="b" * 64)
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
    repo.record_round("uid-a", _round(1, 0.6))
    repo.record_round("uid-a", _round(2, 0.7))
    repo.finish_run("uid-a", "finished", 2, 0.7)
    assert repo.verify_audit() is None and repo.audit_rows() == 4
    script = Path(__file__).resolve().parents[1] / "scripts" / "audit_verify.py"
    ok = subprocess.run([sys.executable, str(script), "--db-url", db_url], capture_output=True, text=True)
    assert ok.returncode == 0 and "intact: 4 rows" in ok.stdout

    with repo.engine.begin() as conn:  # an insider edits round 1's record
        row_id = conn.execute(
            text("SELECT id FROM audit_log WHERE payload_json LIKE :p"), {"p": '%"round":2,%'}
        ).scalar()
        conn.execute(
            text("UPDATE audit_log SET payload_json = REPLACE(payload_json, 'accepted', 'rejected') WHERE id = :i"),
            {"i": row_id},
        )
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
    repo.record_round("uid-1", _round(1, 0.6))
    repo.record_round("uid-1", _round(2, 0.7))
    repo.record_round("uid-1", _round(3, 0.65))
    done = repo.start_run("uid-2", "demo", "job-2", "fedavg", 1, {})
    repo.finish_run("uid-2", "finished", 1, 0.5)
    other = repo.start_run("uid-3", "demo", "job-3", "fedavg", 1, {})
    assert repo.mark_interrupted(["job-1", "job-2"], "server restarted") == ["uid-1"]
    run = repo.get_run(orphan)
    assert run.status == "interrupted" and run.finished_at is not None
    assert (run.best_round, run.best_metric) == (2, pytest.approx(0.7))  # the best recorded round
    assert [r.round_num for r in repo.rounds_table(orphan)] == [1, 2, 3]
    assert repo.get_run(done).status == "finished" and repo.get_run(other).status == "running"
    assert repo.mark_interrupted(["job-1"], "again") == []  # only 'running' runs change
    assert repo.verify_audit() is None
    assert repo.run_id_for_job("job-1") == orphan and repo.run_id_for_job("nope") is None


def test_mark_interrupted_picks_the_best_round_by_the_tasks_score_not_its_auroc(repo):
    """A brain run's score is accuracy: the round with the best accuracy is best even where its AUROC is lower."""
    run = repo.start_run("uid-b", "brain", "job-b", "fedavg", 3, {"task": "brain_mri"})
    for n, accuracy, auroc in ((1, 0.5, 0.9), (2, 0.8, 0.7)):
        repo.record_round(
            "uid-b",
            RoundRecord(
                n,
                (),
                test_loss=0.3,
                score=accuracy,
                score_name="accuracy",
                score_source="global_test",
                mean_auroc=auroc,
            ),
        )
    repo.mark_interrupted(["job-b"], "server restarted")
    assert (repo.get_run(run).best_round, repo.get_run(run).best_metric) == (2, pytest.approx(0.8))


def _typed(table, row: dict) -> dict:
    """A JSON row of a recorded fixture as the column types want it (datetimes in UTC, booleans)."""
    from sqlalchemy import Boolean, DateTime

    out = {}
    for name, value in row.items():
        column_type = table.c[name].type
        if value is not None and isinstance(column_type, DateTime):
            value = dt.datetime.fromisoformat(value).replace(tzinfo=dt.timezone.utc)
        elif value is not None and isinstance(column_type, Boolean):
            value = bool(value)
        out[name] = value
    return out


def _load_record_0008(db_url: str, tmp_path: Path, tamper=None):
    """A database at Alembic revision 0008 holding the record fedmed wrote before rounds counted from 1 (three runs,
    a keyed audit chain, its heads file): tests/data/record_0008.json. Returns (audit key, heads file)."""
    return load_record(db_url, tmp_path, RECORD_0008, "0008", tamper)


def load_record(db_url: str, tmp_path: Path, fixture: Path, revision: str, tamper=None):
    """A database at Alembic `revision` holding the record an earlier fedmed wrote (tables, keyed audit chain, heads
    file) as `fixture` keeps it. Returns (audit key, heads file)."""
    from sqlalchemy import MetaData, create_engine, text

    from fedmed.store.migrate import upgrade

    data = json.loads(fixture.read_text())
    engine = create_engine(db_url)
    upgrade(engine, revision)
    meta = MetaData()
    meta.reflect(engine)
    with engine.begin() as conn:
        for name, rows in data["tables"].items():
            if rows:
                conn.execute(meta.tables[name].insert(), [_typed(meta.tables[name], r) for r in rows])
        if engine.dialect.name == "postgresql":  # explicit ids: move each sequence past them
            for name in data["tables"]:
                if "id" in meta.tables[name].c:
                    conn.execute(
                        text(
                            f"SELECT setval(pg_get_serial_sequence('{name}', 'id'), "
                            f"(SELECT COALESCE(MAX(id), 1) FROM {name}))"
                        )
                    )
        if tamper:
            conn.execute(text(tamper))
    engine.dispose()
    heads = tmp_path / "heads" / "audit_heads.log"
    heads.parent.mkdir()
    heads.write_text("\n".join(data["heads"]) + "\n")
    return bytes.fromhex(data["audit_key_hex"]), heads


def test_migration_0009_numbers_rounds_from_1_names_scores_and_keeps_the_audit_chain(db_url, tmp_path):
    key, heads = _load_record_0008(db_url, tmp_path)
    repo = Repository(db_url, audit_key=key, heads_file=heads)  # upgrades to head, as every server start does
    try:
        chest, brain, orphan = (repo.run_id_for_job(j) for j in ("job-chest", "job-brain", "job-orphan"))
        rows = repo.rounds_table(chest)
        assert [r.round_num for r in rows] == [1, 2] and repo.get_run(chest).best_round == 2
        assert [(r.score, r.score_name, r.score_source, r.mean_auroc) for r in rows] == [
            (pytest.approx(0.61), "mean_auroc", "global_test", pytest.approx(0.61)),
            (pytest.approx(0.72), "mean_auroc", "global_test", pytest.approx(0.72)),
        ]
        assert sorted(repo.round_metrics(chest, "global_test")) == [1, 2]
        assert [p["round"] for p in repo.privacy_spend(chest)] == [1, 2]
        assert sorted(a["round"] for a in repo.alerts(chest)) == [0, 1, 2]  # 0: the run-level alert
        assert {u["round"] for u in repo.client_updates(chest)} == {1, 2}
        # The brain run was scored by the sites' validation: its accuracy was never recorded per round, its AUROC
        # stays the mean AUROC and is no longer called the score.
        brain_rows = repo.rounds_table(brain)
        assert [(r.round_num, r.score, r.score_name, r.score_source) for r in brain_rows] == [
            (1, None, "accuracy", "site_validation"),
            (2, None, "accuracy", "site_validation"),
        ]
        assert [r.mean_auroc for r in brain_rows] == [pytest.approx(0.72), pytest.approx(0.82)]
        brain_a = [u for u in repo.client_updates(brain) if u["site"] == "hospital-a"]
        assert [(u["val_score"], u["val_mean_auroc"]) for u in brain_a] == [
            (pytest.approx(0.5), pytest.approx(0.7)),
            (pytest.approx(0.6), pytest.approx(0.8)),
        ]
        assert repo.verify_audit() is None
        assert repo.mark_interrupted(["job-orphan"], "server restarted") == ["orphan-run"]
        assert (repo.get_run(orphan).best_round, repo.get_run(orphan).best_metric) == (1, pytest.approx(0.66))
        assert repo.verify_audit() is None
    finally:
        repo.close()
    env = {**os.environ, "FEDMED_AUDIT_KEY": key.hex()}
    cli = subprocess.run(
        [sys.executable, "-m", "fedmed.cli.audit_verify", "--db-url", db_url, "--heads", str(heads)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert cli.returncode == 0, cli.stdout + cli.stderr
    again = Repository(db_url, audit_key=key, heads_file=heads)  # a second start migrates and re-vouches nothing
    try:
        assert again.audit_rows() == repo.audit_rows() and again.verify_audit() is None
    finally:
        again.close()


def test_an_edit_made_before_migration_0009_is_still_found(db_url, tmp_path):
    key, heads = _load_record_0008(
        db_url,
        tmp_path,
        tamper="UPDATE client_updates SET num_samples = 999 WHERE id = (SELECT MIN(id) FROM client_updates)",
    )
    repo = Repository(db_url, audit_key=key, heads_file=heads)
    try:
        problem = repo.verify_audit()
        assert problem is not None and problem.table == "audit_log"
        assert "edited before the migration" in problem.reason and "client_updates" in problem.reason
    finally:
        repo.close()


def test_migration_0009_goes_back_down(db_url, tmp_path):
    from sqlalchemy import create_engine, text

    from fedmed.store.migrate import downgrade, upgrade

    _load_record_0008(db_url, tmp_path)
    engine = create_engine(db_url)
    upgrade(engine)
    downgrade(engine, "0008")
    with engine.connect() as conn:
        rounds = conn.execute(text("SELECT round_num, test_mean_auroc FROM rounds ORDER BY id")).all()
        best = conn.execute(text("SELECT best_round FROM runs ORDER BY id")).scalars().all()
    engine.dispose()
    original = json.loads(RECORD_0008.read_text())["tables"]
    assert [tuple(r) for r in rounds] == [
        (r["round_num"], pytest.approx(r["test_mean_auroc"])) for r in original["rounds"]
    ]
    assert best == [r["best_round"] for r in original["runs"]]
