"""Every round rule of fedmed.server.rounds.RoundEngine, without a simulator: screening, capped counts, robust BatchNorm
statistics, replay and duplicates, trust and quarantine, encrypted blocks (real TenSEAL), and the record."""

from dataclasses import replace

import numpy as np
import pytest

from fedmed.server.robust.trust import SiteTrust, TrustPolicy
from fedmed.server.rounds import RoundEngine, RoundRules, SiteResult, check_encryption_compatible

GLOBAL = {
    "w": np.zeros(8, np.float32),
    "bn.running_mean": np.zeros(3, np.float32),
    "bn.running_var": np.ones(3, np.float32),
    "bn.num_batches_tracked": np.array(0, np.int64),
}


def upd(shift, var=1.0, seed=0, **bn):
    rng = np.random.default_rng(seed)
    p = {k: v.copy() for k, v in GLOBAL.items()}
    p["w"] = (np.full(8, shift) + 0.01 * rng.standard_normal(8)).astype(np.float32)
    p["bn.running_var"] = np.full(3, var, np.float32)
    p["bn.num_batches_tracked"] = np.array(10, np.int64)
    p.update(bn)
    return p


def honest(n=4, count=300, start=0):
    return [SiteResult(f"h{i}", upd(1.0, seed=start + i), count, {"val_accuracy": 0.8}) for i in range(n)]


def engine(**kw):
    return RoundEngine(RoundRules(**{"aggregation": "geometric_median", "min_clients": 2, **kw}))


def status(report, site):
    return next(u for u in report.updates if u.site == site)


def test_a_claimed_count_cannot_buy_the_median():
    # Sign-flipped update claiming 5000 samples against four honest sites of 300 (the numbers).
    evil = SiteResult("evil", upd(-1.0, seed=9), 5000)
    rep = engine().step(0, GLOBAL, honest() + [evil], [])
    assert rep.aggregated
    assert abs(float(rep.params["w"].mean()) - 1.0) < 0.05  # the honest mean, not the attacker's -1
    u = status(rep, "evil")
    assert u.num_samples == 5000 and u.weight_samples == 300  # claimed and used both recorded
    assert u.status == "rejected" and "far outlier" in u.reason


def test_an_inflated_count_on_an_honest_looking_update_weighs_no_more_than_an_honest_site():
    sites = honest() + [SiteResult("big", upd(1.0, seed=7), 300 * 100)]
    rep = engine().step(0, GLOBAL, sites, [])
    assert rep.weights["big"] <= max(rep.weights[f"h{i}"] for i in range(4)) + 1e-9
    assert rep.used_samples["big"] == 300


def test_site_validation_scores_are_weighted_by_capped_counts():
    sites = honest(3) + [SiteResult("big", upd(1.0, seed=7), 30000, {"val_accuracy": 0.0})]
    rep = engine().step(0, GLOBAL, sites, [])
    # Uncapped, the 30000-sample claim would pull the round score to ~0.02.
    assert rep.weighted_site_metric(sites, "val_accuracy") == pytest.approx(0.6)


@pytest.mark.parametrize("bad", [True, 2.5, -3, 0, "300", None, 10**12])
def test_bad_sample_counts_are_rejected_with_the_reason(bad):
    rep = engine().step(0, GLOBAL, honest(3) + [SiteResult("odd", upd(1.0, seed=5), bad)], [])
    u = status(rep, "odd")
    assert u.status == "rejected" and "num_samples" in u.reason
    assert rep.aggregated and rep.weights.get("odd", 0.0) == 0.0


@pytest.mark.parametrize("var", [-1e6, 0.0, 1e6, np.nan])
def test_poisoned_batchnorm_variances_are_rejected(var):
    evil = SiteResult("evil", upd(1.0, seed=4, **{"bn.running_var": np.full(3, var, np.float32)}), 300)
    rep = engine().step(0, GLOBAL, honest(3) + [evil], [])
    u = status(rep, "evil")
    assert u.status == "rejected" and "bn.running_var" in u.reason
    assert np.all(rep.params["bn.running_var"] > 0)


def test_batchnorm_mean_moved_beyond_the_bound_is_rejected():
    evil = SiteResult("evil", upd(1.0, seed=4, **{"bn.running_mean": np.full(3, 1e4, np.float32)}), 300)
    u = status(engine().step(0, GLOBAL, honest(3) + [evil], []), "evil")
    assert u.status == "rejected" and "running_mean" in u.reason


def test_batchnorm_statistics_within_the_bound_are_taken_as_a_coordinate_median():
    sites = [SiteResult(f"s{i}", upd(1.0, var=v, seed=i), 300) for i, v in enumerate([1.0, 1.2, 1.1, 90.0])]
    rep = engine().step(0, GLOBAL, sites, [])
    np.testing.assert_allclose(rep.params["bn.running_var"], np.median([1.0, 1.2, 1.1, 90.0]), rtol=1e-6)
    assert rep.params["bn.num_batches_tracked"].dtype == np.int64


def test_validation_screening_rejects_what_distance_cannot_see():
    # The server's validation score of each update, here the mean weight: the label-flipped site's update is as
    # close to the others as they are to each other, but scores far below the median site.
    sites = [SiteResult(f"h{i}", upd(1.0, seed=i), 300) for i in range(3)] + [SiteResult("flip", upd(1.0, seed=9), 300)]
    score = {id(r.params): (0.52 if r.site == "flip" else 0.60 + 0.005 * i) for i, r in enumerate(sites)}
    eng = RoundEngine(RoundRules(min_clients=2, validation_margin=0.05), validate=lambda p: score[id(p)])
    rep = eng.step(0, GLOBAL, sites, [])
    u = status(rep, "flip")
    assert u.status == "rejected" and "validation score" in u.reason and "below the median" in u.reason
    assert all(status(rep, f"h{i}").status == "accepted" for i in range(3))
    # Without the validation set the same update is aggregated: distance alone does not see it.
    assert status(engine().step(0, GLOBAL, sites, []), "flip").status == "accepted"


def test_nan_update_is_rejected_and_quarantined_at_once():
    evil = SiteResult("evil", {**upd(1.0), "w": np.full(8, np.nan, np.float32)}, 300)
    eng = engine()
    rep = eng.step(0, GLOBAL, honest(3) + [evil], [])
    assert status(rep, "evil").status == "rejected" and "NaN" in status(rep, "evil").reason
    assert eng.is_quarantined("evil")
    assert any(a.kind == "quarantined" and a.site == "evil" for a in rep.alerts)


def test_a_clearly_hostile_first_round_quarantines():
    eng = engine()
    eng.step(0, GLOBAL, honest(4) + [SiteResult("evil", upd(-50.0), 300)], [])
    assert eng.is_quarantined("evil") and eng.trust["evil"].trust == 0.5
    # Next round it is scored but not aggregated even with an honest-looking update.
    rep = eng.step(1, GLOBAL, honest(4, start=10) + [SiteResult("evil", upd(1.0, seed=99), 300)], [])
    assert status(rep, "evil").status == "quarantined" and rep.weights["evil"] == 0.0


def test_without_zero_round_rule_trust_alone_needs_two_bad_rounds():
    eng = engine(trust=TrustPolicy(quarantine_on_zero=False))
    eng.step(0, GLOBAL, honest(4) + [SiteResult("evil", upd(-50.0), 300)], [])
    assert not eng.is_quarantined("evil")  # 1.0 -> 0.5, not below 0.5: why quarantine_on_zero exists


def test_trust_carried_from_an_earlier_job_keeps_a_site_quarantined():
    eng = RoundEngine(RoundRules(min_clients=2), trust={"h0": SiteTrust(0.2, quarantined=True)})
    rep = eng.step(0, GLOBAL, honest(4), [])
    assert status(rep, "h0").status == "quarantined" and rep.weights["h0"] == 0.0


def test_replayed_update_is_rejected():
    eng = engine()
    first = honest(4)
    eng.step(0, GLOBAL, first, [])
    rep = eng.step(1, GLOBAL, honest(3, start=20) + [first[3]], [])
    u = status(rep, "h3")
    assert u.status == "rejected" and "replay" in u.reason and "round 1" in u.reason


def test_two_sites_sending_the_same_update_count_once():
    sites = honest(3)
    rep = engine().step(0, GLOBAL, sites + [SiteResult("twin", sites[0].params, 300)], [])
    assert status(rep, "h0").status == "accepted"
    u = status(rep, "twin")
    assert u.status == "rejected" and "h0" in u.reason


def test_a_10kb_metric_name_is_rejected_before_it_reaches_the_record():
    evil = SiteResult("evil", upd(1.0, seed=3), 300, {"x" * 10_000: 0.5})
    u = status(engine().step(0, GLOBAL, honest(3) + [evil], []), "evil")
    assert u.status == "rejected" and "metric name" in u.reason and len(u.reason) < 200 and u.metrics == {}


def test_missing_and_refused_sites_are_recorded_and_too_few_stops_aggregation():
    sites = honest(1) + [SiteResult("tired", refused="privacy budget spent")]
    rep = engine().step(0, GLOBAL, sites, ["h0", "tired", "gone"])
    assert not rep.aggregated and "min_clients is 2" in rep.problem and rep.params is None
    assert {u.site: u.status for u in rep.updates} == {"h0": "accepted", "tired": "refused", "gone": "missing"}


def test_a_site_whose_set_up_failed_and_a_dropped_site_are_missing_with_their_reasons():
    sites = honest(2) + [SiteResult("broken", unavailable="FileNotFoundError: DICOM folder does not exist: /x")]
    rep = engine().step(
        0,
        GLOBAL,
        sites,
        ["h0", "h1", "broken", "dead"],
        missing_reasons={"dead": "NVFlare dropped the site", "skipped": "not sent this round"},
    )
    assert rep.aggregated and set(rep.aggregated_sites) == {"h0", "h1"}
    got = {u.site: (u.status, u.reason) for u in rep.updates}
    assert got["broken"] == ("missing", "set-up failed at the site: FileNotFoundError: DICOM folder does not exist: /x")
    assert got["dead"] == ("missing", "NVFlare dropped the site")
    assert got["skipped"] == ("missing", "not sent this round")  # named by the caller though not asked
    assert any("broken cannot take part: set-up failed" in msg for _, msg in rep.log)


def test_a_hostile_unavailable_claim_is_only_a_missing_site_with_a_bounded_reason():
    # A site may claim its set-up failed to skip a round: that is no more than not answering, and its text is capped.
    evil = SiteResult("evil", upd(9.0, seed=4), 300, unavailable="x" * 10_000)
    rep = engine().step(0, GLOBAL, honest(2) + [evil], ["h0", "h1", "evil"])
    u = status(rep, "evil")
    assert u.status == "missing" and len(u.reason) <= 520 and "evil" not in rep.aggregated_sites


def test_fedavg_keeps_the_weighted_mean_of_statistics_but_caps_counts():
    sites = [SiteResult("a", upd(0.0, var=1.0), 100), SiteResult("b", upd(1.0, var=3.0, seed=1), 100000)]
    rep = RoundEngine(RoundRules(aggregation="fedavg", min_clients=2)).step(0, GLOBAL, sites, [])
    np.testing.assert_allclose(rep.params["bn.running_var"], 2.0, rtol=1e-6)  # equal weights after the cap


# --- encrypted layers, real TenSEAL ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def he():
    from fedmed.security import ckks

    keys = ckks.generate_key_set()
    client = ckks.LoadedContext(ckks.ts.context_from(keys.client_context), keys.key_id, None)
    server = ckks.LoadedContext(ckks.ts.context_from(keys.server_context), keys.key_id, None)
    return client, server


def he_site(name, head_value, client, seed, scale=None):
    from fedmed.security import ckks

    p = upd(0.1, seed=seed)  # an honest clear part: only the encrypted head differs between sites
    head = {"head": np.full(5, head_value, np.float32)}
    ctx = client
    if scale is not None:
        ctx = ckks.LoadedContext(client.context.copy(), client.key_id, None)
        ctx.context.global_scale = scale
    return SiteResult(name, p, 300, {}, {}, ckks.encrypt_layers(head, ctx).to_wire())


def he_engine(server, aggregation="geometric_median"):
    from fedmed.server.rounds import EncryptionSpec

    return RoundEngine(
        RoundRules(aggregation=aggregation, min_clients=2), EncryptionSpec(server, ("head",), {"head": (5,)})
    )


def test_encrypted_block_at_another_scale_is_rejected_and_the_round_goes_on(he):
    from fedmed.security import ckks

    client, server = he
    sites = [he_site(f"h{i}", 1.0, client, i) for i in range(3)] + [he_site("evil", 1.0, client, 9, scale=2**30)]
    rep = he_engine(server).step(0, GLOBAL, sites, [])
    u = status(rep, "evil")
    assert u.status == "rejected" and "scale" in u.reason
    head = ckks.decrypt_layers(rep.encrypted, client)["head"]
    np.testing.assert_allclose(head, 1.0, atol=1e-3)


def test_rescaled_ciphertext_is_rejected(he):
    from fedmed.security import ckks

    client, server = he
    block = ckks.encrypt_layers({"head": np.ones(5)}, client)
    multiplied = ckks.ts.ckks_vector_from(client.context, block.chunks[0]) * 1.0  # consumes a level
    bad = ckks.EncryptedLayers(block.names, block.shapes, (multiplied.serialize(),), block.key_id)
    problem = ckks.find_encrypted_problem(bad.to_wire(), ("head",), {"head": (5,)}, server)
    assert problem and "level" in problem


def test_guarded_sum_leaves_out_a_block_that_fails_and_keeps_the_rest(he):
    from fedmed.security import ckks

    client, server = he
    good = [ckks.encrypt_layers({"head": np.full(5, float(i))}, client) for i in (1, 3)]
    other = ckks.LoadedContext(client.context.copy(), client.key_id, None)
    other.context.global_scale = 2**30
    bad = ckks.encrypt_layers({"head": np.full(5, 100.0)}, other)
    combined, failed = ckks.guarded_weighted_sum(
        {"a": good[0], "bad": bad, "b": good[1]}, {"a": 0.5, "bad": 0.2, "b": 0.5}, server
    )
    assert set(failed) == {"bad"}
    np.testing.assert_allclose(ckks.decrypt_layers(combined, client)["head"], 2.0, atol=1e-3)


def test_hospitals_refuse_a_global_head_one_site_scaled(he):
    from fedmed.security import ckks

    client, server = he
    sites = [he_site(f"h{i}", 0.1, client, i) for i in range(3)]
    scaled = he_site("evil", 0.1 * 1000, client, 9)  # the server cannot see that this head is 1000x
    rep = he_engine(server).step(0, GLOBAL, sites + [scaled], [])
    assert rep.aggregated and status(rep, "evil").status == "accepted"
    new_head = ckks.decrypt_layers(rep.encrypted, client)
    problem = ckks.find_global_head_problem(new_head, {"head": np.full(5, 0.1, np.float32)})
    assert problem and "scaled" in problem
    honest_head = ckks.decrypt_layers(he_engine(server).step(0, GLOBAL, sites, []).encrypted, client)
    assert ckks.find_global_head_problem(honest_head, {"head": np.full(5, 0.1, np.float32)}) is None


@pytest.mark.parametrize("aggregation", ["coordinate_median", "trimmed_mean"])
def test_non_linear_aggregators_are_refused_with_he(aggregation, he):
    with pytest.raises(ValueError, match="cannot be used with HE"):
        check_encryption_compatible(aggregation)
    with pytest.raises(ValueError, match="weighted sum"):
        he_engine(he[1], aggregation)


# --- the record ---------------------------------------------------------------------------------------------------


def test_capped_counts_and_trust_reach_the_database_and_come_back_for_the_next_job(tmp_path):
    from fedmed.store.journal import op_from_json, op_to_json
    from fedmed.store.repository import Repository, RoundRecord, TrustRecord

    eng = engine()
    rep = eng.step(0, GLOBAL, honest(3) + [SiteResult("evil", upd(-50.0), 30000)], [])
    trust = tuple(TrustRecord(s, t.trust, t.quarantined, t.good_streak) for s, t in eng.trust.items())
    record = RoundRecord(1, rep.updates, alerts=rep.alerts, trust=trust)
    record = op_from_json(op_to_json("record_round", {"run_uid": "u", "record": record}))[1]["record"]  # journal
    repo = Repository(f"sqlite:///{tmp_path / 'f.db'}")
    repo.start_run("u", "t", "job", "geometric_median", 1, {})
    repo.record_round("u", record)
    rows = {r["site"]: r for r in repo.client_updates(repo.latest_run_id())}
    assert rows["evil"]["num_samples"] == 30000 and rows["evil"]["weight_samples"] == 300
    loaded = repo.load_trust()
    assert loaded["evil"].quarantined and not loaded["h0"].quarantined
    assert RoundEngine(
        RoundRules(min_clients=2),
        trust={s: SiteTrust(t.trust, t.quarantined, t.good_streak) for s, t in loaded.items()},
    ).is_quarantined("evil")
    repo.close()


# --- signatures: the Controller's verifier through the wire module into the engine (real ML-DSA-65 + Ed25519) ---


def test_unsigned_forged_and_wrong_site_updates_are_rejected_and_the_signature_is_recorded(tmp_path):
    from nvflare.app_common.abstract.fl_model import FLModel

    from fedmed.flare import signatures as wire_sig
    from fedmed.flare.wire import to_site_result
    from fedmed.security import signing

    keys = {s: signing.load_site_keys(_keys(tmp_path, s)) for s in ("h0", "h1", "h2", "evil")}
    public = {s: k.public for s, k in keys.items() if s != "evil"}  # evil's key was never installed at the server

    def verify(result, site):
        if site not in public:
            raise ValueError(f"no public signing key installed for {site}")
        return wire_sig.verify_result(result, "job", 0, site, public[site])

    def model(site, seed, sign_as=None):
        m = FLModel(
            params=upd(1.0, seed=seed), metrics={"val_accuracy": 0.5}, meta={"num_samples": 300, "client_name": site}
        )
        if sign_as is not None:
            wire_sig.sign_result(m, "job", 0, sign_as, keys[sign_as])
        m.meta["client_name"] = site  # NVFlare sets it from the connection, after the site signed
        return m

    forged = model("h2", 2, sign_as="h2")
    forged.meta["num_samples"] = 30000  # changed after signing (a man in the middle, or a lying proxy)
    results = [
        model("h0", 0, "h0"),
        model("h1", 1, "h1"),
        forged,
        model("unsigned", 3),
        model("evil", 4, "evil"),
        model("h1x", 5, "h0"),
    ]
    rep = engine().step(0, GLOBAL, [to_site_result(r, verify) for r in results], [])
    by = {u.site: u for u in rep.updates}
    assert by["h0"].status == "accepted" and by["h0"].signature and len(by["h0"].signed_digest) == 64
    for site in ("h2", "unsigned", "evil", "h1x"):
        assert by[site].status == "rejected" and by[site].reason.startswith("signature:"), (site, by[site].reason)
    assert "public signing key" in by["evil"].reason


def test_a_verified_update_is_hashed_once_and_recorded_by_the_blake3_its_signature_covers(tmp_path, monkeypatch):
    """With signatures on, the BLAKE3 that verification took of the parameters (the stream the record holds, of the same
    arrays) is the one screening records: the round engine hashes no update bytes again. The bytes screening's hasher
    is fed are counted on the real blake3 hasher; without a verifier it hashes every update, to the same digests."""
    import blake3 as real
    from nvflare.app_common.abstract.fl_model import FLModel

    import fedmed.server.passes as passes
    from fedmed.flare import signatures as wire_sig
    from fedmed.flare.wire import to_site_result
    from fedmed.models.hashing import params_blake3
    from fedmed.security import signing

    keys = {s: signing.load_site_keys(_keys(tmp_path, s)) for s in ("h0", "h1", "h2")}
    fed = {"bytes": 0}

    class Counting:
        def __init__(self):
            self.h = real.blake3()

        def update(self, data):
            fed["bytes"] += memoryview(data).nbytes
            self.h.update(data)

        def hexdigest(self):
            return self.h.hexdigest()

    monkeypatch.setattr(passes, "blake3", type("blake3_module", (), {"blake3": Counting}))

    def models():
        out = []
        for i, site in enumerate(keys):
            m = FLModel(params=upd(1.0, seed=i), metrics={"val_accuracy": 0.5}, meta={"num_samples": 300})
            wire_sig.sign_result(m, "job", 0, site, keys[site])
            m.meta["client_name"] = site
            out.append(m)
        return out

    def verify(result, site):
        return wire_sig.verify_result(result, "job", 0, site, keys[site].public)

    received = [to_site_result(m, verify) for m in models()]
    assert all(r.params_blake3 == params_blake3(r.params) for r in received)
    signed = engine().step(0, GLOBAL, received, [])
    assert fed["bytes"] == 0
    unsigned = engine().step(0, GLOBAL, [to_site_result(m) for m in models()], [])
    assert fed["bytes"] >= 3 * sum(v.nbytes for v in upd(1.0, seed=0).values())
    for rep in (signed, unsigned):
        assert [(u.status, u.update_blake3, u.update_sha256) for u in rep.updates] == [
            ("accepted", r.params_blake3, None) for r in received
        ]


def _keys(tmp_path, site):
    from fedmed.security import signing

    local = tmp_path / site
    signing.generate_site_keys(local, site)
    return local


def test_a_federation_whose_sites_are_all_quarantined_recovers_through_probation_rounds():
    # Every site quarantined (say, by one bad release at every hospital, carried over from an earlier job): the
    # rounds are not aggregated, but every valid update is scored against their own robust aggregate, so after
    # readmit_after good rounds the sites are back and aggregation resumes.
    quarantined = {f"h{i}": SiteTrust(0.5, quarantined=True) for i in range(3)}
    eng = RoundEngine(RoundRules(min_clients=2), trust=quarantined)
    reports = [eng.step(r, GLOBAL, honest(3, start=10 * r), []) for r in range(3)]
    assert [r.aggregated for r in reports] == [False, False, True]
    assert reports[0].probation and "not aggregating" in reports[0].problem and reports[0].params is None
    assert all(u.status == "quarantined" and u.aggregation_weight == 0.0 for u in reports[0].updates)
    assert any(a.kind == "readmitted" for a in reports[1].alerts)
    assert not reports[2].probation and all(reports[2].weights[f"h{i}"] > 0 for i in range(3))


# -- the direction rule: a classifier moved against the coordinate median of the sites ---------------------------------

HEAD_GLOBAL = {
    **GLOBAL,
    "class_layers.out.weight": np.zeros((2, 4), np.float32),
    "class_layers.out.bias": np.zeros(2, np.float32),
}


def head_upd(direction, seed):
    """Body moved like every honest site; classifier moved along +direction with per-site noise."""
    rng = np.random.default_rng(seed)
    p = upd(1.0, seed=seed)
    p["w"] += rng.standard_normal(8).astype(np.float32)  # site-specific body moves dominate the distances
    p["class_layers.out.weight"] = (
        direction * 0.3 * np.linspace(0.5, 1.5, 8).reshape(2, 4) + 0.05 * rng.standard_normal((2, 4))
    ).astype(np.float32)
    p["class_layers.out.bias"] = (direction * 0.3 * np.ones(2) + 0.05 * rng.standard_normal(2)).astype(np.float32)
    return p


def test_a_site_whose_classifier_moves_against_the_aggregate_is_left_out_and_quarantined():
    # A label flipper: near the others in distance (the body dominates it), its classifier moving the other way.
    sites = [SiteResult(f"h{i}", head_upd(1.0, i), 300) for i in range(4)] + [
        SiteResult("flip", head_upd(-1.0, 9), 300)
    ]
    eng = engine()
    rep = eng.step(0, HEAD_GLOBAL, sites, [])
    u = status(rep, "flip")
    assert u.status == "rejected" and "classifier layers moved against the coordinate median" in u.reason
    assert rep.weights["flip"] == 0.0 and eng.is_quarantined("flip")
    assert all(status(rep, f"h{i}").status == "accepted" for i in range(4))
    assert float(rep.params["class_layers.out.bias"].mean()) > 0.2  # the honest direction
    assert any(a.site == "flip" and a.kind == "quarantined" for a in rep.alerts)


def test_honest_classifiers_that_disagree_somewhat_are_all_kept():
    # Non-IID sites: classifiers moving in partly different directions, none against the aggregate.
    rng = np.random.default_rng(3)
    sites = []
    for i in range(5):
        p = head_upd(1.0, i)
        p["class_layers.out.weight"] += (0.2 * rng.standard_normal((2, 4))).astype(np.float32)
        sites.append(SiteResult(f"h{i}", p, 300))
    rep = engine().step(0, HEAD_GLOBAL, sites, [])
    assert all(u.status == "accepted" for u in rep.updates), [(u.site, u.reason) for u in rep.updates]


def test_the_direction_rule_can_be_turned_off_and_skips_layers_the_server_cannot_read():
    sites = [SiteResult(f"h{i}", head_upd(1.0, i), 300) for i in range(4)] + [
        SiteResult("flip", head_upd(-1.0, 9), 300)
    ]
    assert status(engine(head_layers=()).step(0, HEAD_GLOBAL, sites, []), "flip").status == "accepted"
    # With the classifier encrypted it is not in the clear parameters: nothing to score it by.
    clear = [
        SiteResult(s.site, {k: v for k, v in s.params.items() if not k.startswith("class_layers")}, 300) for s in sites
    ]
    assert status(engine().step(0, GLOBAL, clear, []), "flip").status == "accepted"


def test_head_cosine_scores_between_the_bounds():
    from fedmed.server.robust.trust import round_scores

    policy = TrustPolicy()
    scores = round_scores({"a": 1.0, "b": 1.0, "c": 1.0}, policy, {"a": 0.2, "b": -0.25, "c": -0.7})
    assert scores["a"][1] == 1.0 and scores["b"][1] == pytest.approx(0.5) and scores["c"][1] == 0.0
    with pytest.raises(ValueError, match="head_cosine_bad"):
        TrustPolicy(head_cosine_ok=-0.6, head_cosine_bad=-0.5)


# -- colluding hospitals (issue 28): 3 honest, nearly orthogonal updates and 2 colluders at one common point ---------

BODY = 20_000  # coordinates of the body: enough for the sign rule (fedmed.server.robust.sign_balance.MIN_MOVED)
BIG_GLOBAL = {
    "body.w": np.zeros(BODY, np.float32),
    "class_layers.out.weight": np.zeros((2, 4), np.float32),
    "class_layers.out.bias": np.zeros(2, np.float32),
    "bn.running_mean": np.zeros(3, np.float32),
    "bn.running_var": np.ones(3, np.float32),
    "bn.num_batches_tracked": np.array(0, np.int64),
}


def honest_big(i, round_num=0):
    """An honest hospital: its own direction (nearly orthogonal to the others' in BODY dimensions, norm ~5, as the
    red team's hospitals are) plus per-round noise; its classifier moving roughly with the others'."""
    own = np.random.default_rng(100 + i).standard_normal(BODY) * 5.0 / np.sqrt(BODY)
    rng = np.random.default_rng([i, round_num])
    p = {k: v.copy() for k, v in BIG_GLOBAL.items()}
    p["body.w"] = (own + rng.standard_normal(BODY) / np.sqrt(BODY)).astype(np.float32)
    p["class_layers.out.weight"] = (0.5 + 0.3 * rng.standard_normal((2, 4))).astype(np.float32)
    p["class_layers.out.bias"] = (0.5 + 0.3 * rng.standard_normal(2)).astype(np.float32)
    p["bn.running_var"] = np.full(3, 1.0 + 0.01 * i, np.float32)
    p["bn.num_batches_tracked"] = np.array(10, np.int64)
    return p


def colluders(kind, factor, honest_params, noise=0.0, round_num=0):
    """Two colluders sending the crafted common point, each with its own BatchNorm statistics (what the issue's
    red team did) and, with noise, its own small per-round perturbation (norm `noise` x an honest update's)."""
    from fedmed.sim.attacks import Attack, craft_colluding

    point = craft_colluding(honest_params, BIG_GLOBAL, Attack(kind, factor), 2)
    out = []
    for j in range(2):
        p = {**honest_params[0], **point, "bn.running_var": np.full(3, 1.3 + 0.1 * j, np.float32)}
        if noise:
            e = np.random.default_rng([77, j, round_num]).standard_normal(BODY)
            p["body.w"] = (p["body.w"] + noise * 5.0 * e / np.linalg.norm(e)).astype(np.float32)
        out.append(SiteResult(f"c{j}", p, 300))
    return out


def collusion_round(eng, kind, factor, round_num=0, noise=0.0):
    hon = [honest_big(i, round_num) for i in range(3)]
    sites = [SiteResult(f"h{i}", p, 300) for i, p in enumerate(hon)] + colluders(kind, factor, hon, noise, round_num)
    return eng.step(round_num, BIG_GLOBAL, sites, [])


# The sign rule off (a balance difference is at most 2): for the tests of the rules it would pre-empt on the
# in-distribution attacks (near-copies, centred clipping), which must hold on their own.
SIGNS_OFF = TrustPolicy(sign_balance_ok=2.5, sign_balance_bad=3.0)

COLLUSION_ROWS = [
    ("alie", 0.0),  # the paper's z for 2 of 5 (0.84)
    ("alie", 1.0),
    ("min_max_unit", 0.0),  # the rows that captured the median in the issue
    ("min_sum_unit", 0.0),
    ("min_max_std", 0.0),
    ("min_sum_std", 0.0),
    ("ipm", 0.5),  # honest sites rejected, then quarantined, in the issue
    ("ipm", 100.0),
]


@pytest.mark.parametrize("kind,factor", COLLUSION_ROWS)
def test_two_colluders_neither_capture_the_aggregate_nor_get_an_honest_site_quarantined(kind, factor):
    eng = engine()
    for r in range(3):
        rep = collusion_round(eng, kind, factor, r)
        honest_w = [rep.weights.get(f"h{i}", 0.0) for i in range(3)]
        assert rep.aggregated and min(honest_w) > 0, (r, rep.weights, rep.problem)
        # Not captured: in the issue the pair held the median with weight 1.0. A pair that moved the classifier back
        # (IPM, the unit rows) is rejected, judged against the coordinate median; a pair inside the honest cloud
        # (ALIE, the std rows) by the sign rule (test_two_in_distribution_colluders_are_rejected_...).
        assert rep.weights["c0"] == rep.weights["c1"] == 0.0, rep.weights
        assert all(status(rep, f"h{i}").status == "accepted" for i in range(3)), [u.reason for u in rep.updates]
    assert not any(eng.is_quarantined(f"h{i}") for i in range(3))


@pytest.mark.parametrize("kind,factor", COLLUSION_ROWS)
def test_with_the_head_hidden_as_under_he_two_colluders_are_counted_once_and_honest_sites_kept(kind, factor):
    # HE hides the classifier from the server: no head direction rule. The copy test, the coordinate-median
    # reference, the distance, sign and body rules still hold the pair under half the weight and keep every honest
    # site; the rows that moved against the honest sites (unit directions, IPM 0.5) are rejected by the body rule
    # (the direction of the whole clear move), in the round they attack, and stay out.
    eng = engine(head_layers=())
    for r in range(3):
        rep = collusion_round(eng, kind, factor, r)
        assert rep.aggregated and rep.weights["c0"] + rep.weights["c1"] < 0.5, rep.weights
        assert all(status(rep, f"h{i}").status == "accepted" for i in range(3))
        if kind in ("min_max_unit", "min_sum_unit") or (kind, factor) == ("ipm", 0.5):
            assert rep.weights["c0"] == rep.weights["c1"] == 0.0, rep.weights
            want = "its clear layers moved against" if r == 0 else "quarantined"
            assert all(want in status(rep, c).reason for c in ("c0", "c1")), [u.reason for u in rep.updates]
    assert not any(eng.is_quarantined(f"h{i}") for i in range(3))


def test_the_body_cosine_is_the_cosine_of_the_clear_moves_and_its_rule_scores_between_the_bounds():
    from fedmed.server.aggregation import body_cosine
    from fedmed.server.robust.trust import round_scores

    rng = np.random.default_rng(3)
    u, j = rng.standard_normal(100), rng.standard_normal(100)
    want = float(u @ j / np.linalg.norm(u) / np.linalg.norm(j))
    got = body_cosine(float(np.linalg.norm(u)), float(np.linalg.norm(j)), float(np.linalg.norm(u - j)))
    assert got == pytest.approx(want, abs=1e-12)
    assert body_cosine(0.0, 1.0, 1.0) == 1.0  # a site that did not move: no evidence either way
    policy = TrustPolicy(body_cosine_ok=0.0, body_cosine_bad=-0.4)
    scores = round_scores({"a": 1.0, "b": 1.0, "c": 1.0}, policy, body_cosines={"a": 0.3, "b": -0.2, "c": -0.5})
    assert scores["a"][1] == 1.0 and scores["b"][1] == pytest.approx(0.5) and scores["c"][1] == 0.0
    with pytest.raises(ValueError, match="body_cosine_bad"):
        TrustPolicy(body_cosine_ok=-0.5, body_cosine_bad=-0.3)
    TrustPolicy(body_cosine_bad=-2.0)  # below -1: the rule off


def test_the_body_rule_scores_only_where_the_head_is_hidden_unless_asked_always():
    # With the classifier in clear the head rule judges direction; the body cosines are still logged (the red team
    # calibrates on them) but not scored, unless TrustPolicy.body_cosine_always.
    rep = collusion_round(engine(trust=replace(SIGNS_OFF, head_cosine_bad=-1.0, head_cosine_ok=-0.99)), "ipm", 0.5)
    assert status(rep, "c0").status == "accepted"
    assert any("body cosine" in m for _, m in rep.log)
    policy = replace(SIGNS_OFF, head_cosine_bad=-1.0, head_cosine_ok=-0.99, body_cosine_always=True)
    rep = collusion_round(engine(trust=policy), "ipm", 0.5)
    assert "its clear layers moved against" in status(rep, "c0").reason
    assert all(status(rep, f"h{i}").status == "accepted" for i in range(3))


def test_near_copies_share_one_weight_with_the_reason_and_an_alert():
    # Same trainable parameters, different BatchNorm statistics: no hash matches, the pair is still a copy.
    rep = collusion_round(engine(trust=SIGNS_OFF), "alie", 1.0)
    for c in ("c0", "c1"):
        u = status(rep, c)
        assert "near-copy of" in u.reason and "counted once" in u.reason, u.reason
        assert u.weight_samples == 150  # 300 each, counted once together
        assert any(a.site == c and a.kind == "collusion" for a in rep.alerts)
    # Honest hospitals, nearly orthogonal, are never grouped.
    assert all("near-copy" not in (status(rep, f"h{i}").reason or "") for i in range(3))
    # A pair rejected for what it sent keeps that reason in its record; the collusion is in the alerts.
    rep = collusion_round(engine(), "ipm", 0.5)
    assert {a.site for a in rep.alerts if a.kind == "collusion"} == {"c0", "c1"}


def test_a_near_copy_with_tiny_noise_is_still_a_copy():
    rep = collusion_round(engine(trust=SIGNS_OFF), "alie", 1.0, noise=0.01)
    assert "near-copy of c1" in status(rep, "c0").reason


def test_colluders_that_add_noise_each_round_are_found_from_their_summed_moves():
    # Per-round noise of 0.15 x an honest update keeps the pair above the per-round threshold (0.1 x the median
    # nearest-neighbour distance); summed over rounds the noise averages out and the common point adds up.
    eng = engine(trust=SIGNS_OFF)
    first = collusion_round(eng, "alie", 1.0, 0, noise=0.15)
    assert "near-copy" not in (status(first, "c0").reason or "")
    reasons = [status(collusion_round(eng, "alie", 1.0, r, noise=0.15), "c0").reason or "" for r in range(1, 4)]
    assert any("summed over the rounds so far" in why for why in reasons), reasons


def test_the_judging_reference_stays_in_the_honest_range_whatever_two_of_five_send():
    from fedmed.server.robust.collusion import coordinate_median_reference

    rng = np.random.default_rng(0)
    honest_ups = [{"w": rng.standard_normal(50)} for _ in range(3)]
    lo, hi = np.min([u["w"] for u in honest_ups], axis=0), np.max([u["w"] for u in honest_ups], axis=0)
    for evil in (1e6, -1e6, 0.0):  # far, far the other way, and at a common point inside the cloud
        ups = honest_ups + [{"w": np.full(50, evil)}, {"w": np.full(50, evil) + rng.standard_normal(50)}]
        ref = coordinate_median_reference(ups, ["w"])["w"]
        assert np.all(ref >= lo - 1e-12) and np.all(ref <= hi + 1e-12)


def test_colluders_dodging_the_copy_test_are_still_judged_against_an_honest_reference():
    # Enough noise (0.5 x an honest update) that the pair is no near-copy: the direction rule, judged against the
    # coordinate median rather than the aggregate the pair pulls on, rejects the colluders and keeps every honest site.
    eng = engine()
    rep = collusion_round(eng, "ipm", 0.5, noise=0.5)
    assert "near-copy" not in (status(rep, "c0").reason or "")
    assert all(status(rep, f"h{i}").status == "accepted" for i in range(3))
    assert {status(rep, c).status for c in ("c0", "c1")} == {"rejected"}
    assert "classifier layers moved against the coordinate median" in status(rep, "c0").reason


def test_a_round_whose_rules_would_turn_on_half_of_the_sites_is_not_committed():
    # Three hospitals whose classifiers each raise their own class and lower the others (a strongly non-IID
    # federation): the coordinate median lowers every class, and the direction rule would find all three moving
    # against it. Rejecting all three is no minority verdict: the round is held, no model, nobody's trust changes,
    # and an alert names the suspicion.
    glob = {"w": np.zeros(8, np.float32), "class_layers.out.bias": np.zeros(3, np.float32)}
    sites = []
    for i in range(3):
        bias = np.full(3, -1.0, np.float32)
        bias[i] = 30.0
        w = (0.1 * np.random.default_rng(i).standard_normal(8)).astype(np.float32)
        sites.append(SiteResult(f"h{i}", {"w": w, "class_layers.out.bias": bias}, 300))
    eng = engine()
    rep = eng.step(0, glob, sites, [])
    assert not rep.aggregated and rep.probation and rep.params is None
    assert "not committed" in rep.problem and "half or more" in rep.problem
    assert {a.site for a in rep.alerts if a.kind == "suspicion"} == {"h0", "h1", "h2"}
    assert eng.trust == {}  # nobody scored, nobody quarantined
    assert all(u.aggregation_weight == 0.0 and "not committed" in u.reason for u in rep.updates)
    # One far site of five is a minority verdict: committed, and that site quarantined.
    far = {**honest_big(5), "body.w": np.full(BODY, 40.0, np.float32)}
    five = [SiteResult(f"h{i}", honest_big(i), 300) for i in range(4)] + [SiteResult("c0", far, 300)]
    eng = engine()
    rep = eng.step(0, BIG_GLOBAL, five, [])
    assert rep.aggregated and status(rep, "c0").status == "rejected" and eng.is_quarantined("c0")


# -- centred clipping around the server's momentum (Karimireddy, He and Jaggi 2021) ----------------------------------


def one_central_attacker_round(eng, round_num):
    """Four honest hospitals and one omniscient ALIE site (z=1): inside the honest cloud, near its centre."""
    from fedmed.sim.attacks import Attack, craft_colluding

    hon = [honest_big(i, round_num) for i in range(4)]
    evil = {**hon[0], **craft_colluding(hon, BIG_GLOBAL, Attack("alie", 1.0), 1)}
    sites = [SiteResult(f"h{i}", p, 300) for i, p in enumerate(hon)] + [SiteResult("alie", evil, 300)]
    return eng.step(round_num, BIG_GLOBAL, sites, [])


def test_centred_clipping_gives_a_central_attacker_no_more_than_its_count_share():
    # The geometric median rewards the site nearest the centre (Weiszfeld weight ~ 1 / distance): the issue's
    # one-site ALIE got ~2/3. Clipped around the momentum, each site pulls at most its share of the radius.
    # The sign rule off: it rejects this site outright (test_the_sign_rule_...), and clipping must hold on its own.
    median_w = [one_central_attacker_round(engine(trust=SIGNS_OFF), r).weights["alie"] for r in range(3)]
    eng = engine(centred_clipping=True, trust=SIGNS_OFF)
    reps = [one_central_attacker_round(eng, r) for r in range(3)]
    assert min(median_w) > 0.25, median_w
    # Its count share is 0.2; sites clipped in one iteration can leave it a little more in the next.
    assert all(r.weights["alie"] <= 0.22 for r in reps), [r.weights for r in reps]
    assert all(r.diagnostics["centred_clipping"]["radius"] > 0 for r in reps)
    assert all(status(r, f"h{i}").status == "accepted" for r in reps for i in range(4))


def test_centred_clipping_on_honest_sites_stays_near_the_geometric_median():
    # Its cost on an honest round: the clipped combination lands within a fraction of the honest spread of the
    # geometric median (both near the centre of the honest sites).
    sites = [SiteResult(f"h{i}", honest_big(i), 300) for i in range(5)]
    gm = engine().step(0, BIG_GLOBAL, sites, []).params["body.w"]
    cc = engine(centred_clipping=True).step(0, BIG_GLOBAL, sites, []).params["body.w"]
    spread = np.median([np.linalg.norm(s.params["body.w"] - gm) for s in sites])
    assert np.linalg.norm(cc - gm) < 0.25 * spread, (np.linalg.norm(cc - gm), spread)


def test_centred_clipping_is_refused_with_he():
    from fedmed.server.rounds import EncryptionSpec

    with pytest.raises(ValueError, match="centred_clipping cannot be used with HE"):
        RoundEngine(RoundRules(min_clients=2, centred_clipping=True), EncryptionSpec(None, (), {}))


# -- the sign rule (fedmed.server.robust.sign_balance): in-distribution attacks shift every coordinate the same way ---------

IN_DISTRIBUTION = [("alie", 0.0), ("alie", 1.0), ("min_max_std", 0.0), ("min_sum_std", 0.0)]


@pytest.mark.parametrize("head_layers", [("class_layers.out.",), ()], ids=["clear", "head-hidden-as-under-HE"])
@pytest.mark.parametrize("kind,factor", IN_DISTRIBUTION)
def test_two_in_distribution_colluders_are_rejected_every_round_by_the_sign_rule(kind, factor, head_layers):
    # Before the sign rule these pairs sat inside the honest cloud and were accepted (issue 28: -0.026 to -0.037
    # AUROC). Their common shift is -gamma * std, down in nearly every coordinate: rejected with the reason, in
    # every round, with the classifier visible or hidden, and no honest hospital ever scored down.
    eng = engine(head_layers=head_layers)
    for r in range(3):
        rep = collusion_round(eng, kind, factor, r)
        assert rep.aggregated and rep.weights["c0"] == rep.weights["c1"] == 0.0, (r, rep.weights)
        for c in ("c0", "c1"):
            u = status(rep, c)
            assert u.status in ("rejected", "quarantined"), u
            if r == 0:  # rejected for its signs, then kept out by quarantine
                assert u.status == "rejected" and "signs are skewed" in u.reason, u.reason
        assert all(status(rep, f"h{i}").status == "accepted" for i in range(3)), [u.reason for u in rep.updates]
        assert all(status(rep, f"h{i}").round_score == 1.0 for i in range(3))
    assert not any(eng.is_quarantined(f"h{i}") for i in range(3))
    assert eng.is_quarantined("c0") and eng.is_quarantined("c1")


def test_one_central_alie_site_at_the_papers_z_is_rejected_by_the_sign_rule():
    # The worst single site: ALIE at the paper's z for 1 of 5 (0.25) became the geometric median (weight
    # 1.0). Its shift is the smallest of the in-distribution rows, and still lowers most coordinates.
    from fedmed.sim.attacks import Attack, craft_colluding

    hon = [honest_big(i) for i in range(4)]
    evil = {**hon[0], **craft_colluding(hon, BIG_GLOBAL, Attack("alie", 0.0), 1)}
    sites = [SiteResult(f"h{i}", p, 300) for i, p in enumerate(hon)] + [SiteResult("alie", evil, 300)]
    without = engine(trust=SIGNS_OFF).step(0, BIG_GLOBAL, sites, [])
    assert without.weights["alie"] > 0.25  # what the geometric median alone gives it
    eng = engine()
    rep = eng.step(0, BIG_GLOBAL, sites, [])
    assert rep.weights["alie"] == 0.0 and "signs are skewed" in status(rep, "alie").reason
    assert eng.is_quarantined("alie") and all(status(rep, f"h{i}").status == "accepted" for i in range(4))


def test_a_sign_bias_every_honest_site_shares_is_not_held_against_any():
    # Weight decay (or any common drift) can push every honest move down in most coordinates: the rule scores the
    # distance to the median site's balance, so a shared bias cancels.
    sites = []
    for i in range(5):
        p = honest_big(i)
        p["body.w"] = (p["body.w"] - 0.1).astype(np.float32)  # every site: most coordinates down
        sites.append(SiteResult(f"h{i}", p, 300))
    eng = engine()
    rep = eng.step(0, BIG_GLOBAL, sites, [])
    assert all(u.status == "accepted" and u.round_score == 1.0 for u in rep.updates), [u.reason for u in rep.updates]
    assert any("sign balance -0.0" in m or "sign balance +0.0" in m for _, m in rep.log), rep.log


def test_sign_balance_counts_exactly_and_needs_enough_moved_coordinates():
    from fedmed.server.robust.sign_balance import MIN_MOVED, balance_offsets, sign_balance

    start = {"a": np.zeros(6, np.float32), "b": np.zeros((2, 2), np.float32)}
    upd_ = {"a": np.array([1, -1, 0, 2, 3, 0], np.float32), "b": np.array([[1, 0], [-5, 0]], np.float32)}
    assert sign_balance(upd_, start, ["a", "b"]) == (pytest.approx((4 - 2) / 6), 6)
    assert sign_balance(start, start, ["a"]) == (0.0, 0)
    many = {"x": (0.0, MIN_MOVED), "y": (0.5, MIN_MOVED), "z": (-0.05, MIN_MOVED)}
    assert balance_offsets(many) == pytest.approx({"x": 0.0, "y": 0.5, "z": -0.05})
    # A toy model's balance is noise (1 / sqrt(n)): the rule stays off.
    assert balance_offsets({s: (b, MIN_MOVED - 1) for s, (b, _) in many.items()}) == {}


def test_sign_rule_thresholds_score_between_the_bounds_and_are_checked():
    from fedmed.server.robust.trust import round_scores

    policy = TrustPolicy()
    scores = round_scores({"a": 1.0, "b": 1.0, "c": 1.0}, policy, None, {"a": 0.05, "b": -0.15, "c": 0.3})
    assert scores["a"][1] == 1.0 and scores["b"][1] == pytest.approx(0.5) and scores["c"][1] == 0.0
    with pytest.raises(ValueError, match="sign_balance_ok < sign_balance_bad"):
        TrustPolicy(sign_balance_ok=0.3, sign_balance_bad=0.2)


def test_screening_by_one_pass_gives_find_problem_s_reason_for_every_kind_of_bad_update():
    # RoundEngine screens an update of the right names and shapes by one pass (fedmed.server.passes.update_pass);
    # its verdict must be find_problem's, in find_problem's order, whatever else is wrong with the update.
    nan_w = upd(1.0, seed=1)
    nan_w["w"][2] = np.nan
    nan_and_metric = upd(1.0, seed=2)
    nan_and_metric["bn.running_mean"] = np.array([0, np.inf, 0], np.float32)
    shape_after_nan = {**upd(1.0, seed=3), "w": np.full(8, np.nan, np.float32), "bn.running_var": np.ones(4)}
    objects = {**upd(1.0, seed=4), "bn.running_mean": np.array([0, 0, 0], object)}
    sites = [
        SiteResult("nan", nan_w, 300),
        SiteResult("nan_metric", nan_and_metric, 300, {"x" * 100: 1.0}),
        SiteResult("shape", shape_after_nan, 300),
        SiteResult("bad_var", upd(1.0, seed=5, **{"bn.running_var": np.full(3, -1.0, np.float32)}), 300),
        SiteResult("objects", objects, 300, {"y" * 100: 1.0}),
        *honest(3),
    ]
    eng = engine()
    expected = {r.site: eng.find_problem(r, GLOBAL) for r in sites}
    rep = eng.step(0, GLOBAL, sites, [])
    for r in sites:
        u = status(rep, r.site)
        assert (u.reason if expected[r.site] else u.status) == (expected[r.site] or "accepted"), r.site
    assert expected["nan"] == "parameter w: contains NaN or Inf"
    assert expected["nan_metric"] == "parameter bn.running_mean: contains NaN or Inf"
    assert expected["shape"] == "parameter w: contains NaN or Inf"  # the NaN comes first in the model's order
    assert "variance must be > 0" in expected["bad_var"]
    assert expected["objects"].startswith("parameter bn.running_mean: dtype object is not a real number type")


def test_a_round_is_the_same_whether_screening_s_pass_or_the_rules_read_the_signs_and_sketches(monkeypatch):
    # The sign rule's counts and the near-copy sketches come from screening's one pass (issue 30); reading them in
    # passes of their own, as before, must give the very same round: weights, distances, scores, reasons, logs.
    import fedmed.server.rounds as rounds
    from fedmed.sim.attacks import Attack, craft_colluding

    def play():
        reports = []
        eng = engine()
        for r in range(2):  # two rounds: the summed-moves test reads the history the sketches built
            hon = [honest_big(i, r) for i in range(4)]
            evil = {**hon[0], **craft_colluding(hon, BIG_GLOBAL, Attack("alie", 0.0), 1)}
            copy = {k: v.copy() for k, v in hon[1].items()}
            copy["body.w"] = copy["body.w"] + np.float32(1e-4)  # a near-copy of h1
            sites = [SiteResult(f"h{i}", p, 300) for i, p in enumerate(hon)]
            sites += [SiteResult("alie", evil, 300), SiteResult("copy", copy, 300)]
            reports.append(eng.step(r, BIG_GLOBAL, sites, []))
        return reports

    fused = play()
    monkeypatch.setattr(rounds, "_names_shapes_match", lambda params, reference: False)  # the walk, no extras
    separate = play()
    for a, b in zip(fused, separate):
        assert a.updates == b.updates and a.log == b.log and a.alerts == b.alerts and a.weights == b.weights
        assert all(np.array_equal(a.params[k], b.params[k]) for k in a.params)
    assert any("signs are skewed" in u.reason for u in fused[0].updates if u.reason)
    assert any(al.kind == "collusion" for al in fused[0].alerts)


# -- the adaptive attacker that knows the sign rule (fedmed.sim.attacks.sign_balanced_move) ---------------------------


@pytest.mark.parametrize("kind", ["alie_balanced", "min_max_balanced"])
def test_two_sign_balanced_colluders_pass_the_sign_rule_but_stay_a_counted_once_minority(kind):
    # They balance their shift's signs to the median honest site's, so the sign rule cannot see them (what
    # docs/THREAT_MODEL.md says it does not hold); the copy test still counts the pair once and the coordinate-median
    # reference keeps every honest hospital. What they cost in AUROC is measured at full size
    # (docs/redteam_collusion.md).
    from fedmed.sim.attacks import Attack, craft_colluding

    hon = [honest_big(i) for i in range(3)]
    point = craft_colluding(hon, BIG_GLOBAL, Attack(kind), 2)
    move = point["body.w"].astype(np.float64)
    mean = np.mean([h["body.w"] for h in hon], axis=0, dtype=np.float64)
    assert float(move @ mean) < 0  # harmful: against the honest mean's direction

    eng = engine()
    for r in range(3):
        rep = collusion_round(eng, kind, 0.0, r)
        offsets = {
            s: float(m.split("sign balance ")[1][:6])
            for _, m in rep.log
            if "sign balance" in m
            for s in [m.split()[1][:-1]]
        }
        assert abs(offsets["c0"]) < TrustPolicy.sign_balance_ok, offsets  # the sign rule does not see it
        assert rep.aggregated and 0 < rep.weights["c0"] + rep.weights["c1"] < 0.5, rep.weights
        for c in ("c0", "c1"):
            assert "near-copy of" in status(rep, c).reason and status(rep, c).weight_samples == 150
        assert all(status(rep, f"h{i}").status == "accepted" for i in range(3)), [u.reason for u in rep.updates]
    assert not any(eng.is_quarantined(s) for s in ("h0", "h1", "h2", "c0", "c1"))


def test_vote_cap_hands_the_excess_to_the_others_until_none_is_over():
    from fedmed.server.aggregation import cap_vote_weights

    w = cap_vote_weights([0.96, 0.01, 0.01, 0.01, 0.01], [1, 1, 1, 1, 1], 2.0)
    np.testing.assert_allclose(w, [0.4, 0.15, 0.15, 0.15, 0.15])
    # Water-filling: a site lifted over its cap by the hand-out is capped in turn.
    w = cap_vote_weights([0.7, 0.28, 0.01, 0.01], [1, 1, 1, 1], 1.5)
    assert w.sum() == pytest.approx(1.0) and np.all(w <= 0.375 + 1e-12), w
    np.testing.assert_allclose(cap_vote_weights([0.3, 0.3, 0.4], [1, 1, 1], 2.0), [0.3, 0.3, 0.4])  # none over
    with pytest.raises(ValueError, match="multiple must be >= 1"):
        cap_vote_weights([0.5, 0.5], [1, 1], 0.5)
    with pytest.raises(ValueError, match="vote_share_cap"):
        TrustPolicy(vote_share_cap=0.9)


def test_with_the_vote_cap_a_central_site_gets_no_more_than_its_multiple_of_the_count_share():
    # A site at the honest sites' mean (what the adaptive ALIE hospital nearly is) is the geometric median's
    # favourite: nearly all the weight. Capped at 2x its count share (5 equal counts: 0.4), the rest to the others.
    hon = [honest_big(i) for i in range(4)]
    centre = {**hon[0], "body.w": np.mean([p["body.w"] for p in hon], axis=0).astype(np.float32)}
    sites = [SiteResult(f"h{i}", p, 300) for i, p in enumerate(hon)] + [SiteResult("centre", centre, 300)]
    free = engine().step(0, BIG_GLOBAL, sites, [])
    assert free.weights["centre"] > 0.9, free.weights
    rep = engine(trust=TrustPolicy(vote_share_cap=2.0)).step(0, BIG_GLOBAL, sites, [])
    assert rep.weights["centre"] == pytest.approx(0.4) and all(rep.weights[f"h{i}"] > 0.1 for i in range(4))
    want = sum(rep.weights[s.site] * s.params["body.w"].astype(np.float64) for s in sites)
    np.testing.assert_allclose(rep.params["body.w"], want, atol=1e-6)
    assert "vote_cap" in rep.diagnostics
