import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from fedmed.display.report import FIGURES, write_report
from fedmed.store.repository import AlertRecord, Repository, RoundRecord, UpdateRecord

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "report.py"


def test_report_renders_every_figure_from_the_database(tmp_path):
    url = f"sqlite:///{tmp_path / 'r.db'}"
    repo = Repository(url)
    repo.start_run("u", "demo", "job", "geometric_median", 3, {})
    for n in range(3):
        repo.record_round(
            "u",
            RoundRecord(
                n + 1,
                (
                    UpdateRecord(
                        "hospital-a", "accepted", 100, trust=1.0, distance=1.0, epsilon=0.5 * (n + 1), delta=1e-5
                    ),
                    UpdateRecord(
                        "hospital-b", "accepted", 80, trust=0.9, distance=1.2, epsilon=0.4 * (n + 1), delta=1e-5
                    ),
                    UpdateRecord(
                        "hospital-c",
                        "quarantined" if n else "accepted",
                        90,
                        trust=0.5 / (n + 1),
                        distance=9.0,
                        reason="quarantined (trust 0.25)" if n else None,
                    ),
                ),
                test_loss=0.3 - n / 100,
                score=0.6 + n / 20,
                score_name="mean_auroc",
                score_source="global_test",
                mean_auroc=0.6 + n / 20,
                alerts=(AlertRecord("hospital-c", "quarantined", "hospital-c quarantined: trust 0.25 < 0.5"),)
                if n == 1
                else (),
            ),
        )
    repo.finish_run("u", "finished", 3, 0.7)
    out = tmp_path / "report"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--db-url", url, "--out", str(out)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    page = (out / "report.html").read_text()
    assert "hospital-c quarantined" in page and "geometric_median" in page
    assert "best round 3 (global test mean AUROC 0.7000)" in page
    for name in FIGURES:
        assert f'src="{name}"' in page
        img = np.asarray(Image.open(out / name).convert("L"), dtype=float)
        assert img.shape[0] > 200 and img.std() > 5  # a drawn figure, not a blank canvas


def test_report_without_rounds_says_so(tmp_path):
    url = f"sqlite:///{tmp_path / 'e.db'}"
    Repository(url).start_run("u", "demo", "job", "fedavg", 1, {})
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--db-url", url, "--out", str(tmp_path / "o")], capture_output=True, text=True
    )
    assert proc.returncode != 0 and "has no recorded rounds" in proc.stderr


def _row(n, score, source, name="accuracy", auroc=None, loss=None):
    from fedmed.store.repository import RoundRow

    return RoundRow(n, ("hospital-a",), (), score, name, source, auroc, loss)


def test_the_score_is_named_for_what_it_is_and_no_axis_is_empty():
    """Without a server test set the score is the sites' weighted validation score, not a test score, and there is
    no test-loss axis to leave empty; with one, the test loss gets its axis."""
    from fedmed.display.report import score_figure

    fig = score_figure([_row(1, 0.5, "site_validation", auroc=0.7), _row(2, 0.6, "site_validation", auroc=0.8)])
    (ax,) = fig.axes  # no second (loss) axis
    labels = [line.get_label() for line in ax.get_lines()]
    assert labels == ["sites' weighted validation accuracy", "sites' weighted validation mean AUROC"]
    assert not any("test" in label for label in labels) and ax.get_ylabel() == "accuracy"
    fig = score_figure(
        [_row(1, 0.7, "global_test", "mean_auroc", 0.7, 0.4), _row(2, 0.8, "global_test", "mean_auroc", 0.8, 0.3)]
    )
    ax, loss_axis = fig.axes
    assert [line.get_label() for line in ax.get_lines()] == ["global test mean AUROC"]  # no duplicate AUROC line
    assert [line.get_label() for line in loss_axis.get_lines()] == ["global test loss"]


def test_sites_with_identical_values_stay_distinguishable():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fedmed.display.report import site_lines

    rows = [
        {"round": r, "site": s, "trust": 1.0} for r in (1, 2, 3) for s in ("hospital-a", "hospital-b", "hospital-c")
    ]
    fig, ax = plt.subplots()
    site_lines(ax, rows, "trust")
    lines = ax.get_lines()
    assert [line.get_label() for line in lines] == ["hospital-a", "hospital-b", "hospital-c"]
    assert len({line.get_marker() for line in lines}) == 3 and len({line.get_linestyle() for line in lines}) == 3
    xs = [tuple(line.get_xdata()) for line in lines]
    assert len(set(xs)) == 3 and all(abs(x - r) < 0.2 for line_x in xs for x, r in zip(line_x, (1, 2, 3)))
    plt.close(fig)


def test_a_run_scored_by_the_sites_says_so_in_the_page(tmp_path):
    url = f"sqlite:///{tmp_path / 'v.db'}"
    repo = Repository(url)
    repo.start_run("u", "brain", "job", "geometric_median", 2, {"task": "brain_mri"})
    for n in (1, 2):
        repo.record_round(
            "u",
            RoundRecord(
                n,
                (UpdateRecord("hospital-a", "accepted", 10, trust=1.0),),
                score=0.4 + n / 10,
                score_name="accuracy",
                score_source="site_validation",
                mean_auroc=0.7,
            ),
        )
    repo.record_alert("u", "dead_letter", "a journal line could not be written")
    repo.finish_run("u", "finished", 2, 0.6)
    page = write_report(repo, repo.latest_run_id(), tmp_path / "out").read_text()
    assert "best round 2 (sites&#x27; weighted validation accuracy 0.6000)" in page
    assert "test loss" not in page and "test mean AUROC" not in page
    assert "<td>run</td><td></td><td>dead_letter</td>" in page  # the run-level alert is not "round 0"


def test_the_rounds_table_names_the_score_and_numbers_rounds_as_the_log(tmp_path):
    from fedmed.cli.rounds_table import format_table

    repo = Repository(f"sqlite:///{tmp_path / 't.db'}")
    repo.start_run("u", "brain", "job", "fedavg", 2, {"task": "brain_mri"})
    for n in (1, 2):
        repo.record_round(
            "u",
            RoundRecord(
                n,
                (UpdateRecord("hospital-a", "accepted", 10),),
                score=0.4 + n / 10,
                score_name="accuracy",
                score_source="site_validation",
                mean_auroc=0.75,
            ),
        )
    repo.finish_run("u", "finished", 2, 0.6)
    lines = format_table(repo, repo.latest_run_id()).splitlines()
    assert "sites' val accuracy" in lines[1] and "mean AUROC" in lines[1] and "test" not in lines[1].split("AUROC")[0]
    assert [line.split()[0] for line in lines[2:4]] == ["1", "2"]
    assert lines[-2:] == ["best: round 2, sites' val accuracy 0.6000", "final global model: sites' val accuracy 0.6000"]
