"""Done-when of the lifetime ledger, in NVFlare's simulator: one hospital takes two jobs on the same images; the
second is refused at the round that would pass the hospital's lifetime ceiling; the ledger shows both and verifies."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedmed.privacy.accounting import epsilon_of
from fedmed.privacy.ledger import PrivacyLedger
from test_job import _simulate, _write_site_configs

REPO = Path(__file__).resolve().parents[1]
SITE = "hospital-c"


def _own_folder(path):
    """Each record in a folder of its own: records beside each other share the default audit key and heads file,
    and a second, empty record beside the first one's heads is refused (it reads as an emptied record)."""
    path.mkdir(parents=True, exist_ok=True)
    return path


def _configure(root: Path, ledger: Path, lifetime=None):
    _write_site_configs(root)
    cfg_path = root / SITE / "fedmed_site.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["privacy"] = {"epsilon": 50.0, "noise_multiplier": 1.0, **({"lifetime_epsilon": lifetime} if lifetime else {})}
    cfg["privacy_ledger"] = str(ledger)  # the site's own config names it; no job can
    cfg_path.write_text(json.dumps(cfg))


@pytest.mark.integration
def test_second_job_is_refused_at_the_round_that_would_pass_the_lifetime_ceiling(tiny_hospitals, tmp_path):
    ledger = PrivacyLedger(tmp_path / "hospital-c-ledger" / "privacy_ledger.jsonl")
    # cross-site evaluation off: the ledger charges training rounds only, and each job would add a step
    args = ("--rounds", "2", "--norm", "group", "--min-clients", "2", "--no-cross-site-eval")
    try:
        _configure(tiny_hospitals, ledger.path)
        repo1, run1 = _simulate(tiny_hospitals, tmp_path / "ws1", _own_folder(tmp_path / "db1") / "one.db", *args)
        first = ledger.entries()
        assert [(e.round, e.mechanism) for e in first] == [(0, "dp_sgd"), (1, "dp_sgd")]
        per_round = first[0].history[0]
        # The hospital's privacy officer allows 3 rounds' worth on these images, not 4: job 2 gets one round.
        three, four = (epsilon_of([per_round] * n, 1e-5) for n in (3, 4))
        _configure(tiny_hospitals, ledger.path, lifetime=(three + four) / 2)
        repo2, run2 = _simulate(tiny_hospitals, tmp_path / "ws2", _own_folder(tmp_path / "db2") / "two.db", *args)
    finally:
        _write_site_configs(tiny_hospitals)
    ups = {(u["round"], u["site"]): u for u in repo2.client_updates(run2)}
    assert ups[(1, SITE)]["status"] == "accepted"  # the record counts rounds from 1; the ledger from 0
    refused = ups[(2, SITE)]
    assert refused["status"] == "refused" and "lifetime privacy budget" in refused["reason"]
    assert f"to {four:.3f}" in refused["reason"]
    assert repo2.get_run(run2).status == "finished"  # the other hospitals carry the job
    entries = ledger.entries()
    runs = list(dict.fromkeys(e.details["run"] for e in entries))
    assert len(entries) == 3 and len(runs) == 2  # both jobs, the refused round not charged
    assert [e.round for e in entries] == [0, 1, 0] and ledger.verify() is None
    assert entries[-1].epsilon_after == pytest.approx(three, rel=1e-9)
    assert len({e.dataset for e in entries}) == 1  # the same images, whatever the job's split seed
    show = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "privacy_ledger.py"), "show", str(ledger.path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert show.returncode == 0 and "2 job(s)" in show.stdout, show.stdout + show.stderr


@pytest.mark.integration
def test_a_ledger_deleted_between_two_jobs_is_alerted_in_the_second_jobs_record(tiny_hospitals, tmp_path):
    """Issue 29 item 4 in NVFlare's simulator: two jobs record to one database; between them hospital-c's IT deletes
    its ledger, head file and key (the site then starts a fresh ledger and trains). The second job's record holds a
    ledger_reset alert naming the deleted ledger against the head the first job recorded."""
    ledger = PrivacyLedger(tmp_path / "hospital-c-ledger" / "privacy_ledger.jsonl")
    db = _own_folder(tmp_path / "db") / "fedmed.db"
    args = ("--rounds", "2", "--norm", "group", "--min-clients", "2", "--no-cross-site-eval")
    try:
        _configure(tiny_hospitals, ledger.path)
        repo, run1 = _simulate(tiny_hospitals, tmp_path / "ws1", db, *args)
        heads = [(a["round"], a["ledger_entries"]) for a in repo.site_anchors(run1) if a["site"] == SITE]
        assert heads == [(1, 1), (2, 2)] and repo.alerts(run1) == []
        repo.close()
        for p in (ledger.path, ledger.heads_path, ledger.key_path):
            p.unlink()
        repo, run2 = _simulate(tiny_hospitals, tmp_path / "ws2", db, *args)
    finally:
        _write_site_configs(tiny_hospitals)
    alerts = [a for a in repo.alerts(run2) if a["kind"] == "ledger_reset"]
    assert [(a["round"], a["site"]) for a in alerts] == [(1, SITE)], repo.alerts(run2)
    assert "holds 1 entries, 2 before: it was deleted, truncated or replaced" in alerts[0]["message"]
    assert [(a["round"], a["ledger_entries"]) for a in repo.site_anchors(run2) if a["site"] == SITE] == [(1, 1), (2, 2)]
    assert repo.get_run(run2).status == "finished" and repo.verify_audit() is None
