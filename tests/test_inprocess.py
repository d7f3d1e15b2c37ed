import math

import pytest

from fedmed.data.loading import load_test, load_train_val
from fedmed.job.tasks import CHEST_XRAY14
from fedmed.privacy.policy import PrivacyPolicy
from fedmed.sim.attacks import Attack
from fedmed.sim.inprocess import Adversary, FederationPlan, federate
from fedmed.site.site_config import DataConfig

SITES = ("hospital-a", "hospital-b", "hospital-c")


@pytest.fixture(scope="module")
def sets(tiny_hospitals):
    train = {
        s: load_train_val(
            DataConfig("dicom", tiny_hospitals / s / "dicom", tiny_hospitals / s / "labels.csv"), 32, 0, CHEST_XRAY14
        )[0]
        for s in SITES
    }
    return train, load_test(
        tiny_hospitals / "global_test" / "dicom", tiny_hospitals / "global_test" / "labels.csv", 32, CHEST_XRAY14
    )


def test_benchmark_loop_survives_a_nan_site_with_the_geometric_median(sets):
    train, test = sets
    res = federate(
        train,
        test,
        FederationPlan(CHEST_XRAY14, 1, "geometric_median", use_trust=True, batch_size=4),
        Adversary({"hospital-c": Attack("nan")}),
    )
    assert 0.0 <= res["auroc"] <= 1.0 and res["epsilon"] == {}
    # the model card names only the sites aggregated (the NaN site's update was rejected); data not declared
    assert res.card["hospitals"] == ["hospital-a", "hospital-b"] and res.card["rounds"] == 1
    assert res.card["synthetic_data"] is None and res.card["aggregation"] == "geometric_median"


def test_benchmark_loop_reports_epsilon_per_site(sets):
    train, test = sets
    plan = FederationPlan(
        CHEST_XRAY14, 1, "fedavg", privacy=PrivacyPolicy(epsilon=8.0), norm="group", batch_size=4, data_synthetic=True
    )
    res = federate(train, test, plan)
    assert set(res["epsilon"]) == set(SITES)
    assert all(0 < e <= 8.0 * 1.000001 and math.isfinite(e) for e in res["epsilon"].values())
    assert res.card["dp_epsilon"] == pytest.approx(res["epsilon"]) and res.card["synthetic_sites"] == list(SITES)


def test_benchmark_runs_repeat_exactly_on_shared_datasets(sets):
    # Benchmarks reuse decoded datasets across runs; a rerun must not see a different augmentation stream.
    train, test = sets
    plan = FederationPlan(CHEST_XRAY14, 1, "fedavg", batch_size=4, seed=3)
    a = federate(train, test, plan)
    b = federate(train, test, plan)
    assert a["auroc"] == b["auroc"]


def test_a_site_that_leaves_is_recorded_missing_from_that_round(sets):
    train, test = sets
    plan = FederationPlan(CHEST_XRAY14, 2, "geometric_median", batch_size=4)
    res = federate(train, test, plan, absent={"hospital-c": 1})
    first, second = ({u.site: u.status for u in r.updates} for r in res.reports)
    assert first["hospital-c"] == "accepted" and second["hospital-c"] == "missing"
    assert res.reports[1].aggregated and "hospital-c" not in res.reports[1].aggregated_sites
