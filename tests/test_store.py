import pytest

from fedmed.store.repository import Repository, RoundRecord, UpdateRecord, resolve_db_url


@pytest.fixture
def repo(tmp_path):
    r = Repository(f"sqlite:///{tmp_path / 'fedmed.db'}")
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
    run = repo.start_run("demo", "job-1", "fedavg", 2, {"lr": 1e-3})
    repo.record_round(run, _round(0, 0.6))
    repo.record_round(run, _round(1, 0.7))
    repo.finish_run(run, "finished", 1, 0.7)
    rows = repo.rounds_table(run)
    assert [r.round_num for r in rows] == [0, 1]
    assert rows[1].sites_accepted == ("hospital-a", "hospital-b")
    assert rows[1].sites_other == (("hospital-c", "missing"),)
    assert rows[1].test_mean_auroc == pytest.approx(0.7)
    assert repo.round_metrics(run, "global_test")[1]["auroc/Mass"] == pytest.approx(0.7)
    assert repo.round_metrics(run, "hospital-a")[0]["val_auroc/Mass"] == pytest.approx(0.8)
    assert repo.get_run(run).status == "finished" and repo.get_run(run).best_round == 1


def test_writes_are_idempotent(repo):
    run = repo.start_run("demo", "job-1", "fedavg", 1, {})
    assert repo.start_run("demo", "job-1", "fedavg", 1, {}) != run  # the simulator reuses job ids: a new run
    repo.record_round(run, _round(0, 0.6))
    repo.record_round(run, _round(0, 0.65))  # replayed round replaces, never duplicates
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
