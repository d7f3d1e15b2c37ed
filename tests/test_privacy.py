import pytest
import torch
from opacus.accountants import RDPAccountant
from torch.utils.data import TensorDataset

from fedmed.model import build_densenet121
from fedmed.privacy.dp_sgd import BudgetExceeded, SitePrivacy, SiteRDPAccountant, check_dp_compatible
from fedmed.privacy.policy import PRESETS, PrivacyPolicy, parse_privacy
from fedmed.tasks import CHEST_XRAY14


@pytest.fixture(scope="module")
def tiny():
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.rand(24, 1, 32, 32, generator=g), (torch.rand(24, 14, generator=g) > 0.8).float())


def test_reported_epsilon_is_opacus_rdp_for_the_same_q_sigma_steps(tiny):
    site = SitePrivacy(PrivacyPolicy(epsilon=50.0, noise_multiplier=1.1))
    model = build_densenet121(14, norm="group")
    _, r1 = site.train_round(model, tiny, 1, 1e-3, 6, seed=0, task=CHEST_XRAY14, total_epochs=3)
    _, r2 = site.train_round(model, tiny, 1, 1e-3, 6, seed=1, task=CHEST_XRAY14, total_epochs=3)
    q = 6 / 24
    ref = RDPAccountant()
    ref.history = [(1.1, q, r1.steps + r2.steps)]  # an independent accountant, same (q, sigma, steps)
    assert r2.epsilon == pytest.approx(ref.get_epsilon(1e-5), rel=1e-9)
    assert r1.epsilon < r2.epsilon


def test_calibrated_noise_spends_the_ceiling_by_the_last_round(tiny):
    site = SitePrivacy(PrivacyPolicy(epsilon=3.0))
    model = build_densenet121(14, norm="group")
    for r in range(2):
        model, info = site.train_round(model, tiny, 1, 1e-3, 6, seed=r, task=CHEST_XRAY14, total_epochs=2)
    assert info.epsilon == pytest.approx(3.0, rel=0.02) and info.epsilon <= 3.0 * 1.000001


def test_a_round_past_the_ceiling_is_refused_before_training(tiny):
    site = SitePrivacy(PrivacyPolicy(epsilon=5.0, noise_multiplier=1.0))
    model = build_densenet121(14, norm="group")
    model, first = site.train_round(model, tiny, 1, 1e-3, 6, seed=0, task=CHEST_XRAY14, total_epochs=10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    spent = site.epsilon_spent
    with pytest.raises(BudgetExceeded, match="over the site's ceiling 5.0"):
        for r in range(1, 10):
            model, _ = site.train_round(model, tiny, 1, 1e-3, 6, seed=r, task=CHEST_XRAY14, total_epochs=10)
            before = {k: v.clone() for k, v in model.state_dict().items()}
            spent = site.epsilon_spent
    assert site.epsilon_spent == spent <= 5.0  # refusing spends nothing
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # and trains nothing


def test_batchnorm_model_is_refused_for_dp(tiny):
    with pytest.raises(ValueError, match="norm='group'"):
        check_dp_compatible(build_densenet121(14, norm="batch"))


@pytest.mark.parametrize(
    "raw, expected",
    [
        ({"preset": "strong"}, (1.0, 1e-5)),
        ({"preset": "moderate", "delta": 1e-6}, (3.0, 1e-6)),  # a site may set a smaller delta
        ({"preset": "weak"}, (8.0, 1e-5)),
        ({"epsilon": 2.5, "noise_multiplier": 1.3}, (2.5, 1e-5)),
    ],
)
def test_presets_and_custom(raw, expected):
    p = parse_privacy(raw)
    assert (p.epsilon, p.delta) == expected and PRESETS["moderate"] == 3.0


def test_a_site_can_keep_its_metrics_home():
    assert parse_privacy({"preset": "weak"}).release_metrics  # the default: losses and AUROCs go with the update
    assert not parse_privacy({"preset": "weak", "release_metrics": False}).release_metrics


@pytest.mark.parametrize(
    "raw, match",
    [
        ({"preset": "paranoid"}, "preset must be one of"),
        ({"preset": "strong", "epsilon": 5}, "means epsilon 1.0"),
        ({"preset": "weak", "delta": 1e-3}, "delta <= 1e-05"),
        ({"delta": 1e-5}, "needs 'epsilon'"),
        ({"epsilon": -1}, "epsilon must be > 0"),
        ({"epsilon": 1, "clip": 1}, "unknown key"),
        ({"epsilon": 1, "release_metrics": "no"}, "release_metrics must be true or false"),
    ],
)
def test_bad_policies_are_named(raw, match):
    with pytest.raises(ValueError, match=match):
        parse_privacy(raw)


def test_an_uncertifiable_ceiling_is_refused_with_the_reason(tiny):
    # below log(1/delta)/(max order - 1) = 11.5/2047 no noise level helps
    site = SitePrivacy(PrivacyPolicy(epsilon=0.001))
    with pytest.raises(BudgetExceeded, match="no noise level lets the RDP accountant certify epsilon 0.001"):
        site.train_round(
            build_densenet121(14, norm="group"), tiny, 1, 1e-3, 6, seed=0, task=CHEST_XRAY14, total_epochs=50
        )
    assert site.epsilon_spent == 0.0


def test_dp_sgd_trains_only_the_chosen_layers_and_leaves_the_model_whole(tiny):
    site = SitePrivacy(PrivacyPolicy(epsilon=50.0, noise_multiplier=1.0))
    model = build_densenet121(14, norm="group")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model, info = site.train_round(
        model,
        tiny,
        1,
        1e-2,
        6,
        seed=0,
        task=CHEST_XRAY14,
        total_epochs=2,
        trainable=["features.denseblock4.denselayer16.", "class_layers."],
    )
    after = model.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(k.startswith(("features.denseblock4.denselayer16.", "class_layers.")) for k in moved)
    assert "class_layers.out.weight" in moved
    assert all(p.requires_grad for p in model.parameters())  # frozen only for the round
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())
    # the accountant does not depend on how many coordinates are trained
    ref = RDPAccountant()
    ref.history = [(1.0, 6 / 24, info.steps)]
    assert info.epsilon == pytest.approx(ref.get_epsilon(1e-5), rel=1e-9)


def test_unknown_trainable_layers_are_named(tiny):
    site = SitePrivacy(PrivacyPolicy(epsilon=50.0, noise_multiplier=1.0))
    model = build_densenet121(14, norm="group")
    with pytest.raises(ValueError, match=r"\['features.denseblock9'\] match no parameter"):
        site.train_round(
            model, tiny, 1, 1e-3, 6, seed=0, task=CHEST_XRAY14, total_epochs=2, trainable=["features.denseblock9"]
        )
    assert site.epsilon_spent == 0.0
    assert all(p.requires_grad for p in model.parameters())


def test_epsilon_0_1_is_certified_with_the_wider_orders(tiny):
    # Opacus' default orders (up to 63) cannot get below about 0.1 at delta 1e-5; the site's accountant can.
    site = SitePrivacy(PrivacyPolicy(epsilon=0.1))
    _, info = site.train_round(
        build_densenet121(14, norm="group"), tiny, 1, 1e-3, 6, seed=0, task=CHEST_XRAY14, total_epochs=3
    )
    ref = RDPAccountant()
    ref.history = [(info.noise_multiplier, 6 / 24, info.steps)]
    assert info.epsilon == pytest.approx(ref.get_epsilon(1e-5, alphas=SiteRDPAccountant.ORDERS), rel=1e-9)
    assert info.epsilon <= 0.1 and ref.get_epsilon(1e-5) > 0.1
