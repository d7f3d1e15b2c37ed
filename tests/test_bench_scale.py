"""fedmed.cli.bench_scale (scripts/bench_scale.py) and fedmed.cli.bench_overhead (scripts/bench_overhead.py) on tiny
inputs: each writes its document with measured numbers, and the command line that reproduces it."""

import re

import pytest

from fedmed.cli import bench_overhead, bench_scale
from fedmed.server.heap import _malloc_trim


def _rows(text: str, first: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith(first)]


def test_round_engine_part_writes_a_row_per_site_count_and_a_plot(tmp_path):
    out = tmp_path / "bench_scale.md"
    # an earlier document: its generated part is replaced, its hand-written part (from the marker on) kept
    out.write_text(f"# old\n\n| 3 | stale |\n\n{bench_scale.KEEP_MARKER}\n\n## Floor\n\nhand-written analysis\n")
    assert bench_scale.main(["--quick", "--skip-simulator", "--db", "sqlite", "--out", str(out)]) == 0
    text = out.read_text()
    assert "stale" not in text and text.count(bench_scale.KEEP_MARKER) == 1
    assert text.index("| step, 5 sites |") < text.index(bench_scale.KEEP_MARKER) < text.index("hand-written analysis")
    assert "Command: `python scripts/bench_scale.py --quick --skip-simulator --db sqlite --out" in text
    assert "Load average at the start: " in text and "CPU cores" in text
    rows = _rows(text, "| 3 |") + _rows(text, "| 5 |")
    assert [r[0] for r in rows] == ["3", "5"]
    for r in rows:
        step = float(r[2].split()[0])
        record = float(r[3])
        assert step > 0 and record > 0 and float(r[4].strip("*")) == pytest.approx(step + record, abs=0.011)
        assert float(r[6].rstrip("x")) > 0  # traced peak, a multiple of the updates held
    assert re.search(r"step \+ record = -?\d+\.\d+ s \+ -?\d+ ms x sites, R\^2 = ", text)
    # the step at the largest K under each thread setting, with its ratio to one BLAS thread
    modes = {r[1]: r for r in _rows(text, "| step, 5 sites |")}
    assert set(modes) == {"default", "one-thread", "oversubscribed"}
    assert modes["one-thread"][4] == "1.00x" and all(float(r[3]) > 0 for r in modes.values())
    assert out.with_suffix(".png").stat().st_size > 1000
    # per-phase CPU of the last round of each K: the phases the engine runs, and a step that holds them all
    phases = {r[0]: r[1:] for r in _rows(text, "| ") if len(r) == 3 and not r[0].startswith("-")}
    for label in (
        "screening (checks, BLAKE3, norm, signs, sketch, finiteness)",
        "combine (the median's weighted sum)",
    ):
        assert all(float(c.split()[0]) >= 0 for c in phases[label])
    reference = "reference pass (coordinate median, distances to it, Gram matrix)"
    steps = [float(c.split()[0].strip("*")) for c in phases["**step**"]]
    assert all(float(c.split()[0]) >= 0 for c in phases[reference])
    assert all(step >= float(c.split()[0]) for step, c in zip(steps, phases[reference]))


def test_bad_options_are_named(capsys):
    with pytest.raises(SystemExit):
        bench_scale.main(["--sites", "1"])
    assert "--sites must be >= 2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench_overhead.main(["--setups", "fedmed", "fedavg"])
    assert "--setups must start with fedavg" in capsys.readouterr().err


@pytest.mark.integration
def test_long_simulated_job_samples_the_server_memory_every_round(tmp_path):
    out = tmp_path / "bench_scale.md"
    args = ["--quick", "--db", "sqlite", "postgres", "--work", str(tmp_path / "work"), "--out", str(out)]
    assert bench_scale.main(args) == 0
    text = out.read_text()
    assert "record postgres s" in text
    per_round = re.search(r"- per round \(MB\): (.*)", text).group(1).split(", ")
    assert len(per_round) == 3 and all(float(v) > 50 for v in per_round)  # a server process holds at least that
    assert re.search(r"\*\*slope [+-]\d+\.\d+ MB per round\*\*", text)
    if _malloc_trim() is not None:  # glibc: the Controller's end-of-round release keeps the server from growing
        assert "after the Controller's end-of-round heap trim" in text
        # Measured on 2 cores: rounds 1 -> 3 grew 142-216 MB without the release, 44-47 MB with it.
        assert float(per_round[2]) - float(per_round[0]) < 100, per_round


@pytest.mark.integration
def test_overhead_against_stock_fedavg_and_with_signatures(tmp_path):
    out = tmp_path / "bench_overhead.md"
    args = ["--quick", "--setups", "fedavg", "signatures", "--work", str(tmp_path / "work"), "--out", str(out)]
    assert bench_overhead.main(args) == 0
    text = out.read_text()
    rows = {r[0]: r for r in _rows(text, "| NVFlare FedAvg") + _rows(text, "| fedmed + signatures")}
    assert set(rows) == {"NVFlare FedAvg", "fedmed + signatures"}
    for r in rows.values():
        wall, waiting, work, cpu = float(r[1]), float(r[2]), float(r[3]), float(r[5])
        assert wall > 0 and 0 <= waiting <= wall and work == pytest.approx(wall - waiting, abs=0.011) and cpu > 0
    assert rows["NVFlare FedAvg"][6] == "1.00x"
    step, save, record = (float(x) for x in rows["fedmed + signatures"][4].split(" / "))
    assert step > 0 and save > 0 and record > 0  # measured inside the Controller's round
    assert all(re.fullmatch(r"\*\*[+-]\d+\.\d%\*\*", rows["fedmed + signatures"][i]) for i in (8, 9))
