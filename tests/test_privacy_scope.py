"""A hospital's DP ceiling from its NVFlare privacy scope (local/privacy.json), combined with fedmed_site.json."""

import json

import pytest

from fedmed.privacy.policy import PrivacyPolicy, parse_privacy, strictest
from test_job import SITES, _simulate, _write_site_configs


@pytest.mark.parametrize(
    "site, scope, expected",
    [
        # only one source: that policy
        (None, PrivacyPolicy(3.0), PrivacyPolicy(3.0)),
        (PrivacyPolicy(8.0, preset="weak"), None, PrivacyPolicy(8.0, preset="weak")),
        # the lower epsilon wins whichever file it is in; the lower delta of the two is kept
        (PrivacyPolicy(8.0, delta=1e-6), PrivacyPolicy(3.0, delta=1e-5), PrivacyPolicy(3.0, delta=1e-6)),
        (PrivacyPolicy(1.0, max_grad_norm=0.5), PrivacyPolicy(3.0), PrivacyPolicy(1.0, max_grad_norm=0.5)),
        # either source can keep the site's metrics home; neither can send them if the other says no
        (PrivacyPolicy(8.0), PrivacyPolicy(3.0, release_metrics=False), PrivacyPolicy(3.0, release_metrics=False)),
        (PrivacyPolicy(8.0, release_metrics=False), PrivacyPolicy(3.0), PrivacyPolicy(3.0, release_metrics=False)),
        (None, None, None),
    ],
)
def test_strictest_policy_never_loosens_either_source(site, scope, expected):
    assert strictest(site, scope) == expected


@pytest.mark.integration
def test_job_scope_sets_the_dp_ceiling_at_each_site(tiny_hospitals, tmp_path):
    # No privacy in any fedmed_site.json: the ceiling comes only from the sites' privacy.json scope the job names.
    _write_site_configs(tiny_hospitals)
    local = tmp_path / "ws" / "cxr_densenet" / "local"  # the simulator copies this folder into every site
    local.mkdir(parents=True)
    scope_policy = {"epsilon": 5.5, "noise_multiplier": 1.0}
    parse_privacy(scope_policy)  # the test's policy is itself valid
    (local / "privacy.json").write_text(
        json.dumps(
            {
                "scopes": [
                    {"name": "dp_strict", "properties": {"fedmed_privacy": scope_policy}},
                    {"name": "public", "properties": {}},
                ],
                "default_scope": "public",
            }
        )
    )
    repo, run_id = _simulate(
        tiny_hospitals,
        tmp_path / "ws",
        tmp_path / "scope.db",
        "--rounds",
        "1",
        "--norm",
        "group",
        "--scope",
        "dp_strict",
        "--no-cross-site-eval",  # the ceiling is checked on the training round's spend
    )
    spend = {p["site"]: p for p in repo.privacy_spend(run_id)}
    assert set(spend) == set(SITES)
    for site in SITES:
        assert spend[site]["epsilon_budget"] == pytest.approx(5.5)
        assert 0 < spend[site]["epsilon"] < 5.5
