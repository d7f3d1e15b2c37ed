"""Issue 29, item 4: a hospital's privacy ledger reset is seen by the server (fedmed.server.anchors).

Each hospital runs the real site round (fedmed.site.site_round.run_round: DP-SGD charged to its ledger, the update
signed); the server verifies the signature, runs the round engine and the anchor check on what arrived. The
hospital's IT, holding the site's files and its ledger key, deletes the ledger, cuts its newest line, or rewrites it
and re-MACs it: the ledger verifies again at the site, and the server alerts `ledger_reset` naming what it saw.
"""

import json
import re
import shutil
from dataclasses import replace

import pytest

from fedmed.data.loading import load_train_val
from fedmed.job import constants as C
from fedmed.job.records import RoundRecord, UpdateRecord
from fedmed.job.tasks import CHEST_XRAY14
from fedmed.models.network import build_densenet121, state_to_numpy
from fedmed.privacy.dp_sgd import SitePrivacy
from fedmed.privacy.ledger import LedgerBinding, PrivacyLedger, _canonical, _sha256
from fedmed.privacy.policy import PrivacyPolicy
from fedmed.security import signing
from fedmed.server.anchors import AnchorWatch, from_record
from fedmed.server.rounds import RoundEngine, RoundRules
from fedmed.site.site_config import DataConfig
from fedmed.site.site_round import GlobalModel, Site, Training, as_received, run_round, seen_count, update_digest, vouch
from fedmed.store.repository import Repository

SITES = ("hospital-a", "hospital-b")
POLICY = PrivacyPolicy(epsilon=50.0, noise_multiplier=1.0)
ROUNDS = 3


def _site(tiny_hospitals, tmp_path, name: str, keys) -> Site:
    train, _ = load_train_val(
        DataConfig("dicom", tiny_hospitals / name / "dicom", tiny_hospitals / name / "labels.csv"), 32, 0, CHEST_XRAY14
    )
    ledger = PrivacyLedger(tmp_path / name / "local" / "privacy_ledger.jsonl")
    binding = LedgerBinding(ledger, f"{name}-images", "job-1", POLICY.delta, None)
    return Site(
        name,
        CHEST_XRAY14,
        train,
        build_densenet121(CHEST_XRAY14.num_outputs, norm="group"),
        Training(batch_size=4, trainable=("class_layers.",)),  # the head only: the accounting does not depend on it
        privacy=SitePrivacy(POLICY, binding),
        sign_keys=keys,
    )


def _delete(ledger: PrivacyLedger) -> None:
    """Ledger, head file, key and identity index gone: the site starts a fresh ledger under a fresh key."""
    for p in (ledger.path, ledger.heads_path, ledger.key_path):
        p.unlink()
    shutil.rmtree(ledger.index_dir)


def _rewrite(ledger: PrivacyLedger, edit) -> None:
    """The lines as edit(list of JSON objects) leaves them, re-chained and re-MACed with the ledger's key, and the
    head file rewritten to match: what someone holding the site's files and key can do."""
    key = ledger.open_key()
    lines = [json.loads(line) for line in ledger.path.read_bytes().split(b"\n")[:-1]]
    out, prev = b"", "0" * 64
    for n, d in enumerate(edit(lines), 1):
        d.pop("mac")
        d.update(seq=n, prev=prev)
        line = _canonical({**d, "mac": key.mac(_canonical(d))})
        out, prev = out + line + b"\n", _sha256(line)
    ledger.path.write_bytes(out)
    ledger._write_heads(key, out)
    assert ledger.verify() is None  # the site itself sees a whole ledger


def _halve_the_first_charge(lines):
    lines[0]["history"] = [[h[0] * 2, h[1], h[2]] for h in lines[0]["history"]]  # twice the noise: half the spend
    return lines


ATTACKS = {
    "deleted": (_delete, r"holds 1 entries, 2 before: it was deleted, truncated or replaced"),
    "truncated": (
        lambda led: _rewrite(led, lambda lines: lines[:-1]),
        r"holds 2 entries, as it reported before, but entry 2 is another line: its newest line\(s\) were removed",
    ),
    "rehashed": (
        lambda led: _rewrite(led, _halve_the_first_charge),
        r"entry 2 is not the one it reported before: the ledger was rewritten \(its lines edited and re-MACed",
    ),
}


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_a_reset_ledger_is_alerted_by_the_server_with_what_happened(tiny_hospitals, tmp_path, attack):
    damage, reason = ATTACKS[attack]
    keys = {}
    for name in SITES:
        signing.generate_site_keys(tmp_path / "keys" / name, name)
        keys[name] = signing.load_site_keys(tmp_path / "keys" / name)
    sites = {name: _site(tiny_hospitals, tmp_path, name, keys[name]) for name in SITES}
    engine = RoundEngine(RoundRules(aggregation="fedavg", min_clients=2))
    watch = AnchorWatch()  # the server's memory, as the Controller keeps it for a job
    global_params = state_to_numpy(build_densenet121(CHEST_XRAY14.num_outputs, norm="group"))
    seen = []
    for r in range(ROUNDS):
        if r == 2:
            damage(sites["hospital-a"].privacy.ledger.ledger)
        results = []
        counts = watch.ledger_counts()  # sent with the global model (meta fedmed_ledger_seen)
        for name, site in sites.items():
            offer = GlobalModel(global_params, r, ROUNDS, job_id="job-1", ledger_seen=seen_count(counts, name))
            update = run_round(site, offer)
            assert update.refused is None, update.refused  # the hospital trains: its ledger verifies locally
            # the server verifies the signature first: the head is inside what the site signed
            digest = update_digest(update.params, update.metrics, update.meta, "job-1", r, name)
            signing.verify(digest, update.meta[C.META_SIGNATURE], keys[name].public)
            results.append(as_received(name, update.params, update.metrics, update.meta))
        anchors, alerts = watch.check(r, results)
        report = engine.step(r, global_params, results, list(SITES))
        global_params = dict(report.params)
        seen.append((anchors, alerts))
    for r, (anchors, alerts) in enumerate(seen[:2]):  # two honest rounds: each head extends the one before
        assert alerts == () and [(a.site, a.ledger_entries) for a in anchors] == [(s, r + 1) for s in SITES]
    anchors, alerts = seen[2]
    assert [(a.site, a.kind) for a in alerts] == [("hospital-a", "ledger_reset")]  # hospital-b's ledger is whole
    assert re.search(reason, alerts[0].message), alerts[0].message
    assert "(it reported 2 entries" in alerts[0].message and "at round 2 of this job" in alerts[0].message
    assert {a.site: a.ledger_entries for a in anchors}["hospital-b"] == 3


def test_the_ledger_head_is_inside_the_sites_signature(tmp_path, signing_keys):
    ledger = PrivacyLedger(tmp_path / "privacy_ledger.jsonl")
    binding = LedgerBinding(ledger, "images", "job-1", 1e-5, None)
    binding.charge(0, "dp_sgd", [(1.0, 0.25, 4)])
    site = Site("hospital-a", CHEST_XRAY14, None, None, ledger=binding)
    meta = {C.META_NUM_SAMPLES: 3}
    vouch(site, None, meta)
    assert meta[C.META_LEDGER_HEAD]["entries"] == 1
    params = {"w": state_to_numpy(build_densenet121(14))["class_layers.out.bias"]}
    sig = signing.sign(update_digest(params, {}, meta, "job-1", 0, "hospital-a"), signing_keys["hospital-a"])
    meta[C.META_LEDGER_HEAD] = {**meta[C.META_LEDGER_HEAD], "entries": 5}  # changed on the way, or by the site later
    with pytest.raises(signing.SignatureError, match="does not verify"):
        signing.verify(
            update_digest(params, {}, meta, "job-1", 0, "hospital-a"), sig, signing_keys["hospital-a"].public
        )


def _vouched(site: Site, seen=None) -> dict:
    meta = {}
    vouch(site, seen, meta)
    return meta


def test_a_ledger_deleted_between_jobs_is_alerted_against_the_head_the_record_holds(tmp_path):
    """Across jobs: the record keeps each site's anchors per round (site_anchors, covered by the keyed audit chain);
    the next job's check starts from the newest the record holds for each site."""
    url = f"sqlite:///{tmp_path / 'fedmed.db'}"
    repo = Repository(url)
    ledger = PrivacyLedger(tmp_path / "hospital-a" / "privacy_ledger.jsonl")
    binding = LedgerBinding(ledger, "images", "job-1", 1e-5, None)
    site = Site("hospital-a", CHEST_XRAY14, None, None, ledger=binding)
    watch = AnchorWatch()
    repo.start_run("run-1", "demo", "job-1", "fedavg", 2, {})
    for r in range(2):
        binding.charge(r, "dp_sgd", [(1.0, 0.25, 4)])
        meta = _vouched(site, seen_count(watch.ledger_counts(), "hospital-a"))
        watch.check(r, [as_received("hospital-a", {}, {}, meta)])
        repo.record_round("run-1", watch.attach(RoundRecord(r + 1, (UpdateRecord("hospital-a", "accepted", 3),))))
    run1 = repo.run_id_of("run-1")
    assert [(a["round"], a["ledger_entries"]) for a in repo.site_anchors(run1)] == [(1, 1), (2, 2)]
    assert repo.verify_audit() is None  # the anchors are part of the audited record

    _delete(ledger)  # between the jobs, at the hospital
    binding.charge(0, "dp_sgd", [(1.0, 0.25, 4)])
    watch2 = AnchorWatch(from_record(repo.last_ledger_heads()))  # what the Controller opens at job start
    assert watch2.ledger_counts() == {"hospital-a": 2}
    meta = _vouched(site, seen_count(watch2.ledger_counts(), "hospital-a"))
    _, alerts = watch2.check(0, [as_received("hospital-a", {}, {}, meta)])
    repo.start_run("run-2", "demo", "job-2", "fedavg", 2, {})
    repo.record_round("run-2", watch2.attach(RoundRecord(1, (UpdateRecord("hospital-a", "accepted", 3),))))
    recorded = repo.alerts(repo.run_id_of("run-2"))
    assert [(a["site"], a["kind"]) for a in recorded] == [("hospital-a", "ledger_reset")]
    assert "holds 1 entries, 2 before: it was deleted, truncated or replaced" in recorded[0]["message"]
    assert "at run run-1, round 2" in recorded[0]["message"]
    assert repo.verify_audit() is None
    repo.close()


def test_unauthenticated_refused_or_malformed_reports_vouch_for_nothing(tmp_path):
    ledger = PrivacyLedger(tmp_path / "privacy_ledger.jsonl")
    binding = LedgerBinding(ledger, "images", "job-1", 1e-5, None)
    binding.charge(0, "dp_sgd", [(1.0, 0.25, 4)])
    site = Site("hospital-a", CHEST_XRAY14, None, None, ledger=binding)
    meta = _vouched(site)
    watch = AnchorWatch()
    forged = as_received("hospital-a", {}, {}, meta)
    anchors, alerts = watch.check(0, [replace(forged, authentication="Ed25519 signature does not verify")])
    assert anchors == () and alerts == () and watch.ledger_counts() == {}
    bad = as_received("hospital-a", {}, {}, {C.META_LEDGER_HEAD: {"entries": 1, "head": "x" * 500}})
    anchors, alerts = watch.check(0, [bad])
    assert [a.kind for a in alerts] == ["ledger_reset"] and "unreadable" in alerts[0].message
    assert anchors == ()
