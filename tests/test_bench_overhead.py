"""fedmed.cli.bench_overhead's document: a re-run rewrites the generated part and keeps the hand-written one."""

from pathlib import Path

from fedmed.cli.bench_overhead import KEEP_MARKER, write_document


def test_rewrite_keeps_everything_from_the_marker_on(tmp_path):
    out = tmp_path / "bench_overhead.md"
    out.write_text(f"# bench_overhead\n\n| fedmed | stale |\n\n{KEEP_MARKER}\n\n## Profile\n\nhand-written analysis\n")
    write_document(out, ["# bench_overhead", "", "| fedmed | fresh |"])
    text = out.read_text()
    assert "stale" not in text and "| fedmed | fresh |" in text and text.count(KEEP_MARKER) == 1
    assert text.index("fresh") < text.index(KEEP_MARKER) < text.index("hand-written analysis")
    assert text.endswith("## Profile\n\nhand-written analysis\n")
    write_document(out, ["# bench_overhead", "", "| fedmed | again |"])  # a second re-run keeps it as well
    assert out.read_text().endswith("## Profile\n\nhand-written analysis\n") and "fresh" not in out.read_text()


def test_a_new_document_gets_the_marker(tmp_path):
    out = tmp_path / "docs" / "bench_overhead.md"
    write_document(out, ["# bench_overhead"])
    assert out.read_text() == f"# bench_overhead\n\n{KEEP_MARKER}\n"
    assert not list(out.parent.glob("*.tmp"))


def test_the_committed_document_has_the_marker():
    doc = Path(__file__).resolve().parents[1] / "docs" / "bench_overhead.md"
    assert doc.read_text().count(KEEP_MARKER) == 1
