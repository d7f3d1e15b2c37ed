"""An insider with write access to the database (but not the audit key) tries to rewrite the record."""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import text

from fedmed.store import audit
from fedmed.store.audit import AuditKeyError, RecordTampered
from fedmed.store.repository import AlertRecord, Repository, RoundRecord, UpdateRecord

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "audit_verify.py"


def _round(n):
    return RoundRecord(
        n,
        (
            UpdateRecord(
                "hospital-a",
                "accepted",
                100,
                update_norm=1.5,
                trust=0.9,
                epsilon=1.0 + n,
                delta=1e-5,
                metrics={"val_auroc/Mass": 0.7},
            ),
            UpdateRecord("hospital-b", "rejected", 80, reason="norm too large", trust=0.4),
        ),
        test_loss=0.3,
        score=0.6 + n / 100,
        score_name="mean_auroc",
        score_source="global_test",
        mean_auroc=0.6 + n / 100,
        test_metrics={"auroc/Mass": 0.6},
        alerts=(AlertRecord("hospital-b", "rejected", "norm too large"),),
    )


@pytest.fixture
def recorded(db_url):
    repo = Repository(db_url)
    repo.start_run("run-1", "demo", "job", "geometric_median", 3, {"lr": 1e-3})
    for n in (1, 2, 3):
        repo.record_round("run-1", _round(n))
    repo.record_alert("run-1", "dead_letter", "a journal line could not be written")
    repo.finish_run("run-1", "finished", 3, 0.63)
    assert repo.verify_audit() is None
    yield repo
    repo.close()


def _verify(db_url):
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--db-url", db_url], capture_output=True, text=True, timeout=120
    )


def _exec(repo, sql, **params):
    with repo.engine.begin() as conn:
        return conn.execute(text(sql), params)


def test_an_intact_record_verifies(recorded, db_url, audit_key_file):
    ok = _verify(db_url)
    assert ok.returncode == 0, ok.stderr
    assert "intact: 6 rows" in ok.stdout and "6 head(s)" in ok.stdout
    assert stat.S_IMODE(audit_key_file.stat().st_mode) == 0o600


def test_an_edited_client_update_is_named(recorded, db_url):
    """The insider turns hospital-b's rejected round-2 update into an accepted one with more samples."""
    row_id = _exec(
        recorded,
        "SELECT cu.id FROM client_updates cu JOIN sites s ON s.id = cu.site_id "
        "WHERE cu.round_num = 2 AND s.name = 'hospital-b'",
    ).scalar()
    _exec(recorded, "UPDATE client_updates SET status = 'accepted', num_samples = 5000 WHERE id = :i", i=row_id)
    problem = recorded.verify_audit()
    assert (problem.table, problem.row_id) == ("client_updates", row_id)
    assert "run-1, 2, hospital-b" in problem.reason and "edited" in problem.reason
    bad = _verify(db_url)
    assert bad.returncode == 1 and f"client_updates row {row_id}" in bad.stderr


@pytest.mark.parametrize(
    "table, sql",
    [
        ("rounds", "UPDATE rounds SET score = 0.99 WHERE round_num = 3"),
        ("privacy_spend", "UPDATE privacy_spend SET epsilon = 0.1 WHERE round_num = 1"),
        ("alerts", "UPDATE alerts SET message = 'nothing happened' WHERE round_num = 2"),
        ("round_metrics", "UPDATE round_metrics SET value = 0.95 WHERE round_num = 1 AND scope = 'global_test'"),
        ("runs", "UPDATE runs SET best_round = 1"),
    ],
)
def test_an_edit_to_any_covered_table_is_named(recorded, table, sql):
    _exec(recorded, sql)
    problem = recorded.verify_audit()
    assert problem.table == table and "edited" in problem.reason


def test_deleted_rows_are_named(recorded):
    _exec(recorded, "DELETE FROM privacy_spend WHERE round_num = 2")
    problem = recorded.verify_audit()
    assert "privacy_spend row (run-1, 2, hospital-a)" in problem.reason and "deleted" in problem.reason


def test_an_inserted_row_is_named(recorded):
    _exec(
        recorded,
        "INSERT INTO round_metrics (run_id, round_num, scope, metric, value) "
        "SELECT id, 2, 'hospital-a', 'val_auroc/Edema', 0.99 FROM runs",
    )
    problem = recorded.verify_audit()
    assert problem.table == "round_metrics" and "covered by no audit entry" in problem.reason


def test_deleting_the_newest_rows_and_their_entries_is_detected(recorded, db_url):
    """The insider removes round 3 and everything after it, rows and audit entries alike: the chain that is left is
    consistent, but the heads file outside the database still records the removed entries."""
    last_round = _exec(recorded, "SELECT id FROM audit_log WHERE action = 'record_round' ORDER BY id DESC").scalar()
    for table in ("client_updates", "privacy_spend", "round_metrics", "alerts", "rounds"):
        _exec(recorded, f"DELETE FROM {table} WHERE round_num >= 3")
    _exec(recorded, "UPDATE runs SET status = 'running', finished_at = NULL, best_round = NULL, best_metric = NULL")
    _exec(recorded, "DELETE FROM alerts WHERE kind = 'dead_letter'")
    _exec(recorded, "DELETE FROM audit_log WHERE id >= :i", i=last_round)
    problem = recorded.verify_audit()
    assert problem.row_id == last_round and "newest entries were deleted" in problem.reason
    bad = _verify(db_url)
    assert bad.returncode == 1 and "newest entries were deleted" in bad.stderr


def test_a_chain_recomputed_without_the_key_is_refused(recorded):
    """Plain SHA-256 (the old unkeyed chain) or an HMAC under a guessed key: the MAC check names the first entry."""
    first_round = _exec(recorded, "SELECT id FROM audit_log WHERE action = 'record_round' ORDER BY id").scalar()
    rows = _exec(
        recorded,
        "SELECT id, created_at, action, payload_json, prev_hash FROM audit_log WHERE id >= :i ORDER BY id",
        i=first_round,
    ).all()
    _exec(recorded, "UPDATE client_updates SET num_samples = 5000")
    prev = rows[0].prev_hash
    for r in rows:  # recompute every MAC from the edited payloads with a key the insider made up
        payload = r.payload_json.replace('"num_samples":80', '"num_samples":5000')
        mac = audit.entry_mac(b"k" * 32, prev, r.created_at, r.action, payload)
        _exec(
            recorded,
            "UPDATE audit_log SET payload_json = :p, prev_hash = :v, row_hash = :m WHERE id = :i",
            p=payload,
            v=prev,
            m=mac,
            i=r.id,
        )
        prev = mac
    problem = recorded.verify_audit()
    assert problem.row_id == first_round and "MAC does not verify" in problem.reason


def test_downgrading_an_entry_to_the_unkeyed_scheme_is_refused(recorded):
    last = _exec(
        recorded, "SELECT id, created_at, action, payload_json, prev_hash FROM audit_log ORDER BY id DESC"
    ).first()
    _exec(
        recorded,
        "UPDATE audit_log SET scheme = NULL, row_hash = :h WHERE id = :i",
        h=audit.legacy_hash(last.prev_hash, last.created_at, last.action, last.payload_json),
        i=last.id,
    )
    problem = recorded.verify_audit()
    assert problem.row_id == last.id and "unkeyed entry after keyed ones" in problem.reason


def test_a_replayed_round_replaces_what_the_chain_expects(recorded):
    recorded.record_round("run-1", _round(1))  # the journal replays a round: stored once, still verifies
    assert recorded.verify_audit() is None


def test_verifying_needs_the_key_and_never_makes_one(recorded, db_url, audit_key_file, tmp_path):
    wrong = tmp_path / "other" / "local" / "audit_key"
    audit.create_key_file(wrong)
    problem = Repository(db_url, create_schema=False, audit_key_file=wrong, heads_file=tmp_path / "h").verify_audit()
    assert problem.row_id == 1 and "is not this database's" in problem.reason
    missing = tmp_path / "nowhere" / "audit_key"
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--db-url", db_url, "--key-file", str(missing)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and f"audit key file {missing} does not exist" in out.stderr
    assert not missing.exists()
    os.chmod(audit_key_file, 0o644)
    with pytest.raises(ValueError, match="readable by others"):
        Repository(db_url)


def test_the_sqlite_default_keeps_key_and_heads_beside_the_database(tmp_path, monkeypatch):
    monkeypatch.delenv(audit.ENV_AUDIT_KEY_FILE, raising=False)
    ws = tmp_path / "server"
    ws.mkdir()
    repo = Repository(f"sqlite:///{ws / 'fedmed.db'}")
    repo.start_run("u", "n", "j", "fedavg", 1, {})
    assert stat.S_IMODE((ws / "local" / "audit_key").stat().st_mode) == 0o600
    assert len((ws / "audit_heads.log").read_text().splitlines()) == 1
    assert repo.verify_audit() is None


def test_the_key_can_come_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(audit.ENV_AUDIT_KEY, "ab" * 32)
    monkeypatch.setenv(audit.ENV_AUDIT_HEADS, str(tmp_path / "heads.log"))
    repo = Repository(f"sqlite:///{tmp_path / 'x.db'}")
    repo.start_run("u", "n", "j", "fedavg", 1, {})
    assert repo.verify_audit() is None and (tmp_path / "heads.log").exists()
    monkeypatch.setenv(audit.ENV_AUDIT_KEY, "abcd")
    with pytest.raises(ValueError, match="at least 32 are needed"):
        Repository(f"sqlite:///{tmp_path / 'y.db'}")


def test_a_database_from_before_the_keyed_chain_upgrades_and_is_adopted_only_by_the_admin(tmp_path):
    """An old database (revision 0005, unkeyed SHA-256 chain) keeps its history and still verifies; the server
    refuses to write on top of it until the admin adopts its rows (an audited entry naming the reason); from then on
    they are covered like new ones."""
    from sqlalchemy import create_engine

    from fedmed.store.migrate import upgrade

    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = create_engine(url)
    upgrade(engine, "0005")
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO runs (uid, name, job_id, aggregation, num_rounds, config_json, status, "
                "started_at) VALUES ('old', 'n', 'j', 'fedavg', 1, '{}', 'finished', '2026-01-01 00:00:00')"
            )
        )
        created, payload = "2026-01-01T00:00:00+00:00", '{"run":"old"}'
        h = audit.legacy_hash(audit.GENESIS_HASH, created, "start_run", payload)
        conn.execute(
            text(
                "INSERT INTO audit_log (created_at, action, payload_json, prev_hash, row_hash) "
                "VALUES (:c, 'start_run', :p, :g, :h)"
            ),
            {"c": created, "p": payload, "g": audit.GENESIS_HASH, "h": h},
        )
    engine.dispose()
    repo = Repository(url)
    assert repo.verify_audit() is None
    with pytest.raises(RecordTampered, match="audit chain is unkeyed.*fedmed-audit-verify --adopt"):
        repo.start_run("new", "n", "j", "fedavg", 1, {})
    assert repo.audit_rows() == 1 and repo.run_uids_starting_with("new") == []
    entry, rows, accepted = repo.adopt("rows of 2026-01 checked against the paper log by the privacy officer")
    assert (entry, rows, accepted) == (2, 1, [])
    repo.start_run("new", "n", "j", "fedavg", 1, {})
    report = repo.audit_report()
    assert report.first is None and report.legacy_entries == 1 and report.entries == 3  # old, adopt_rows, new
    _exec(repo, "UPDATE runs SET status = 'failed' WHERE uid = 'old'")
    problem = repo.verify_audit()
    assert problem.table == "runs" and "(old)" in problem.reason


def test_stored_update_signatures_are_re_verified_offline(db_url, tmp_path):
    """The server stores each update's signature and digest; audit_verify re-checks them with the hospitals' public
    keys. hospital-b's stored signature is not its own (say a server operator forged it): that row is named."""
    from fedmed.security import signing

    kit = tmp_path / "server-kit" / "local"
    keys = {}
    for site in ("hospital-a", "hospital-b", "intruder"):
        signing.generate_site_keys(tmp_path / site, site)
        keys[site] = signing.load_site_keys(tmp_path / site)
    for site in ("hospital-a", "hospital-b"):
        signing.install_public_keys(tmp_path / site / signing.PUBLIC_FILE, signing.site_key_path(kit, site), site)

    def signed(site, signer):
        digest = signing.update_digest("job", 0, site, {}, None, 10, {}, {})
        return {"signature": signing.sign(digest, keys[signer]).hex(), "signed_digest": digest.hex()}

    repo = Repository(db_url)
    repo.start_run("run-s", "s", "job", "fedavg", 1, {})
    repo.record_round(
        "run-s",
        RoundRecord(
            1,
            (
                UpdateRecord("hospital-a", "accepted", 10, **signed("hospital-a", "hospital-a")),
                UpdateRecord("hospital-b", "accepted", 10, **signed("hospital-b", "intruder")),
                UpdateRecord("hospital-c", "missing"),
            ),
        ),
    )
    report = repo.audit_report(signing.load_site_public_keys(kit))
    assert report.signatures_checked == 2
    # hospital-c sent nothing: its row is a missing site, not an update without a signature
    assert "1 row(s) record a site that sent no update (status missing): nothing to verify" in report.notes
    assert not any("carry no signature" in note for note in report.notes)
    (problem,) = report.problems
    assert problem.table == "client_updates" and "(run-s, 1, hospital-b) signature check failed" in problem.reason
    assert "not hospital-b's installed key" in problem.reason
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--db-url", db_url, "--site-keys", str(kit / "site_keys")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 1 and f"client_updates row {problem.row_id}" in out.stderr
    repo.close()


def test_a_heads_file_that_cannot_be_written_loses_no_record(tmp_path, caplog):
    import logging

    heads = tmp_path / "heads-is-a-folder"
    heads.mkdir()
    repo = Repository(f"sqlite:///{tmp_path / 'x.db'}", heads_file=heads)
    with caplog.at_level(logging.ERROR):
        repo.start_run("u", "n", "j", "fedavg", 1, {})
    assert repo.latest_run_id() is not None and "could not be appended" in caplog.text


# --- site_trust: read at every job's start, so an edit there would lift a quarantine --------------------------------


@pytest.fixture
def trusted(db_url):
    """Two rounds in which hospital-b is quarantined, then stays quarantined."""
    from fedmed.store.repository import TrustRecord

    repo = Repository(db_url)
    repo.start_run("run-t", "demo", "job", "geometric_median", 2, {})
    for n, streak in ((1, 0), (2, 1)):
        trust = (TrustRecord("hospital-a", 0.9, False, 3), TrustRecord("hospital-b", 0.1 * n, True, streak))
        repo.record_round("run-t", RoundRecord(n, (), trust=trust))
    assert repo.verify_audit() is None and repo.load_trust()["hospital-b"].quarantined
    yield repo
    repo.close()


def _site_trust_sql(action: str, site: str = "hospital-b") -> str:
    where = f"site_id = (SELECT id FROM sites WHERE name = '{site}')"
    return {
        "lift": f"UPDATE site_trust SET quarantined = false, trust = 1.0 WHERE {where}",
        "delete": f"DELETE FROM site_trust WHERE {where}",
    }[action]


def test_a_lifted_quarantine_is_named_and_the_next_job_still_sees_the_audited_state(trusted):
    _exec(trusted, _site_trust_sql("lift"))
    problem = trusted.verify_audit()
    assert problem.table == "site_trust" and "(hospital-b)" in problem.reason and "edited" in problem.reason
    problems = []
    loaded = trusted.load_trust(problems)
    assert loaded["hospital-b"].quarantined and loaded["hospital-b"].trust == pytest.approx(0.2)
    assert loaded["hospital-a"].trust == 0.9 and not loaded["hospital-a"].quarantined
    assert len(problems) == 1 and "hospital-b" in problems[0] and "using the audited state" in problems[0]


def test_a_deleted_trust_row_cannot_reset_a_site_to_initial_trust(trusted):
    _exec(trusted, _site_trust_sql("delete"))
    assert "missing (deleted)" in trusted.verify_audit().reason
    problems = []
    assert trusted.load_trust(problems)["hospital-b"].quarantined
    assert "hospital-b" in problems[0] and "deleted" in problems[0]


def test_a_trust_row_inserted_outside_the_record_is_ignored(trusted):
    _exec(trusted, "INSERT INTO sites (name, first_seen) SELECT 'hospital-z', started_at FROM runs")
    _exec(
        trusted,
        "INSERT INTO site_trust (site_id, trust, quarantined, good_streak, run_id, round_num, updated_at) "
        "SELECT s.id, 0.0, true, 0, r.id, 2, r.started_at FROM sites s, runs r WHERE s.name = 'hospital-z'",
    )
    assert "covered by no audit entry" in trusted.verify_audit().reason
    problems = []
    assert "hospital-z" not in trusted.load_trust(problems) and "ignored" in problems[0]


def test_trust_read_after_the_newest_entries_were_deleted_says_so(trusted):
    last = _exec(trusted, "SELECT max(id) FROM audit_log").scalar()
    _exec(trusted, "DELETE FROM audit_log WHERE id = :i", i=last)
    problems = []
    trusted.load_trust(problems)
    assert any("newest entries were deleted" in p for p in problems)


# --- no downgrade, no silent adoption (issue 29) ---------------------------------------------------------------------


def _cli(capsys, *argv):
    """fedmed-audit-verify in this process (the subprocess tests above cover the script's entry point)."""
    from types import SimpleNamespace

    from fedmed.cli.audit_verify import main

    capsys.readouterr()
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:  # argparse's usage errors
        rc = e.code
    out = capsys.readouterr()
    return SimpleNamespace(returncode=rc, stdout=out.out, stderr=out.err)


def _forge_score(repo) -> int:
    """The insider's edit: round 3's score. Returns the rounds row's id."""
    row_id = _exec(repo, "SELECT id FROM rounds WHERE round_num = 3").scalar()
    _exec(repo, "UPDATE rounds SET score = 0.99 WHERE id = :i", i=row_id)
    return row_id


def _downgrade_every_entry(repo) -> None:
    """Rewrite the whole chain as unkeyed legacy SHA-256 entries: no key needed."""
    rows = _exec(repo, "SELECT id, created_at, action, payload_json FROM audit_log ORDER BY id").all()
    prev = audit.GENESIS_HASH
    for r in rows:
        h = audit.legacy_hash(prev, r.created_at, r.action, r.payload_json)
        _exec(
            repo, "UPDATE audit_log SET scheme = NULL, prev_hash = :p, row_hash = :h WHERE id = :i", p=prev, h=h, i=r.id
        )
        prev = h


def test_a_chain_downgraded_to_unkeyed_entries_fails_and_vouches_for_no_trust(recorded, db_url, capsys):
    _forge_score(recorded)
    _downgrade_every_entry(recorded)
    problem = recorded.verify_audit()
    assert problem.table == "heads_file" and "holds no keyed entry" in problem.reason and "downgrade" in problem.reason
    bad = _cli(capsys, "--db-url", db_url)
    assert bad.returncode == 1 and "a downgrade to unkeyed entries" in bad.stderr
    with pytest.raises(RecordTampered, match="site trust cannot be vouched for.*downgrade"):
        recorded.load_trust()


def test_a_keyed_chain_missing_from_its_heads_file_fails(recorded, tmp_path):
    """Recomputed or re-keyed: the chain in the database is not the one whose heads the file recorded."""
    heads = recorded.audit_settings().heads_file
    lines = heads.read_text().splitlines()
    heads.write_text("\n".join(line.replace('"chain":"', '"chain":"0') for line in lines) + "\n")
    problem = recorded.verify_audit()
    assert problem.table == "heads_file" and "has no head in it" in problem.reason


def test_an_emptied_chain_with_its_heads_file_deleted_fails(recorded, db_url, capsys):
    _exec(recorded, "DELETE FROM audit_log")
    recorded.audit_settings().heads_file.unlink()
    problem = recorded.verify_audit()
    assert "the audit chain is empty but the record holds 1 runs row(s), 3 rounds row(s)" in problem.reason
    bad = _cli(capsys, "--db-url", db_url)
    assert bad.returncode == 1 and "the chain was emptied" in bad.stderr
    with pytest.raises(RecordTampered, match="the chain was emptied"):
        Repository(db_url).record_alert("run-1", "dead_letter", "a line")


@pytest.mark.parametrize("downgraded", [False, True], ids=["edited", "edited-and-downgraded"])
def test_the_next_ordinary_write_refuses_a_forged_record_instead_of_adopting_it(recorded, db_url, downgraded):
    """Before: the server's next write (an alert) adopted the forged rows under the real key and verify passed. Now
    the next job's first write is refused, nothing is written, and the reason names the forged row (or the
    downgrade that hides it)."""
    row_id = _forge_score(recorded)
    if downgraded:
        _downgrade_every_entry(recorded)
    entries = recorded.audit_rows()
    with pytest.raises(RecordTampered, match="refusing to write alert") as refused:
        Repository(db_url).record_alert("run-1", "dead_letter", "a journal line could not be written")
    forged = f"rounds row {row_id}: (run-1, 3) does not match what audit entry"
    assert ("holds no keyed entry" if downgraded else forged) in str(refused.value)
    assert recorded.audit_rows() == entries


def test_a_server_that_vouched_for_the_chain_checks_only_new_entries_and_still_adopts_nothing(recorded):
    """Within one job the writer re-checks only the entries appended since its last write (a full check per round
    would grow with the record): a row edited meanwhile is not re-vouched by its next write, the verifier still
    names it, and the next job's first write refuses (test above). A rewritten chain is caught at once."""
    row_id = _forge_score(recorded)
    recorded.record_alert("run-1", "dead_letter", "written, covering only its own row")
    problem = recorded.verify_audit()
    assert (problem.table, problem.row_id) == ("rounds", row_id) and "edited" in problem.reason
    _downgrade_every_entry(recorded)
    with pytest.raises(RecordTampered, match="holds no keyed entry"):
        recorded.record_alert("run-1", "dead_letter", "refused")


def test_adoption_is_explicit_audited_and_names_what_it_accepted(recorded, db_url, capsys):
    row_id = _forge_score(recorded)
    no_reason = _cli(capsys, "--db-url", db_url, "--adopt")
    assert no_reason.returncode == 2 and "--adopt needs --reason" in no_reason.stderr
    out = _cli(capsys, "--db-url", db_url, "--adopt", "--reason", "score corrected by hand, ticket 7")
    assert out.returncode == 0, out.stderr
    assert f"accepted: rounds row {row_id}" in out.stdout
    entry = _exec(recorded, "SELECT payload_json, scheme FROM audit_log ORDER BY id DESC").first()
    assert entry.scheme == audit.SCHEME and "score corrected by hand, ticket 7" in entry.payload_json
    assert f"rounds row {row_id}" in entry.payload_json
    assert _cli(capsys, "--db-url", db_url).returncode == 0
    recorded.record_alert("run-1", "dead_letter", "writes go on after the adoption")
    assert recorded.verify_audit() is None
    nothing = _cli(capsys, "--db-url", db_url, "--adopt", "--reason", "again")
    assert nothing.returncode == 2 and "nothing to adopt" in nothing.stderr


def test_adoption_cannot_repair_a_broken_chain(recorded, db_url, capsys):
    """An unkeyed entry after keyed ones is a change to the chain itself: no adoption, restore from a backup."""
    last = _exec(
        recorded, "SELECT id, created_at, action, payload_json, prev_hash FROM audit_log ORDER BY id DESC"
    ).first()
    _exec(
        recorded,
        "UPDATE audit_log SET scheme = NULL, row_hash = :h WHERE id = :i",
        h=audit.legacy_hash(last.prev_hash, last.created_at, last.action, last.payload_json),
        i=last.id,
    )
    out = _cli(capsys, "--db-url", db_url, "--adopt", "--reason", "hide it")
    assert out.returncode == 1 and "unkeyed entry after keyed ones" in out.stderr and "backup" in out.stderr
    with pytest.raises(RecordTampered, match="restore the database and the heads file from a backup"):
        recorded.record_alert("run-1", "dead_letter", "x")


def test_an_adopted_trust_edit_is_what_the_next_job_reads(trusted, db_url):
    _exec(trusted, _site_trust_sql("lift"))
    with pytest.raises(RecordTampered, match="site_trust"):
        Repository(db_url).record_alert("run-t", "record_edited", "x")
    trusted.adopt("hospital-b readmitted by the federation's board, minutes of 2026-12-01")
    problems = []
    assert not trusted.load_trust(problems)["hospital-b"].quarantined and problems == []
    assert trusted.verify_audit() is None


# --- configuration errors fail fast (issue 29 item 7) ----------------------------------------------------------------


def test_a_database_url_without_an_audit_key_is_refused_before_connecting(tmp_path):
    """No server listens on port 1: the refusal comes before any connection, with the fix in one line."""
    from fedmed.store.journal import Journal, ResilientRecorder

    url = "postgresql://fedmed@127.0.0.1:1/fedmed"
    with pytest.raises(AuditKeyError, match=r"no audit key for postgresql://.*install.sh <server kit> server --db-url"):
        Repository(url)
    journal = Journal(tmp_path / "journal.jsonl")
    recorder = ResilientRecorder(lambda: Repository(url), journal)
    with pytest.raises(AuditKeyError, match="FEDMED_AUDIT_KEY_FILE=<server kit>/local/audit_key"):
        recorder.write("start_run", uid="u", name="n", job_id="j", aggregation="fedavg", num_rounds=1, config={})
    assert journal.pending() == [] and not recorder.degraded  # not an outage, not journaled


# --- receipts at the hospitals: an anchor the key holder does not hold (issue 29 item 2) ------------------------------


def _rewrite_with_the_key(repo, key: bytes, heads) -> None:
    """What the server operator can do: edit round 3's score, put the edited row's hash in the entry that recorded
    it, recompute every MAC from there on with the real key, and rewrite the heads file to match."""
    import json

    from sqlalchemy.orm import Session

    _forge_score(repo)
    with Session(repo.engine) as s:
        (edited,) = audit.table_rows(s, "rounds", round_num=3)
    rows = _exec(repo, "SELECT id, created_at, action, payload_json, prev_hash FROM audit_log ORDER BY id").all()
    first = next(r.id for r in rows if r.action == "record_round" and '"round":3' in r.payload_json)
    prev, macs = None, {}
    for r in rows:
        if r.id < first:
            continue
        payload = json.loads(r.payload_json)
        payload["rows"] = [
            [t, k, edited.hash if (t, k) == ("rounds", list(edited.key)) else h] for t, k, h in payload["rows"]
        ]
        body = audit.canonical_json(payload)
        prev = prev or r.prev_hash
        mac = audit.entry_mac(key, prev, r.created_at, r.action, body)
        _exec(
            repo,
            "UPDATE audit_log SET payload_json = :p, prev_hash = :v, row_hash = :m WHERE id = :i",
            p=body,
            v=prev,
            m=mac,
            i=r.id,
        )
        prev, macs[r.id] = mac, mac
    lines = []
    for line in heads.read_text().splitlines():
        h = json.loads(line)
        h["mac"] = macs.get(h["id"], h["mac"])
        lines.append(audit.canonical_json(h))
    heads.write_text("\n".join(lines) + "\n")


def test_a_record_rewritten_with_its_key_is_caught_by_a_hospitals_receipts(
    recorded, db_url, audit_key_file, tmp_path, capsys
):
    from fedmed.security import signing
    from fedmed.store import receipts

    signing.generate_site_keys(tmp_path / "server-keys", "server")
    server = signing.load_site_keys(tmp_path / "server-keys")
    server_pub = tmp_path / "server-keys" / signing.PUBLIC_FILE
    log = tmp_path / "hospital-a" / "local" / receipts.RECEIPTS_FILE
    tag = _exec(recorded, "SELECT row_hash FROM audit_log ORDER BY id").scalar()
    rounds = _exec(recorded, "SELECT id, row_hash FROM audit_log WHERE action = 'record_round' ORDER BY id").all()
    for n, r in enumerate(rounds, 1):  # what the server sends after each round, and the hospital keeps
        head = receipts.ChainHead(tag, r.id, r.row_hash)
        receipts.append_receipt(log, receipts.make_receipt("run-1", n, head, server), server.public)
    intact = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--db-url",
            db_url,
            "--receipts",
            str(log.parent),
            "--server-key",
            str(server_pub),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert intact.returncode == 0 and "3 hospital receipt(s) match" in intact.stdout, intact.stderr

    _rewrite_with_the_key(recorded, audit.read_key_file(audit_key_file), recorded.audit_settings().heads_file)
    assert _cli(capsys, "--db-url", db_url).returncode == 0  # the chain alone cannot tell: its writer held the key
    caught = _cli(capsys, "--db-url", db_url, "--receipts", str(log.parent))
    assert caught.returncode == 1
    assert "audit_receipts.jsonl line 3: the receipt (run run-1, round 3) records audit entry" in caught.stderr
    assert "rewritten after the hospital received it" in caught.stderr

    # a receipt the hospital made up itself (signed with another key) is named, not held against the server
    signing.generate_site_keys(tmp_path / "hospital-keys", "hospital-a")
    fake = receipts.make_receipt(
        "run-1", 9, receipts.ChainHead(tag, 1, "0" * 64), signing.load_site_keys(tmp_path / "hospital-keys")
    )
    with pytest.raises(signing.SignatureError):
        receipts.append_receipt(log, fake, server.public)
    (log.parent / "forged.jsonl").write_text(audit.canonical_json(fake.__dict__) + "\n")
    checked, problems = Repository(db_url, create_schema=False).check_receipts(
        log.parent / "forged.jsonl", server.public
    )
    assert checked == 0 and "is not the server's" in problems[0].reason


def test_a_receipt_a_hospital_signs_into_its_update_is_checked_against_the_record_by_the_server(
    recorded, audit_key_file, tmp_path
):
    """Issue 29 item 2: each hospital signs the last receipt it saw into its next update (fedmed.site.site_round.vouch);
    the server (fedmed.server.anchors) alerts receipt_mismatch when its record does not hold that chain head: the record
    was rewritten with its key after the hospital saw it, or the receipt is not one the server signed."""
    from dataclasses import asdict

    from fedmed.job import constants as C
    from fedmed.job.tasks import CHEST_XRAY14
    from fedmed.security import signing
    from fedmed.server.anchors import AnchorWatch
    from fedmed.site.site_round import Site, as_received, vouch
    from fedmed.store import receipts

    signing.generate_site_keys(tmp_path / "server-keys", "server")
    server = signing.load_site_keys(tmp_path / "server-keys")
    tag = _exec(recorded, "SELECT row_hash FROM audit_log ORDER BY id").scalar()
    last = _exec(recorded, "SELECT id, row_hash FROM audit_log WHERE action = 'record_round' ORDER BY id").all()[-1]
    receipt = asdict(receipts.make_receipt("run-1", 3, receipts.ChainHead(tag, last.id, last.row_hash), server))
    site = Site("hospital-a", CHEST_XRAY14, None, None, last_receipt=receipt)
    meta = {}
    vouch(site, None, meta)  # what the site puts into its signed update
    watch = AnchorWatch(receipt_check=lambda raw: recorded.receipt_problem(raw, server.public))
    anchors, alerts = watch.check(3, [as_received("hospital-a", {}, {}, meta)])
    assert alerts == () and [(a.receipt_entry, a.receipt_mac) for a in anchors] == [(last.id, last.row_hash)]

    _rewrite_with_the_key(recorded, audit.read_key_file(audit_key_file), recorded.audit_settings().heads_file)
    assert recorded.verify_audit() is None  # the chain alone cannot tell: its writer held the key
    _, alerts = watch.check(4, [as_received("hospital-a", {}, {}, meta)])
    assert [(a.site, a.kind) for a in alerts] == [("hospital-a", "receipt_mismatch")]
    assert f"records audit entry {last.id} with MAC {last.row_hash[:16]}..., the record holds" in alerts[0].message
    assert "the record was rewritten after the site received it" in alerts[0].message

    signing.generate_site_keys(tmp_path / "hospital-keys", "hospital-a")
    made_up = receipts.make_receipt(
        "run-1", 9, receipts.ChainHead(tag, 1, "0" * 64), signing.load_site_keys(tmp_path / "hospital-keys")
    )
    _, alerts = watch.check(5, [as_received("hospital-a", {}, {}, {C.META_RECEIPT_SEEN: asdict(made_up)})])
    assert [a.kind for a in alerts] == ["receipt_mismatch"]
    assert "is not one the server signed" in alerts[0].message and "made up or altered at the site" in alerts[0].message


def test_the_server_sends_each_rounds_head_and_the_hospital_keeps_only_what_the_server_signed(
    tmp_path, signing_keys, capsys
):
    """The wiring: after a recorded round the Controller signs the chain head (audit_receipt), the next global
    model carries it over the wire, the Executor keeps it (store_receipt) after checking the server's signature."""
    import logging

    from nvflare.app_common.abstract.fl_model import FLModel

    from conftest import over_the_wire
    from fedmed.flare import signatures as wire_sig
    from fedmed.job import constants as C
    from fedmed.store import receipts
    from fedmed.store.journal import Journal, ResilientRecorder

    url = f"sqlite:///{tmp_path / 'fedmed.db'}"
    server, hospital_local = signing_keys["server"], tmp_path / "hospital-a" / "local"
    db = ResilientRecorder(lambda: Repository(url), Journal(tmp_path / "journal.jsonl"), logging.getLogger("t"))
    db.write("start_run", uid="run-w", name="n", job_id="j", aggregation="fedavg", num_rounds=2, config={})
    assert wire_sig.audit_receipt(db, "run-w", 1, None) is None  # signatures off: nothing to send
    for n in (1, 2):
        assert db.write("record_round", run_uid="run-w", record=_round(n))
        receipt = wire_sig.audit_receipt(db, "run-w", n, server)
        model = over_the_wire(FLModel(params={}, meta={C.META_AUDIT_RECEIPT: receipt}))
        wire_sig.store_receipt(model, server.public, hospital_local)
    db.close()
    kept = receipts.read_receipts(hospital_local / receipts.RECEIPTS_FILE)
    assert [(r.run, r.round) for _, r in kept] == [("run-w", 1), ("run-w", 2)]
    forged = dict(receipt, mac="f" * 64)  # a receipt altered on the way (or made up) is refused, not kept
    with pytest.raises(ValueError, match="does not verify"):
        wire_sig.store_receipt(FLModel(params={}, meta={C.META_AUDIT_RECEIPT: forged}), server.public, hospital_local)
    assert len(receipts.read_receipts(hospital_local / receipts.RECEIPTS_FILE)) == 2
    ok = _cli(capsys, "--db-url", url, "--receipts", hospital_local)
    assert ok.returncode == 0 and "2 hospital receipt(s) match" in ok.stdout


def test_a_writer_whose_heads_snapshot_raced_another_jobs_first_head_checks_again_instead_of_refusing(
    recorded, db_url, monkeypatch
):
    """The CI flake: job A commits its entry, job B reads the heads file before A appends the head (or creates the
    file), then B's database snapshot holds A's keyed entry: 'heads file is missing' or 'entry gone' against a
    snapshot that is merely old. B dead-lettered its start_run for it. B now checks again on a fresh snapshot when
    the heads file moved during its check. The interleaving is forced here by hiding the file for B's first read."""
    heads = recorded.audit_settings().heads_file
    hidden = heads.with_name(heads.name + ".being-appended")
    heads.rename(hidden)
    real, reads = audit.HeadsSnapshot, []

    class AppendedRightAfterTheRead(real):
        def __init__(self, path):
            super().__init__(path)
            if not reads:  # the other job's head lands after this read, before the database is read
                hidden.rename(heads)
            reads.append(path)

    monkeypatch.setattr(audit, "HeadsSnapshot", AppendedRightAfterTheRead)
    Repository(db_url).record_alert("run-1", "dead_letter", "written, not refused")
    assert len(reads) == 2 and recorded.verify_audit() is None


def test_a_heads_file_deleted_for_good_still_refuses_the_next_write(recorded, db_url):
    """The recheck is for a file that moves during the check; one that stays gone is a problem every time."""
    recorded.audit_settings().heads_file.unlink()
    with pytest.raises(RecordTampered, match="heads file .* is missing"):
        Repository(db_url).record_alert("run-1", "dead_letter", "a line")


def _blake3_round(n):
    """A round as the server records it since revision 0013: each update's BLAKE3 in update_blake3, no SHA-256."""
    import blake3

    def digest(site):
        return blake3.blake3(f"{site}:{n}".encode()).hexdigest()

    return RoundRecord(
        n,
        (
            UpdateRecord("hospital-a", "accepted", 100, update_norm=1.2, update_blake3=digest("a"), trust=0.9),
            UpdateRecord("hospital-b", "rejected", 80, reason="replay", update_blake3=digest("b"), trust=0.5),
        ),
        score=0.6,
        score_name="mean_auroc",
        score_source="site_validation",
    )


@pytest.mark.parametrize(
    "which, sql",
    [
        ("old", "UPDATE client_updates SET update_sha256 = NULL WHERE id = :i"),  # blanked
        ("old", "UPDATE client_updates SET update_blake3 = update_sha256, update_sha256 = NULL WHERE id = :i"),
        ("old", "UPDATE client_updates SET update_blake3 = update_sha256 WHERE id = :i"),  # a second digest added
        ("new", "UPDATE client_updates SET update_blake3 = NULL WHERE id = :i"),  # blanked
        ("new", "UPDATE client_updates SET update_sha256 = update_blake3, update_blake3 = NULL WHERE id = :i"),
        (
            "new",
            "UPDATE client_updates SET update_blake3 = (SELECT MIN(update_sha256) FROM client_updates) WHERE id = :i",
        ),
    ],
    ids=["old-blanked", "old-moved", "old-doubled", "new-blanked", "new-moved", "new-replaced"],
)
def test_update_digests_from_before_and_after_blake3_verify_and_a_moved_or_blanked_one_is_named(
    db_url, tmp_path, which, sql
):
    """A record written by SHA-256 (tests/data/record_0012.json, fedmed before revision 0013) upgrades and goes on with
    BLAKE3 rows: both verify, each round entry naming its digests as written; an insider who blanks either column,
    moves a digest to the other, or adds one is named."""
    from test_store import RECORD_0012, load_record

    key, heads = load_record(db_url, tmp_path, RECORD_0012, "0012")
    repo = Repository(db_url, audit_key=key, heads_file=heads)  # migrates to 0013: no row changes, none re-vouched
    try:
        assert repo.verify_audit() is None
        repo.start_run("new-run", "demo", "job-new", "geometric_median", 2, {})
        for n in (1, 2):
            repo.record_round("new-run", _blake3_round(n))
        assert repo.verify_audit() is None
        old = repo.client_updates(repo.run_id_for_job("job-old"))
        new = repo.client_updates(repo.run_id_for_job("job-new"))
        assert all(len(u["update_sha256"]) == 64 and u["update_blake3"] is None for u in old)
        assert all(u["update_sha256"] is None and len(u["update_blake3"]) == 64 for u in new)
        entries = _exec(repo, "SELECT payload_json FROM audit_log WHERE action = 'record_round' ORDER BY id")
        rounds = [json.loads(payload) for payload in entries.scalars()]
        named = {(p["run"], p["round"]): [u[3] for u in p["updates"]] for p in rounds}
        assert named[("old-run", 2)] == [u["update_sha256"] for u in old if u["round"] == 2]  # as written
        assert named[("new-run", 2)] == [f"blake3:{u['update_blake3']}" for u in new if u["round"] == 2]
        target = _exec(
            repo,
            "SELECT cu.id FROM client_updates cu JOIN runs r ON r.id = cu.run_id JOIN sites s ON s.id = cu.site_id "
            "WHERE r.uid = :run AND cu.round_num = 2 AND s.name = 'hospital-a'",
            run=f"{which}-run",
        ).scalar()
        _exec(repo, sql, i=target)
        problem = repo.verify_audit()
        assert (problem.table, problem.row_id) == ("client_updates", target)
        assert f"{which}-run, 2, hospital-a" in problem.reason and "edited" in problem.reason
    finally:
        repo.close()
