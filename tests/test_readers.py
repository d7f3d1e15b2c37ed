"""The read-only commands (fedmed-rounds, fedmed-report, fedmed-audit-verify): a wrong database URL is one line and
exit 2, a misspelt SQLite path creates nothing, and a run is named the one way every command takes it."""

import pytest

from fedmed.cli import audit_verify, report, rounds_table
from fedmed.server.resume import ResumeRefused, match_prefix, resolve_run_uid
from fedmed.store.repository import Repository, RoundRecord, UpdateRecord

UIDS = ("0123abcd", "0199ffff", "7fed0000")


@pytest.fixture
def recorded(tmp_path):
    """A real SQLite record with three runs (run numbers 1, 2, 3), each with one round."""
    db = tmp_path / "fedmed.db"
    repo = Repository(f"sqlite:///{db}")
    for i, uid in enumerate(UIDS):
        repo.start_run(uid, f"run{i}", f"job-{i}", "fedavg", 1, {})
        repo.record_round(uid, RoundRecord(1, (UpdateRecord("hospital-a", "accepted", 10),), score=0.5 + i / 10))
    repo.close()
    return db


def _main(cmd, args):
    return {"rounds": rounds_table.main, "report": report.main, "audit": audit_verify.main}[cmd](args)


@pytest.mark.parametrize("cmd", ["rounds", "report", "audit"])
def test_a_misspelt_sqlite_database_is_one_line_and_creates_nothing(cmd, recorded, tmp_path, capsys):
    wrong = tmp_path / "fedmd.db"
    before = sorted(p.name for p in tmp_path.iterdir())
    extra = ["--out", str(tmp_path / "out")] if cmd == "report" else []
    assert _main(cmd, ["--db-url", f"sqlite:///{wrong}", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"no database at {wrong}" in err and "fedmed.db" in err  # the near miss
    assert not wrong.exists() and sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize("cmd", ["rounds", "report", "audit"])
def test_a_path_given_as_database_url_suggests_the_sqlite_url(cmd, recorded, tmp_path, capsys):
    extra = ["--out", str(tmp_path / "out")] if cmd == "report" else []
    assert _main(cmd, ["--db-url", str(recorded), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"give sqlite:///{recorded}" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "given, expected_uid",
    [
        ("2", "0199ffff"),  # the run number fedmed-rounds prints
        ("7f", "7fed0000"),  # a unique prefix of a uid
        ("0123abcd", "0123abcd"),  # the whole uid
        (" 3 ", "7fed0000"),  # pasted with blanks
    ],
)
def test_fedmed_rounds_takes_a_run_number_uid_or_prefix(given, expected_uid, recorded, capsys):
    assert rounds_table.main(["--db-url", f"sqlite:///{recorded}", "--run-id", given]) == 0
    assert f"uid {expected_uid}" in capsys.readouterr().out.splitlines()[0]


@pytest.mark.parametrize(
    "given, reason",
    [
        ("01", "'01' is the start of 2 runs"),  # ambiguous prefix (a leading zero is no run number)
        ("9", "no run '9' in the database"),  # no run number 9 and no uid starting with 9
    ],
)
def test_an_ambiguous_or_unknown_run_is_one_line_exit_2(given, reason, recorded, capsys):
    assert rounds_table.main(["--db-url", f"sqlite:///{recorded}", "--run-id", given]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and reason in err


def test_a_number_names_the_run_before_a_uid_that_starts_with_it():
    # run 7 exists: "7" is that run, even though a uid starts with 7; without run 7 it is the prefix
    assert resolve_run_uid("7", UIDS, numbered="0123abcd") == "0123abcd"
    assert resolve_run_uid("7", UIDS) == "7fed0000"
    with pytest.raises(ResumeRefused, match="resume: no run given"):
        resolve_run_uid("  ", UIDS)


@pytest.mark.parametrize(
    "given, names, expected",
    [
        ("4f2", ["4f2a-1", "9b00-2"], "4f2a-1"),  # unique prefix of a job id
        ("4f2a-1", ["4f2a-1", "4f2a-10"], "4f2a-1"),  # the whole id, though it prefixes another
    ],
)
def test_match_prefix_is_the_one_rule_for_ids(given, names, expected):
    assert match_prefix(given, names, "job") == expected


def test_match_prefix_refuses_ambiguity_and_unknowns():
    with pytest.raises(ValueError, match=r"'4f' is the start of 2 jobs \(4f2a-1, 4f90-2\): give more"):
        match_prefix("4f", ["4f2a-1", "4f90-2"], "job")
    with pytest.raises(ValueError, match="no job 'zz' on the server"):
        match_prefix("zz", ["4f2a-1"], "job", " on the server")
