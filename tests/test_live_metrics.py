"""What a round publishes while the job runs: TensorBoard scalars (pure) and a report rewritten without torn files."""

import math
import os

import pytest

from fedmed.display.live_metrics import Scalar, round_scalars
from fedmed.display.report import write_atomic, write_report
from fedmed.store.repository import Repository, RoundRecord, TrustRecord, UpdateRecord


def _record(round_num=2, **kw):
    updates = (
        # sites that differ in every published value, so a mix-up between sites or quantities shows
        UpdateRecord("hospital-b", "accepted", 80, aggregation_weight=0.55, trust=0.9, val_score=0.71, epsilon=1.5),
        UpdateRecord("hospital-a", "accepted", 100, aggregation_weight=0.45, trust=0.8, val_score=0.64, epsilon=2.5),
        UpdateRecord("hospital-c", "missing", 0, reason="not sent this round"),
    )
    args = dict(
        updates=updates,
        test_loss=0.31,
        score=0.66,
        score_name="mean_auroc",
        score_source="global_test",
        mean_auroc=0.66,
        test_metrics={"auroc/Effusion": 0.7, "loss": 0.31},
        trust=(TrustRecord("hospital-a", 0.85, False, 2), TrustRecord("hospital-b", 0.95, False, 3)),
    )
    args.update(kw)
    return RoundRecord(round_num, **args)


def test_a_round_publishes_the_global_score_and_each_sites_validation_trust_weight_and_epsilon():
    got = {s.tag: s.value for s in round_scalars(_record())}
    assert got == {
        "global/mean_auroc": 0.66,
        "global/test_loss": 0.31,
        "global/sites_aggregated": 2.0,
        "global_test/auroc/Effusion": 0.7,  # the test loss once, as global/test_loss
        "site_validation/hospital-a": 0.64,
        "site_validation/hospital-b": 0.71,
        "trust/hospital-a": 0.85,  # trust after the round (the record's trust states), not the update's
        "trust/hospital-b": 0.95,
        "aggregation_weight/hospital-a": 0.45,
        "aggregation_weight/hospital-b": 0.55,
        "epsilon/hospital-a": 2.5,
        "epsilon/hospital-b": 1.5,
    }  # hospital-c sent nothing: no validation, weight, trust or epsilon is invented for it
    assert all(isinstance(s, Scalar) and s.step == 2 for s in round_scalars(_record()))  # rounds from 1


@pytest.mark.parametrize(
    "changes, present, absent",
    [
        # an accuracy task scored by the sites (no server test set): score named for the task, mean AUROC beside it
        (
            dict(score=0.5, score_name="accuracy", score_source="site_validation", mean_auroc=0.8, test_loss=None),
            {"global/accuracy": 0.5, "global/mean_auroc": 0.8},
            {"global/test_loss"},
        ),
        # a round that aggregated nothing (every site quarantined): no score, the sites' state still shows
        (dict(score=None, score_name=None, mean_auroc=None, test_loss=None, test_metrics={}), {}, {"global/score"}),
        # non-finite values (a diverged test loss) are left out rather than written as NaN points
        (dict(test_loss=math.nan, mean_auroc=math.inf, score=math.inf), {}, {"global/test_loss", "global/mean_auroc"}),
    ],
)
def test_what_a_round_without_some_values_publishes(changes, present, absent):
    got = {s.tag: s.value for s in round_scalars(_record(**changes))}
    assert present.items() <= got.items()
    assert not absent & set(got)
    assert got["trust/hospital-a"] == 0.85 and got["aggregation_weight/hospital-b"] == 0.55


def test_the_report_is_replaced_whole_and_a_failed_write_leaves_the_old_one(tmp_path, monkeypatch):
    path = tmp_path / "report.html"
    write_atomic(path, b"round 1")
    assert path.read_bytes() == b"round 1" and oct(path.stat().st_mode & 0o777) == "0o644"

    real_fdopen = os.fdopen

    class FullDisk:  # the temp file gets part of the page, then the disk is full
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            self.f.write(data[:10])
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fdopen", lambda fd, mode: FullDisk(real_fdopen(fd, mode)))
    with pytest.raises(OSError, match="No space left"):
        write_atomic(path, b"round 2" * 100_000)
    monkeypatch.undo()
    assert path.read_bytes() == b"round 1"  # the reader still has the last whole report
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]  # no temp file left behind


def test_the_report_rewritten_after_each_round_shows_every_round_so_far(tmp_path):
    repo = Repository(f"sqlite:///{tmp_path / 'r.db'}")
    try:
        repo.start_run("u", "live", "job-1", "geometric_median", 3, {})
        out = tmp_path / "report"
        for n in (1, 2):
            repo.record_round("u", _record(round_num=n, score=0.5 + n / 10))
            page = write_report(repo, repo.run_id_for_job("job-1"), out).read_text()
            assert page.count("<tr><td>") >= n and f"{0.5 + n / 10:.4f}" in page
        assert "status running" in page  # the job has not finished: the page says so
        assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    finally:
        repo.close()


def test_reports_are_drawn_off_the_round_and_only_the_newest_waiting_one_is_drawn():
    import threading

    from fedmed.flare.live_metrics import LatestOnly

    drawing, release = threading.Event(), threading.Event()
    drawn, errors = [], []

    def draw(round_num):
        drawing.set()
        release.wait(10)
        if round_num == 4:
            raise OSError("disk full")
        drawn.append(round_num)

    reports = LatestOnly(draw, errors.append, "test-report")
    reports.submit(1)
    assert drawing.wait(10)  # round 1's report is being drawn; the rounds go on meanwhile
    for n in (2, 3):
        reports.submit(n)  # round 2's is replaced by round 3's before it is started
    release.set()
    assert reports.wait(10) and drawn == [1, 3] and errors == []
    reports.submit(4)  # a failing report reaches on_error, not the caller
    assert reports.wait(10) and [str(e) for e in errors] == ["disk full"]
    reports.submit(6)  # and the next round's report is drawn again
    assert reports.wait(10) and drawn == [1, 3, 6]


def test_reports_are_drawn_at_most_once_an_interval_and_at_once_when_urgent():
    import time

    from fedmed.flare.live_metrics import LatestOnly

    drawn, errors = [], []
    reports = LatestOnly(drawn.append, errors.append, "test-report", min_interval=3600)
    reports.submit(1)  # the first report is drawn at once
    deadline = time.monotonic() + 10
    while drawn != [1] and time.monotonic() < deadline:
        reports.wait(0.05)
    assert drawn == [1]
    reports.submit(2)
    reports.submit(3)  # within the interval: waiting, only the newest kept
    assert not reports.wait(0.2) and drawn == [1]  # the thread is waiting out the interval, nothing drawn
    reports.submit(4, urgent=True)  # the run's end: drawn now, with the newest round
    assert reports.wait(10) and drawn == [1, 4] and errors == []
