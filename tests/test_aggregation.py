import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmed.server.aggregation import find_update_problem, get_aggregator, update_norm, weighted_mean


def _site(value, n_batches):
    return {"w": np.full((2, 3), value, np.float32), "bn.num_batches_tracked": np.array(n_batches, np.int64)}


def test_weighted_mean_weights_sites_by_samples():
    # Sites differ, so a wrong weighting shows: (1*100 + 4*300) / 400 = 3.25
    res = weighted_mean([_site(1.0, 10), _site(4.0, 30)], [100, 300])
    np.testing.assert_allclose(res.params["w"], 3.25)
    np.testing.assert_allclose(res.site_weights, [0.25, 0.75])
    assert res.params["w"].dtype == np.float32
    assert res.params["bn.num_batches_tracked"].dtype == np.int64 and int(res.params["bn.num_batches_tracked"]) == 25


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.floats(-5, 5), st.integers(1, 1000)), min_size=1, max_size=6), st.randoms())
def test_weighted_mean_ignores_site_order(sites, rnd):
    updates = [{"w": np.full(4, v, np.float64)} for v, _ in sites]
    weights = [n for _, n in sites]
    order = list(range(len(sites)))
    rnd.shuffle(order)
    a = weighted_mean(updates, weights).params["w"]
    b = weighted_mean([updates[i] for i in order], [weights[i] for i in order]).params["w"]
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_weighted_mean_does_not_mutate_inputs():
    a, b = _site(1.0, 1), _site(2.0, 2)
    before = a["w"].copy()
    weighted_mean([a, b], [1, 1])
    np.testing.assert_array_equal(a["w"], before)


@pytest.mark.parametrize(
    "updates, weights, match",
    [
        ([], [], "zero updates"),
        ([{"w": np.zeros(2)}, {"v": np.zeros(2)}], [1, 1], "different parameter names"),
        ([{"w": np.zeros(2)}, {"w": np.zeros(3)}], [1, 1], "shape"),
        ([{"w": np.zeros(2)}], [0], "not all zero"),
        ([{"w": np.zeros(2)}], [1, 2], "one weight per update"),
    ],
)
def test_weighted_mean_rejects_bad_input(updates, weights, match):
    with pytest.raises(ValueError, match=match):
        weighted_mean(updates, weights)


@pytest.mark.parametrize(
    "update, reason",
    [
        ({"w": np.zeros((2, 3))}, "missing parameters"),  # a key dropped
        ({"w": np.zeros((2, 3)), "b": np.zeros(3), "x": np.zeros(1)}, "unexpected parameters"),
        ({"w": np.zeros((3, 2)), "b": np.zeros(3)}, "shape"),
        ({"w": np.full((2, 3), np.nan), "b": np.zeros(3)}, "NaN or Inf"),
        ({"w": np.full((2, 3), np.inf), "b": np.zeros(3)}, "NaN or Inf"),
        ({"w": np.zeros((2, 3), np.float32), "b": np.array([0, np.nan, 0], np.float32)}, "NaN or Inf"),  # float32
    ],
)
def test_update_problems_are_named(update, reason):
    ref = {"w": np.zeros((2, 3)), "b": np.zeros(3)}
    assert reason in find_update_problem(update, ref)


def test_good_update_has_no_problem_and_a_norm():
    ref = {"w": np.zeros((2, 3)), "b": np.zeros(3)}
    upd = {"w": np.ones((2, 3)), "b": np.zeros(3)}
    assert find_update_problem(upd, ref) is None
    assert update_norm(upd, ref) == pytest.approx(np.sqrt(6))


def test_unknown_aggregation_lists_the_choices():
    with pytest.raises(ValueError, match="unknown aggregation 'median'.*fedavg"):
        get_aggregator("median")


def test_huge_finite_values_whose_sum_overflows_are_not_a_problem():
    reference = {"w": np.zeros((2, 3), np.float32), "b": np.zeros(3, np.float32)}
    huge = {"w": np.full((2, 3), 3e38, np.float32), "b": np.zeros(3, np.float32)}  # float32 sum is inf, values are not
    assert find_update_problem(huge, reference) is None


@pytest.mark.parametrize("k", [1, 2, 3, 4, 16, 17, 50])  # the sorting network up to 16, sorting beyond
def test_median_of_statistics_equals_numpys_median_layer_by_layer(k):
    # One median over all statistics joined (issue 30) must be the per-layer np.median it replaced, bit for bit.
    from fedmed.server.aggregation import median_of_statistics

    rng = np.random.default_rng(k)
    updates = [
        {
            "a.running_mean": rng.standard_normal(7).astype(np.float32),
            "a.running_var": np.exp(rng.standard_normal(7)).astype(np.float32),
            "a.num_batches_tracked": np.array(int(rng.integers(0, 9)), np.int64),
            "b.running_mean": rng.standard_normal((2, 3)).astype(np.float64),
            "b.weight": rng.standard_normal(4).astype(np.float32),  # not a statistic: left out
        }
        for _ in range(k)
    ]
    updates[0]["a.running_mean"][:2] = 0.5  # ties
    got = median_of_statistics(updates)
    assert set(got) == {"a.running_mean", "a.running_var", "a.num_batches_tracked", "b.running_mean"}
    for key, value in got.items():
        ref = updates[0][key]
        med = np.median(np.stack([np.asarray(u[key], np.float64) for u in updates]), axis=0)
        old = np.rint(med).astype(ref.dtype) if ref.dtype.kind == "i" else med.astype(ref.dtype)
        assert value.dtype == ref.dtype and value.shape == ref.shape
        np.testing.assert_array_equal(value, old)


@pytest.mark.parametrize(
    "bad",
    [
        lambda w: w.astype(np.complex64),
        lambda w: w.astype(object),
        lambda w: np.array(["0.1"] * w.size).reshape(w.shape),
    ],
    ids=["complex", "object", "text"],
)
def test_an_update_whose_values_are_not_real_numbers_is_rejected_by_the_round_with_the_reason(bad):
    """A hostile site's update in a dtype no model holds, with the right names and shapes: the round rejects it with
    the parameter and dtype named (it used to crash the screening pass) and aggregates the honest sites."""
    from fedmed.server.rounds import RoundEngine, RoundRules, SiteResult

    glob = {"w": np.zeros(2000, np.float32), "b": np.zeros(4, np.float32)}
    rng = np.random.default_rng(0)
    sites = [
        SiteResult(
            f"h{i}", {k: (v + 0.01 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in glob.items()}, 10
        )
        for i in range(3)
    ]
    hostile = dict(sites[0].params, w=bad(sites[0].params["w"]))
    assert find_update_problem(hostile, glob).startswith("parameter w: dtype ")
    engine = RoundEngine(RoundRules(aggregation="geometric_median", min_clients=2))
    report = engine.step(0, glob, sites + [SiteResult("evil", hostile, 10)], [])
    evil = next(u for u in report.updates if u.site == "evil")
    assert evil.status == "rejected" and "is not a real number type" in evil.reason, evil
    assert {u.site for u in report.updates if u.status == "accepted"} == {"h0", "h1", "h2"}
