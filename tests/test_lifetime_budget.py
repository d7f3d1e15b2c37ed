"""Done-when of the lifetime ledger, in NVFlare's simulator: one hospital takes two jobs on the same images; the
second is refused at the round that would pass the hospital's lifetime ceiling; the ledger shows both and verifies."""

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from fedmed.privacy.accounting import epsilon_of
from fedmed.privacy.ledger import PrivacyLedger
from test_job import _simulate, _write_site_configs

REPO = Path(__file__).resolve().parents[1]
SITE = "hospital-c"  # its officer lowers the lifetime ceiling between the jobs: job 2 is refused at round 2
DELETER = "hospital-b"  # its IT deletes its ledger, head file and key between the jobs
ARGS = ("--rounds", "2", "--norm", "group", "--min-clients", "2", "--no-cross-site-eval")
# cross-site evaluation off: the ledger charges training rounds only, and each job would add a step


def _own_folder(path):
    """Each record in a folder of its own: records beside each other share the default audit key and heads file,
    and a second, empty record beside the first one's heads is refused (it reads as an emptied record)."""
    path.mkdir(parents=True, exist_ok=True)
    return path


def _configure(root: Path, ledgers: dict, lifetime=None):
    """DP-SGD at each site of `ledgers`, each with its own ledger named by its own config (no job can)."""
    _write_site_configs(root)
    for site, ledger in ledgers.items():
        cfg_path = root / site / "fedmed_site.json"
        cfg = json.loads(cfg_path.read_text())
        ceiling = {"lifetime_epsilon": lifetime} if lifetime and site == SITE else {}
        cfg["privacy"] = {"epsilon": 50.0, "noise_multiplier": 1.0, **ceiling}
        cfg["privacy_ledger"] = str(ledger)
        cfg_path.write_text(json.dumps(cfg))


@dataclass
class TwoJobs:
    repo: object
    run1: str
    run2: str
    ledger: PrivacyLedger  # SITE's
    first: list  # SITE's ledger entries after job 1
    three: float  # SITE's epsilon after 3 rounds' worth and 4 (its ceiling lies between them)
    four: float
    deleted_heads: list  # DELETER's anchors (round, entries) in job 1


@pytest.fixture(scope="module")
def two_jobs(tiny_hospitals, tmp_path_factory):
    """Two simulator jobs on the same images, recorded to one database (one pair of jobs serves both tests: a job
    pair costs ~2 minutes of CI). Between them SITE's ceiling is set to 3 rounds' worth and DELETER's IT deletes its
    ledger, head file and key (that site then starts a fresh ledger and trains)."""
    tmp = tmp_path_factory.mktemp("lifetime")
    ledger = PrivacyLedger(tmp / "hospital-c-ledger" / "privacy_ledger.jsonl")
    deleted = PrivacyLedger(tmp / "hospital-b-ledger" / "privacy_ledger.jsonl")
    ledgers = {SITE: ledger.path, DELETER: deleted.path}
    db = _own_folder(tmp / "db") / "fedmed.db"
    try:
        _configure(tiny_hospitals, ledgers)
        repo, run1 = _simulate(tiny_hospitals, tmp / "ws1", db, *ARGS)
        first = ledger.entries()
        heads = [(a["round"], a["ledger_entries"]) for a in repo.site_anchors(run1) if a["site"] == DELETER]
        assert repo.alerts(run1) == [], repo.alerts(run1)
        repo.close()
        per_round = first[0].history[0]
        # The hospital's privacy officer allows 3 rounds' worth on these images, not 4: job 2 gets one round.
        three, four = (epsilon_of([per_round] * n, 1e-5) for n in (3, 4))
        for p in (deleted.path, deleted.heads_path, deleted.key_path):
            p.unlink()
        _configure(tiny_hospitals, ledgers, lifetime=(three + four) / 2)
        repo, run2 = _simulate(tiny_hospitals, tmp / "ws2", db, *ARGS)
    finally:
        _write_site_configs(tiny_hospitals)
    return TwoJobs(repo, run1, run2, ledger, first, three, four, heads)


@pytest.mark.integration
def test_second_job_is_refused_at_the_round_that_would_pass_the_lifetime_ceiling(two_jobs):
    jobs = two_jobs
    assert [(e.round, e.mechanism) for e in jobs.first] == [(0, "dp_sgd"), (1, "dp_sgd")]
    ups = {(u["round"], u["site"]): u for u in jobs.repo.client_updates(jobs.run2)}
    assert ups[(1, SITE)]["status"] == "accepted"  # the record counts rounds from 1; the ledger from 0
    refused = ups[(2, SITE)]
    assert refused["status"] == "refused" and "lifetime privacy budget" in refused["reason"]
    assert f"to {jobs.four:.3f}" in refused["reason"]
    assert jobs.repo.get_run(jobs.run2).status == "finished"  # the other hospitals carry the job
    entries = jobs.ledger.entries()
    runs = list(dict.fromkeys(e.details["run"] for e in entries))
    assert len(entries) == 3 and len(runs) == 2  # both jobs, the refused round not charged
    assert [e.round for e in entries] == [0, 1, 0] and jobs.ledger.verify() is None
    assert entries[-1].epsilon_after == pytest.approx(jobs.three, rel=1e-9)
    assert len({e.dataset for e in entries}) == 1  # the same images, whatever the job's split seed
    show = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "privacy_ledger.py"), "show", str(jobs.ledger.path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert show.returncode == 0 and "2 job(s)" in show.stdout, show.stdout + show.stderr


@pytest.mark.integration
def test_a_ledger_deleted_between_two_jobs_is_alerted_in_the_second_jobs_record(two_jobs):
    """Issue 29 item 4 in NVFlare's simulator: two jobs record to one database; between them hospital-b's IT deletes
    its ledger, head file and key. The second job's record holds a ledger_reset alert naming the deleted ledger
    against the head the first job recorded, and no other site's."""
    jobs = two_jobs
    assert jobs.deleted_heads == [(1, 1), (2, 2)]
    alerts = [a for a in jobs.repo.alerts(jobs.run2) if a["kind"] == "ledger_reset"]
    assert [(a["round"], a["site"]) for a in alerts] == [(1, DELETER)], jobs.repo.alerts(jobs.run2)
    assert "holds 1 entries, 2 before: it was deleted, truncated or replaced" in alerts[0]["message"]
    anchors = jobs.repo.site_anchors(jobs.run2)
    assert [(a["round"], a["ledger_entries"]) for a in anchors if a["site"] == DELETER] == [(1, 1), (2, 2)]
    # SITE's ledger was kept: its anchors go on from job 1's head (2 entries), the refused round adds none
    assert [(a["round"], a["ledger_entries"]) for a in anchors if a["site"] == SITE][0] == (1, 3)
    assert jobs.repo.get_run(jobs.run2).status == "finished" and jobs.repo.verify_audit() is None
