"""The published colluding attacks (issue 28) on tiny hospitals, by one and by two hospitals of five, played through
the round engine (fedmed.sim.inprocess) and recorded in SQLite as fedmed.cli.redteam_collusion does at full size.
Here each test checks what the server did and what the database holds; the AUROC comparison needs the full-size run
(docs/redteam_collusion.md). Its own file (not test_redteam.py's) so the test runner's per-file split puts it beside,
not after, the single-hospital attacks."""

from dataclasses import replace

import pytest

from fedmed.sim import redteam

COLLUSION_ROWS = {r.name: r for r in redteam.COLLUSION_ROWS}
IN_DISTRIBUTION = ("alie", "min_max_std", "min_sum_std")  # the colluding kinds the sign rule rejects


def test_every_colluding_attack_has_a_row_with_one_and_with_two_colluders():
    kinds = {(r.attack.kind, r.attack.factor, r.colluders) for r in redteam.COLLUSION_ROWS}
    for kind, factor in [("alie", 0.0), ("alie", 1.0), ("ipm", 0.5), ("ipm", 100.0), ("alie_balanced", 0.0)] + [
        (k, 1.0) for k in ("min_max_unit", "min_max_std", "min_sum_unit", "min_sum_std", "min_max_balanced")
    ]:
        assert {(kind, factor, 1), (kind, factor, 2)} <= kinds, (kind, factor)
    assert redteam.colluder_sites(
        redteam.COLLUSION_ROWS[-1], ["honest-0", "honest-1", "honest-2", "honest-3", "hostile"]
    ) == [
        "hostile",
        "honest-3",
    ]


@pytest.mark.parametrize("name", [r.name for r in redteam.COLLUSION_ROWS if r.colluders == 2])
def test_two_colluders_never_get_an_honest_hospital_quarantined_nor_hold_the_aggregate(
    name, redteam_hospitals5, tmp_path
):
    # Two rounds, the colluders attacking from the first with full knowledge of the honest updates. The AUROC
    # needs the full-size run (docs/redteam.md); here: no honest site quarantined, the pair never more than half
    # the aggregate (the capture gave it 1.0), and a rejection always with its reason.
    train, test = redteam_hospitals5
    res = redteam.run_row(COLLUSION_ROWS[name], redteam.Bench(train, test, 2, batch_size=4), 0.5, tmp_path)
    assert res.honest_quarantined == (), res
    assert res.max_weight_share is not None and res.max_weight_share < 0.5, res
    for r in res.server_did.split("; "):
        assert all("(" in part for part in r.split(" / ") if " rejected" in part), r
    if COLLUSION_ROWS[name].attack.kind in IN_DISTRIBUTION:
        # Accepted before the sign rule (issue 28); now rejected for their signs, then quarantined.
        assert res.held and res.how.startswith("rejected"), res
        assert res.server_did.split("; ")[0].count("signs are skewed") == 2, res.server_did


@pytest.mark.parametrize(
    "name",
    [
        r.name
        for r in redteam.COLLUSION_ROWS
        # ALIE at the paper's z (it became the geometric median) and Min-Max's shift; the other lone in-distribution
        # rows differ only in their factor (test_rounds.py plays all four on synthetic updates, in a second).
        if r.colluders == 1 and (r.attack.kind, r.attack.factor) in {("alie", 0.0), ("min_max_std", 1.0)}
    ],
)
def test_one_in_distribution_attacker_is_rejected_for_its_signs_every_round(name, redteam_hospitals5, tmp_path):
    # One hostile site of five: before the sign rule ALIE at the paper's z (0.25) became the geometric median.
    train, test = redteam_hospitals5
    res = redteam.run_row(COLLUSION_ROWS[name], redteam.Bench(train, test, 2, batch_size=4), 0.5, tmp_path)
    assert res.honest_quarantined == () and res.held and res.how.startswith("rejected"), res
    assert "signs are skewed" in res.server_did.split("; ")[0], res.server_did


@pytest.mark.parametrize("kind,factor", [("min_max_unit", 1.0), ("ipm", 0.5)])
def test_with_he_on_the_body_rule_rejects_a_pair_moving_against_the_honest_sites(
    kind, factor, redteam_hospitals5, tmp_path
):
    # The classifier encrypted (real TenSEAL), so the head's direction cannot be read: the pair's crafted clear body,
    # moved against the coordinate median's, is rejected by the body rule with the reason, every attacked round.
    train, test = redteam_hospitals5
    row = next(
        r for r in redteam.COLLUSION_ROWS if (r.attack.kind, r.attack.factor) == (kind, factor) and r.colluders == 2
    )
    res = redteam.run_row(replace(row, he=True), redteam.Bench(train, test, 2, batch_size=4), 0.5, tmp_path)
    assert res.honest_quarantined == () and res.held and res.how.startswith("rejected"), res
    assert "clear layers moved against" in res.server_did.split("; ")[0], res.server_did


def test_centred_clipping_runs_the_colluding_rows_through_the_bench(redteam_hospitals5, tmp_path):
    # The opt-in time-coupled defence on the in-distribution attack it is for (omniscient ALIE, 2 of 5): played
    # end to end with RoundRules.centred_clipping on, no honest site quarantined and the pair under half the weight.
    # Its AUROC effect needs the full-size run (docs/redteam_collusion.md).
    train, test = redteam_hospitals5
    row = next(
        r for r in redteam.COLLUSION_ROWS if r.attack.kind == "alie" and r.attack.factor == 0.0 and r.colluders == 2
    )
    bench = redteam.Bench(train, test, 2, batch_size=4, centred_clipping=True)
    assert bench.plan(0).centred_clipping and not redteam.Bench(train, test, 2).plan(0).centred_clipping
    res = redteam.run_row(row, bench, 0.5, tmp_path)
    assert res.honest_quarantined == () and res.max_weight_share is not None and res.max_weight_share < 0.5, res


def test_the_adaptive_pair_balances_its_signs_past_the_sign_rule_and_is_counted_once(redteam_hospitals5):
    # The attacker that knows the sign rule (fedmed.sim.attacks.sign_balanced_move), through the very function the
    # full-size red team runs (fedmed.cli.redteam_collusion.play, JSON as recorded): in every attacked round its
    # sign balance sits within TrustPolicy.sign_balance_ok of the median site's (the rule cannot see it), the pair is
    # counted once (near-copies) and holds under half the weight, and no honest hospital is quarantined. Its AUROC
    # cost is measured at full size (docs/redteam_collusion.md).
    from fedmed.cli import redteam_collusion as rc
    from fedmed.server.robust.trust import TrustPolicy

    row = COLLUSION_ROWS["adaptive ALIE, paper's z, sign-balanced (2 colluding sites)"]
    tiny = {**rc.SIZE, "rounds": 3, "batch_size": 4}
    run = rc.play(redteam_hospitals5, row, 0, "gm", tiny)
    assert run["hostile"] == ["honest-3", "hostile"] and rc.honest_quarantined(run) == [], run["rounds"]
    attacked = rc.attacked_rounds(run)
    assert len(attacked) == 2
    for rd in attacked:
        for s in run["hostile"]:
            assert abs(rd["sites"][s]["sign_balance"]) < TrustPolicy.sign_balance_ok, rd["sites"]
            assert "near-copy of" in (rd["updates"][s]["reason"] or ""), rd["updates"][s]
        assert sum(rd["weights"][s] for s in run["hostile"]) < 0.5, rd["weights"]
    # The body rule's statistic is logged with the head in clear too (not scored there), and read into the JSON.
    assert all(-1 <= v["body_cosine"] <= 1 for rd in run["rounds"] for v in rd["sites"].values()), run["rounds"]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--rounds", "1"], "--rounds must be at least 2"),
        (["--per-site", "0"], "--per-site must be at least 1"),
        (["--remeasure", "gm-honest-s0", "gm-honest-s9"], "no such run ['gm-honest-s9']"),
    ],
)
def test_a_larger_federation_that_cannot_hold_the_attack_is_refused_with_the_reason(args, message, tmp_path, capsys):
    from fedmed.cli import redteam_collusion as rc

    with pytest.raises(SystemExit):
        rc.main(["--runs", str(tmp_path), *args])
    assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing measured, nothing written
