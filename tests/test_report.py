import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from fedmed.report import FIGURES
from fedmed.store.repository import AlertRecord, Repository, RoundRecord, UpdateRecord

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "report.py"


def test_report_renders_every_figure_from_the_database(tmp_path):
    url = f"sqlite:///{tmp_path / 'r.db'}"
    repo = Repository(url)
    repo.start_run("u", "demo", "job", "geometric_median", 3, {})
    for n in range(3):
        repo.record_round("u", RoundRecord(
            n,
            (UpdateRecord("hospital-a", "accepted", 100, trust=1.0, distance=1.0, epsilon=0.5 * (n + 1), delta=1e-5),
             UpdateRecord("hospital-b", "accepted", 80, trust=0.9, distance=1.2, epsilon=0.4 * (n + 1), delta=1e-5),
             UpdateRecord("hospital-c", "quarantined" if n else "accepted", 90, trust=0.5 / (n + 1), distance=9.0,
                          reason="quarantined (trust 0.25)" if n else None)),
            test_loss=0.3 - n / 100, test_mean_auroc=0.6 + n / 20,
            alerts=(AlertRecord("hospital-c", "quarantined", "hospital-c quarantined: trust 0.25 < 0.5"),) if n == 1 else (),
        ))
    repo.finish_run("u", "finished", 2, 0.7)
    out = tmp_path / "report"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--db-url", url, "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    page = (out / "report.html").read_text()
    assert "hospital-c quarantined" in page and "geometric_median" in page
    for name in FIGURES:
        assert f'src="{name}"' in page
        img = np.asarray(Image.open(out / name).convert("L"), dtype=float)
        assert img.shape[0] > 200 and img.std() > 5  # a drawn figure, not a blank canvas


def test_report_without_rounds_says_so(tmp_path):
    url = f"sqlite:///{tmp_path / 'e.db'}"
    Repository(url).start_run("u", "demo", "job", "fedavg", 1, {})
    proc = subprocess.run([sys.executable, str(SCRIPT), "--db-url", url, "--out", str(tmp_path / "o")],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "has no recorded rounds" in proc.stderr
