"""A hospital's lifetime privacy ledger: exact composition across jobs, a chain that finds torn and edited lines,
refusal past the lifetime ceiling before training, and DP randomness the job's configuration does not determine.
(Per-image and per-patient accounting, charges once per (run, round), the key and head file: test_ledger_identity.py.)"""

import json
import multiprocessing
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from opacus.accountants import RDPAccountant
from torch.utils.data import Dataset

from fedmed.job.tasks import CHEST_XRAY14
from fedmed.learning.training import LocalTraining
from fedmed.models.network import build_densenet121
from fedmed.privacy.accounting import BudgetExceeded, SiteRDPAccountant
from fedmed.privacy.dp_sgd import SitePrivacy
from fedmed.privacy.ledger import (
    GENESIS,
    ChargeTag,
    LedgerBinding,
    LedgerError,
    LifetimeBudgetExceeded,
    PrivacyLedger,
)
from fedmed.privacy.policy import PrivacyPolicy, parse_privacy, strictest

REPO = Path(__file__).resolve().parents[1]
DATASET = "ab" * 32
HEAD = ["class_layers."]  # train only the head: the accounting does not depend on it, and it is faster


def _charge(ledger, job="job-1", rnd=0, history=((2.0, 0.25, 8),), ceiling=None):
    return ledger.charge(DATASET, job, rnd, "dp_sgd", history, 1e-5, ceiling)


def test_entries_compose_exactly_across_jobs_and_survive_reopening(tmp_path):
    path = tmp_path / "local" / "privacy_ledger.jsonl"
    _charge(PrivacyLedger(path), "job-1", 0, [(1.0, 0.25, 8)])
    _charge(PrivacyLedger(path), "job-1", 1, [(1.0, 0.25, 8)])
    last = _charge(PrivacyLedger(path), "job-2", 0, [(1.5, 0.1, 20)])
    PrivacyLedger(path).charge("other" * 8, "job-3", 0, "dp_sgd", [(0.8, 0.5, 4)], 1e-5, None)  # another dataset
    entries = PrivacyLedger(path).entries()  # a fresh object: what a restarted site reads
    assert [(e.seq, e.job_id, e.round) for e in entries] == [
        (1, "job-1", 0),
        (2, "job-1", 1),
        (3, "job-2", 0),
        (4, "job-3", 0),
    ]
    assert entries[0].prev == GENESIS and PrivacyLedger(path).verify() is None
    ref = RDPAccountant()
    ref.history = [(1.0, 0.25, 16), (1.5, 0.1, 20)]  # RDP composition, not a sum of epsilons
    expected = ref.get_epsilon(1e-5, alphas=SiteRDPAccountant.ORDERS)
    assert last.epsilon_after == pytest.approx(expected, rel=1e-9)
    assert PrivacyLedger(path).lifetime_epsilon(DATASET, 1e-5) == pytest.approx(expected, rel=1e-9)
    assert (
        expected
        < entries[1].epsilon_after
        + PrivacyLedger(tmp_path / "x").charge(DATASET, "j", 0, "dp_sgd", [(1.5, 0.1, 20)], 1e-5, None).epsilon_after
    )


def test_a_charge_past_the_lifetime_ceiling_writes_nothing(tmp_path):
    ledger = PrivacyLedger(tmp_path / "l.jsonl")
    first = _charge(ledger, ceiling=4.0)
    before = ledger.path.read_bytes()
    with pytest.raises(LifetimeBudgetExceeded, match=r"from [0-9.]+ to [0-9.]+ .*over the site's lifetime ceiling 4.0"):
        _charge(ledger, "job-2", history=[(0.5, 0.25, 50)], ceiling=4.0)
    assert ledger.path.read_bytes() == before and first.epsilon_after < 4.0


@pytest.mark.parametrize(
    "damage, match",
    [
        (lambda b: b[:-20], "last line is incomplete"),  # a torn write
        (lambda b: b.replace(b'"round":0', b'"round":7', 1), "MAC does not match"),  # an edited field
        (lambda b: b"\n".join(b.split(b"\n")[1:]), "'prev' does not match"),  # the first line removed
        (
            lambda b: b.split(b"\n")[1] + b"\n" + b.split(b"\n")[0] + b"\n" + b"\n".join(b.split(b"\n")[2:]),
            "'prev' does not match",
        ),  # two lines swapped
    ],
)
def test_torn_edited_or_reordered_lines_are_found_and_no_more_is_charged(tmp_path, damage, match):
    ledger = PrivacyLedger(tmp_path / "l.jsonl")
    for r in range(3):
        _charge(ledger, rnd=r)
    ledger.path.write_bytes(damage(ledger.path.read_bytes()))
    damaged = ledger.path.read_bytes()
    assert match in ledger.verify()
    with pytest.raises(LedgerError, match=match):
        _charge(ledger, rnd=3)
    assert ledger.path.read_bytes() == damaged  # nothing appended to a damaged ledger


def test_the_officers_verify_names_the_damage(tmp_path):
    ledger = PrivacyLedger(tmp_path / "l.jsonl")
    _charge(ledger)
    ledger.path.write_bytes(ledger.path.read_bytes()[:-20])
    out = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "privacy_ledger.py"), "verify", str(ledger.path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1 and "DAMAGED" in out.stderr and "last line is incomplete" in out.stderr


def _hammer(path, n, out):
    ledger = PrivacyLedger(path)
    ok = 0
    for i in range(n):
        try:
            ledger.charge(DATASET, f"proc-{out}", i, "dp_sgd", [(2.0, 0.25, 8)], 1e-5, 6.0)
            ok += 1
        except LifetimeBudgetExceeded:
            pass
    return ok


def test_concurrent_jobs_cannot_both_spend_the_last_of_the_budget(tmp_path):
    path = tmp_path / "l.jsonl"
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        counts = pool.starmap(_hammer, [(path, 8, 0), (path, 8, 1)])
    ledger = PrivacyLedger(path)
    assert ledger.verify() is None and len(ledger.entries()) == sum(counts)
    assert ledger.lifetime_epsilon(DATASET, 1e-5) <= 6.0 * (1 + 1e-6)
    single = PrivacyLedger(tmp_path / "single.jsonl")
    assert sum(counts) == _hammer(single.path, 16, 2)  # exactly as many as one process alone gets


def test_lifetime_policy_parses_and_the_strictest_source_wins():
    assert parse_privacy({"preset": "moderate"}).lifetime_ceiling == 3.0  # default: one job's worth
    assert parse_privacy({"preset": "moderate", "lifetime_epsilon": 10}).lifetime_ceiling == 10.0
    with pytest.raises(ValueError, match="lifetime_epsilon must be a number"):
        parse_privacy({"preset": "moderate", "lifetime_epsilon": "lots"})
    with pytest.raises(ValueError, match="lifetime_epsilon must be > 0"):
        parse_privacy({"preset": "moderate", "lifetime_epsilon": 0})
    site = PrivacyPolicy(8.0, lifetime_epsilon=20.0)
    assert strictest(site, PrivacyPolicy(3.0)).lifetime_ceiling == 3.0  # the scope gives no lifetime: its job ceiling
    assert strictest(site, PrivacyPolicy(3.0, lifetime_epsilon=12.0)).lifetime_ceiling == 12.0


class _Recording(Dataset):
    """A tiny dataset that records which indices each training run reads."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.x = torch.rand(24, 1, 32, 32, generator=g)
        self.y = (torch.rand(24, 14, generator=g) > 0.8).float()
        self.seen = []

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        self.seen.append(int(i))
        return self.x[i], self.y[i]


def test_second_job_is_refused_at_the_lifetime_ceiling_before_training(tmp_path):
    ledger = PrivacyLedger(tmp_path / "privacy_ledger.jsonl")
    # (sigma 1, q 1/4, 4 steps) a round: lifetime epsilon 4.87, 6.25, 7.33, 8.26 after 1-4 rounds
    policy = PrivacyPolicy(epsilon=50.0, noise_multiplier=1.0, lifetime_epsilon=7.5)
    data = _Recording()
    model = build_densenet121(14, norm="group")
    job1 = SitePrivacy(policy, LedgerBinding(ledger, DATASET, "job-1", policy.delta, policy.lifetime_ceiling))
    for r in range(2):
        model, info = job1.train_round(
            model, data, LocalTraining(1, 1e-3, 6, trainable=HEAD, total_epochs=10), task=CHEST_XRAY14, round_num=r
        )
    assert info.lifetime_epsilon == pytest.approx(job1.epsilon_spent, rel=1e-9)  # one job so far: the same
    job2 = SitePrivacy(policy, LedgerBinding(ledger, DATASET, "job-2", policy.delta, policy.lifetime_ceiling))
    rounds = 0
    with pytest.raises(LifetimeBudgetExceeded, match="from 7.328 to 8.255 .*over the site's lifetime ceiling 7.5"):
        for r in range(10):
            before = {k: v.clone() for k, v in model.state_dict().items()}
            data.seen.clear()
            model, info = job2.train_round(
                model, data, LocalTraining(1, 1e-3, 6, trainable=HEAD, total_epochs=10), task=CHEST_XRAY14, round_num=r
            )
            rounds += 1
    assert rounds == 1 and data.seen == []  # refused at its 2nd round, before reading a single image
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert job2.epsilon_spent < 50.0  # the job's own ceiling was not what stopped it
    entries = ledger.entries()
    assert [e.job_id for e in entries] == ["job-1"] * 2 + ["job-2"] * rounds and ledger.verify() is None
    assert entries[-1].epsilon_after == pytest.approx(7.328, abs=1e-3)
    show = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "privacy_ledger.py"), "show", str(ledger.path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert show.returncode == 0 and "2 job(s)" in show.stdout and "job-2" in show.stdout, show.stderr


def test_a_job_resuming_a_run_counts_the_runs_earlier_dp_sgd_spend_toward_its_ceiling(tmp_path):
    # fedmed.server.resume: job-2 continues job-1's run. (sigma 1, q 1/4, 4 steps) a round: epsilon 4.87, 6.25, 7.33 after
    # 1-3 rounds; the job ceiling 7.0 allows the run 2 rounds, whichever job runs them.
    ledger = PrivacyLedger(tmp_path / "privacy_ledger.jsonl")
    policy = PrivacyPolicy(epsilon=7.0, noise_multiplier=1.0, lifetime_epsilon=100.0)
    data = _Recording()
    model = build_densenet121(14, norm="group")
    job1 = SitePrivacy(policy, LedgerBinding(ledger, DATASET, "job-1", policy.delta, policy.lifetime_ceiling))
    for r in range(2):
        model, _ = job1.train_round(
            model, data, LocalTraining(1, 1e-3, 6, trainable=HEAD, total_epochs=3), task=CHEST_XRAY14, round_num=r
        )
    other = LedgerBinding(ledger, "another dataset", "job-1", policy.delta, None)
    other.charge(0, "dp_sgd", [(0.5, 1.0, 9)])  # another dataset's spend is not this one's
    job2_binding = LedgerBinding(ledger, DATASET, "job-2", policy.delta, policy.lifetime_ceiling)
    job2_binding.charge(0, "user_level", [(2.0, 1.0, 1)])  # nor is a mechanism the job ceiling does not govern
    earlier = job2_binding.history_of_jobs(["job-1", "job-0"], "dp_sgd")
    assert earlier == [(1.0, 0.25, 4)] * 2
    job2 = SitePrivacy(policy, job2_binding)
    job2.continue_run(earlier)
    assert job2.epsilon_spent == pytest.approx(job1.epsilon_spent, rel=1e-9)
    data.seen.clear()
    with pytest.raises(BudgetExceeded, match="from 6.253 to 7.328, over the site's ceiling 7.0"):
        job2.train_round(
            model, data, LocalTraining(1, 1e-3, 6, trainable=HEAD, total_epochs=3), task=CHEST_XRAY14, round_num=2
        )
    assert data.seen == []  # refused before reading an image
    with pytest.raises(RuntimeError, match="before this job's first round"):
        job1.continue_run(earlier)


def test_two_runs_of_the_same_job_config_draw_different_batches_and_noise():
    # Same seed argument, same model, same data: sampling and noise come from the OS, not from the job.
    policy = PrivacyPolicy(epsilon=50.0, noise_multiplier=1.0)
    runs = []
    for _ in range(2):
        data = _Recording()
        torch.manual_seed(0)
        model = build_densenet121(14, norm="group")
        model, _ = SitePrivacy(policy).train_round(
            model, data, LocalTraining(1, 1e-2, 6, trainable=["class_layers."], total_epochs=2), task=CHEST_XRAY14
        )
        runs.append((data.seen, model.state_dict()["class_layers.out.weight"].clone()))
    (seen_a, w_a), (seen_b, w_b) = runs
    assert seen_a and seen_b and seen_a != seen_b
    assert not torch.equal(w_a, w_b)


def test_ledger_cli_shows_each_job_and_the_lifetime_epsilon(tmp_path):
    ledger = PrivacyLedger(tmp_path / "l.jsonl")
    _charge(ledger, "job-1", 0)
    ledger.charge(
        DATASET,
        "job-2",
        0,
        "user_level",
        [(0.5, 1.0, 1)],
        1e-5,
        None,
        ChargeTag(details={"relation": "replace", "noise_multiplier": 1.0, "clip_norm": 1.0}),
    )
    out = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "privacy_ledger.py"), "show", str(ledger.path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "2 job(s)" in out.stdout and ledger.head() in out.stdout
    assert "user-level (whole-site, replace) epsilon over 1 round(s)" in out.stdout
    row = next(line.split() for line in out.stdout.splitlines() if " job-1 " in line)
    assert row[4] == "1"  # charged at wire round 0: shown from 1, as the record, logs and report number rounds
    ok = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "privacy_ledger.py"), "verify", str(ledger.path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ok.returncode == 0 and "2 entries chained" in ok.stdout
    assert json.loads(ledger.path.read_text().splitlines()[0])["format"] == 2
