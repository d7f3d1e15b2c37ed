"""fedmed.cli.bench_privacy (scripts/bench_privacy.py) end to end on tiny generated hospitals: every row is measured and written, and the
epoch timing covers each requested (image size, batch) point."""

import re

import pytest

from fedmed.cli import bench_privacy


@pytest.fixture(scope="module")
def bench():
    return bench_privacy


def test_timing_points_parse_and_name_what_is_wrong(bench):
    assert bench.parse_timing_points("32x128, 128x16") == [(32, 128), (128, 16)]
    with pytest.raises(ValueError, match="'128' is not SIZExBATCH"):
        bench.parse_timing_points("128")
    with pytest.raises(ValueError, match="'16x4' needs an image size >= 32"):
        bench.parse_timing_points("16x4")
    with pytest.raises(ValueError, match="must include inf"):
        bench.parse_levels("8,3")


def test_tiny_run_writes_every_row_and_each_timing_point(bench, tmp_path, capsys):
    out = tmp_path / "bench.md"
    rc = bench.main(
        [
            "--data",
            str(tmp_path / "data"),
            "--per-site",
            "20",
            "--num-test",
            "20",
            "--rounds",
            "1",
            "--public-images",
            "30",
            "--public-epochs",
            "1",
            "--batch-size",
            "8",
            "--levels",
            "inf,8",
            "--timing-points",
            "32x4,48x8",
            "--timing-images",
            "8",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    text = out.read_text()
    rows = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines() if line.startswith("| ")}
    for name in ("public model, before any federated round", "no DP", "no DP, DP's layers only", "weak"):
        assert name in rows, f"row {name!r} missing from:\n{text}"
    auroc = float(rows["weak"].split(" | ")[4])
    assert 0.0 <= auroc <= 1.0
    assert float(rows["weak"].split(" | ")[3]) <= 8.0 + 1e-6  # epsilon spent stays under the ceiling
    timing = [line for line in text.splitlines() if re.match(r"\| (32|48) px \|", line)]
    assert [line.split(" | ")[:3] for line in timing] == [["| 32 px", "4", "8"], ["| 48 px", "8", "8"]]
    assert "--timing-points 32x4,48x8" in text  # the command line reproduces the run
