"""The red-team suite on tiny hospitals: each attack one hostile hospital can make is a test, played through the
round engine (fedmed.sim.inprocess) and recorded in a real SQLite database, as scripts/redteam.py does at full size.
The AUROC comparison needs the full-size run (docs/redteam.md); here each test checks what the server did and what
the database holds."""

import pytest

from fedmed.sim import redteam

ROWS = {r.attack.kind: r for r in redteam.ROWS if r.colluders == 1 and not r.attack.omniscient}
# Every round the attacker is rejected or quarantined, with a reason in the database.
BLOCKED_EVERY_ROUND = {
    "sign_flip": "far outlier",
    "scale": "far outlier",
    "nan": "NaN",
    "bn_poison": "running_var",
    "long_metric": "metric name",
    "he_other_scale": "scale",
    "copy_site": "identical to the update",
    "gaussian_noise": "far outlier",
}


def play(kind, redteam_hospitals, tmp_path):
    train, test = redteam_hospitals
    return redteam.run_row(ROWS[kind], redteam.Bench(train, test, 2, batch_size=4), 0.5, tmp_path)


def test_every_attack_the_issue_names_has_a_row():
    assert set(ROWS) == {
        "sign_flip",
        "scale",
        "gaussian_noise",
        "label_flip",
        "nan",
        "little_is_enough",
        "inflate_count",
        "bn_poison",
        "he_scale",
        "he_other_scale",
        "long_metric",
        "replay",
        "copy_site",
    }


@pytest.mark.parametrize("kind", sorted(BLOCKED_EVERY_ROUND))
def test_attack_is_rejected_every_round_with_the_reason_recorded(kind, redteam_hospitals, tmp_path):
    res = play(kind, redteam_hospitals, tmp_path)
    assert res.held and res.how.startswith("rejected"), res
    rounds = res.server_did.split("; ")
    assert len(rounds) == 2 and all(" rejected" in r or " quarantined" in r for r in rounds), res.server_did
    assert BLOCKED_EVERY_ROUND[kind] in rounds[0], res.server_did
    assert "alert" in res.database and res.database.startswith("r1 rejected"), res.database


def test_inflated_count_weighs_no_more_than_an_honest_site(redteam_hospitals, tmp_path):
    res = play("inflate_count", redteam_hospitals, tmp_path)
    assert res.max_count_ratio == 1.0, res  # the x100 claim counted as an honest site's
    assert res.max_weight_ratio is not None and res.max_weight_ratio <= 1.0 + redteam.WEIGHT_SLACK, res
    assert res.server_did == "r1 accepted; r2 accepted"  # its update is honest: only its claim is hostile


def test_replay_is_rejected_from_the_second_round(redteam_hospitals, tmp_path):
    res = play("replay", redteam_hospitals, tmp_path)
    r1, r2 = res.server_did.split("; ")[:2]
    assert r1.startswith("r1 accepted") and r2.startswith("r2 rejected") and "replay" in r2
    assert res.held and res.how.startswith("rejected")


def test_scaled_encrypted_head_is_refused_by_every_hospital(redteam_hospitals, tmp_path):
    res = play("he_scale", redteam_hospitals, tmp_path)
    # The server cannot see the head: round 1 aggregates it. Every hospital then refuses the decrypted global head.
    assert res.server_did.startswith("r1 accepted"), res.server_did
    assert "hospital refusal" in res.database and "run stopped" in res.server_did
    assert res.held and "refused by the hospitals" in res.how


@pytest.mark.parametrize("kind", ["label_flip", "little_is_enough"])
def test_in_distribution_attacks_weigh_no_more_than_an_honest_site(kind, redteam_hospitals, tmp_path):
    # These stay inside the honest spread, so they are bounded rather than rejected: the geometric median gives
    # the attacker at most an honest site's weight, and the full-size run checks the AUROC (docs/redteam.md).
    res = play(kind, redteam_hospitals, tmp_path)
    assert res.max_weight_ratio is not None and res.max_weight_ratio <= 1.0 + redteam.WEIGHT_SLACK, res


def test_an_accepted_attack_is_judged_against_the_same_federation_with_the_site_honest(redteam_hospitals, tmp_path):
    train, test = redteam_hospitals
    bench = redteam.Bench(train, test, 2, attack_from=1, batch_size=4)
    refs = redteam.honest_references(bench)
    assert all(0.0 <= v <= 1.0 for v in (refs.stayed_honest, refs.left, refs.alone)) and refs.spread >= 0
    # inflate_count sends an honest update (only its claim is hostile) and its claim is capped: the run is the
    # stayed-honest run, to the last digit.
    res = redteam.run_row(ROWS["inflate_count"], bench, refs, tmp_path, extra_seeds=(1,))
    assert res.auroc == refs.stayed_honest and res.held and res.references is refs
    # An accepted attack is also judged over the extra seeds: here each seed's run equals its stayed-honest run.
    assert res.seed_gaps == ((0, 0.0), (1, 0.0)) and "over seeds 0, 1: mean gap +0.000" in res.how
    assert "Honest references" in redteam.markdown([res], "fedmed-redteam", 1.0, "")


def test_the_auroc_judgement_is_one_sided():
    # Ending above the honest run is no harm; more than the tolerance below it is.
    assert redteam.is_bounded(0.80, 0.70, 0.02) and redteam.is_bounded(0.69, 0.70, 0.02)
    assert not redteam.is_bounded(0.67, 0.70, 0.02)


# -- the published colluding attacks (issue 28), on five tiny hospitals: 3 honest and 2 colluders ---------------------
