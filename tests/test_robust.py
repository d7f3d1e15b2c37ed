import numpy as np
import pytest
from geom_median.numpy import compute_geometric_median
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from fedmed.server.aggregation import AGGREGATORS, distance, get_aggregator
from fedmed.server.robust.baselines import coordinate_median, krum, trimmed_mean
from fedmed.server.robust.geometric_median import geometric_median
from fedmed.server.robust.trust import SiteTrust, TrustPolicy, round_scores, update_trust


def _upd(vec, bn=(0.0, 1.0, 5)):
    """A model-like update: two weight tensors plus BatchNorm statistics."""
    vec = np.asarray(vec, np.float32)
    return {
        "conv.weight": vec[:4].reshape(2, 2),
        "fc.weight": vec[4:],
        "bn.running_mean": np.full(2, bn[0], np.float32),
        "bn.running_var": np.full(2, bn[1], np.float32),
        "bn.num_batches_tracked": np.array(bn[2], np.int64),
    }


def _flat(u):
    return np.concatenate([u["conv.weight"].ravel(), u["fc.weight"].ravel()]).astype(np.float64)


points_st = st.integers(2, 7).flatmap(
    lambda k: st.tuples(
        arrays(np.float64, (k, 6), elements=st.floats(-100, 100)),
        arrays(np.float64, (k,), elements=st.floats(0.1, 10)),
    )
)


@settings(max_examples=60, deadline=None)
@given(points_st)
def test_matches_the_reference_implementation(data):
    pts, w = data
    ours = geometric_median([_upd(p) for p in pts], w, eps=1e-8, maxiter=500, ftol=1e-12)
    ref = compute_geometric_median([p for p in pts], w, eps=1e-8, maxiter=500, ftol=1e-12)
    scale = max(1.0, np.abs(pts).max())
    np.testing.assert_allclose(_flat(ours.median), ref.median, atol=1e-3 * scale)


@settings(max_examples=40, deadline=None)
@given(arrays(np.float64, (6,), elements=st.floats(-1e3, 1e3)), st.integers(1, 6))
def test_identical_points_give_that_point(p, k):
    res = geometric_median([_upd(p) for _ in range(k)], np.arange(1, k + 1))
    np.testing.assert_allclose(_flat(res.median), p.astype(np.float32), rtol=1e-6, atol=1e-4)
    assert res.converged


@settings(max_examples=40, deadline=None)
@given(points_st, arrays(np.float64, (6,), elements=st.floats(-50, 50)), st.floats(0.1, 20))
def test_translation_and_scaling_equivariance(data, shift, scale):
    pts, w = data
    base = _flat(geometric_median([_upd(p) for p in pts], w, ftol=1e-14, maxiter=1000, eps=1e-10).median)
    moved = _flat(
        geometric_median([_upd(p * scale + shift) for p in pts], w, ftol=1e-14, maxiter=1000, eps=1e-10).median
    )
    tol = 1e-2 * max(1.0, np.abs(pts).max() * scale + np.abs(shift).max())
    np.testing.assert_allclose(moved, base * scale + shift, atol=tol)


@settings(max_examples=40, deadline=None)
@given(st.integers(3, 6), st.integers(1, 2), st.floats(1e3, 1e9), st.integers(0, 10_000))
def test_outliers_with_less_than_half_the_weight_stay_bounded(n_in, n_out, far, seed):
    assume(n_out < n_in)
    rng = np.random.default_rng(seed)
    inliers = rng.normal(0, 1, (n_in, 6))
    outliers = rng.normal(0, 1, (n_out, 6)) * far
    res = geometric_median([_upd(p) for p in np.vstack([inliers, outliers])], np.ones(n_in + n_out))
    # Breakdown point 1/2: however far the outliers go, the median stays near the inliers.
    spread = np.linalg.norm(inliers - inliers.mean(axis=0), axis=1).max()
    assert np.linalg.norm(_flat(res.median) - inliers.mean(axis=0)) < 4 * spread + 1.0
    assert res.site_weights[n_in:].sum() < 0.5


def test_weights_are_honoured():
    a, b, c = np.zeros(6), np.ones(6), np.full(6, 2.0)
    heavy_c = _flat(geometric_median([_upd(a), _upd(b), _upd(c)], [1, 1, 10]).median)
    heavy_a = _flat(geometric_median([_upd(a), _upd(b), _upd(c)], [10, 1, 1]).median)
    np.testing.assert_allclose(heavy_c, 2.0, atol=1e-3)  # more than half the weight: the median is that site
    np.testing.assert_allclose(heavy_a, 0.0, atol=1e-3)


def test_batchnorm_statistics_follow_the_weiszfeld_weights():
    # Rule: BN running stats are not part of the distance; they are combined with the final Weiszfeld weights.
    honest = [_upd(np.zeros(6), bn=(1.0, 2.0, 10)), _upd(np.full(6, 0.1), bn=(1.0, 2.0, 10))]
    hostile = _upd(np.full(6, 1e6), bn=(1e6, 1e6, 10))
    res = geometric_median(honest + [hostile], [1, 1, 1])
    assert res.median["bn.running_mean"] == pytest.approx(np.full(2, 1.0), rel=1e-2)
    assert res.median["bn.num_batches_tracked"].dtype == np.int64
    assert res.site_weights[2] < 1e-3


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(eps=0), "eps must be > 0"),
        (dict(maxiter=0), "maxiter must be >= 1"),
        (dict(ftol=0), "ftol must be > 0"),
    ],
)
def test_bad_parameters_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        geometric_median([_upd(np.zeros(6))], [1], **kwargs)


def test_baselines_resist_one_far_outlier():
    honest = [_upd(np.full(6, v)) for v in (0.9, 1.0, 1.1, 1.05)]
    hostile = _upd(np.full(6, 1e6))
    ups = honest + [hostile]
    med, _ = coordinate_median(ups, [1] * 5)
    tm, _ = trimmed_mean(ups, [1] * 5, trim=0.2)
    kr, beta = krum(ups, [1] * 5)
    for params in (med, tm, kr):
        assert np.all(np.abs(_flat(params) - 1.0) < 0.2)
    assert beta[4] == 0.0
    with pytest.raises(ValueError, match="trim must be in"):
        trimmed_mean(ups, [1] * 5, trim=0.5)
    with pytest.raises(ValueError, match="at least 3"):
        krum(ups[:2], [1, 1])


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
def test_every_aggregator_keeps_names_shapes_and_dtypes(name):
    ups = [_upd(np.full(6, v), bn=(v, 1.0, 3)) for v in (0.0, 1.0, 2.0, 3.0)]
    res = get_aggregator(name)(ups, [1, 2, 3, 4])
    assert set(res.params) == set(ups[0])
    for k, v in ups[0].items():
        assert res.params[k].shape == v.shape and res.params[k].dtype == v.dtype
    assert res.site_weights.sum() == pytest.approx(1.0)


def test_distance_ignores_batchnorm_statistics():
    a = _upd(np.zeros(6), bn=(0.0, 1.0, 1))
    b = _upd(np.zeros(6), bn=(100.0, 50.0, 9))
    assert distance(a, b) == 0.0
    assert distance(_upd(np.ones(6)), a) == pytest.approx(np.sqrt(6))


# --- trust --------------------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0, 1e6), min_size=1, max_size=8), st.floats(0.01, 1e3))
def test_round_scores_are_in_unit_interval_and_scale_free(ds, factor):
    policy = TrustPolicy()
    sites = {f"s{i}": d for i, d in enumerate(ds)}
    a = round_scores(sites, policy)
    b = round_scores({s: d * factor for s, d in sites.items()}, policy)
    for s in sites:
        assert 0.0 <= a[s][1] <= 1.0
        assert a[s][1] == pytest.approx(b[s][1], abs=1e-9)


def test_hostile_site_is_quarantined_within_two_rounds_and_readmitted_after_good_rounds():
    policy = TrustPolicy()
    states = {}
    for _ in range(2):
        scores = {s: sc for s, (_, sc) in round_scores({"a": 1.0, "b": 1.1, "evil": 50.0}, policy).items()}
        states, events = update_trust(states, scores, policy)
    assert states["evil"].quarantined and not states["a"].quarantined
    assert states["evil"].trust < policy.quarantine_below
    for _ in range(policy.readmit_after):
        states, events = update_trust(states, {"a": 1.0, "b": 1.0, "evil": 1.0}, policy)
    assert not states["evil"].quarantined and ("evil", "readmitted") in [(s, k) for s, k, _ in events]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(smoothing=0), "smoothing"),
        (dict(ok_ratio=3, bad_ratio=2), "ok_ratio < bad_ratio"),
        (dict(quarantine_below=2), "quarantine_below"),
        (dict(readmit_after=0), "readmit_after"),
    ],
)
def test_trust_policy_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrustPolicy(**kwargs)


def test_scores_outside_unit_interval_are_refused():
    with pytest.raises(ValueError, match="must be in \\[0, 1\\]"):
        update_trust({}, {"a": 1.5}, TrustPolicy())
    assert update_trust({"a": SiteTrust(0.9)}, {}, TrustPolicy())[0]["a"].trust == 0.9


def test_two_updates_fall_back_to_the_weighted_mean():
    # The weighted geometric median of two points is the heavier point: it would drop the lighter hospital.
    a, b = _upd(np.zeros(6)), _upd(np.ones(6))
    assert np.allclose(_flat(geometric_median([a, b], [3, 1]).median), 0.0, atol=1e-3)
    res = get_aggregator("geometric_median")([a, b], [3, 1])
    # Counts are capped at the lower median (here the smaller claim), so two sites weigh the same: the mean.
    np.testing.assert_allclose(res.used_counts, [1, 1])
    np.testing.assert_allclose(_flat(res.params), 0.5, atol=1e-6)
    assert "fallback" in res.diagnostics


def test_far_outlier_is_left_out_of_the_round_it_turns_hostile():
    from fedmed.server.aggregation import aggregate_and_score

    ups = {
        "a": _upd(np.full(6, 1.0)),
        "b": _upd(np.full(6, 1.2)),
        "c": _upd(np.full(6, 0.9)),
        "evil": _upd(np.full(6, -500.0)),
    }
    counts = {"a": 10, "b": 10, "c": 10, "evil": 10}
    out = aggregate_and_score(ups, counts, get_aggregator("geometric_median"), TrustPolicy(), list(ups), min_keep=2)
    assert out.excluded == ("evil",) and out.weights["evil"] == 0.0
    assert out.scored["evil"][1] == 0.0 and all(out.scored[n][1] == 1.0 for n in "abc")
    honest = get_aggregator("geometric_median")([ups[n] for n in "abc"], [10, 10, 10])
    np.testing.assert_allclose(_flat(out.result.params), _flat(honest.params))  # exactly the honest aggregate
    # Not enough sites would remain: the robust aggregate stands, nobody is dropped.
    out = aggregate_and_score(ups, counts, get_aggregator("geometric_median"), TrustPolicy(), list(ups), min_keep=4)
    assert out.excluded == () and out.weights["evil"] < 0.05


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 8, 16, 17, 24, 50, 51])  # the sorting network up to 16, sorting beyond
def test_the_judging_reference_median_equals_numpys(k):
    from fedmed.server.robust.collusion import _median_rows, coordinate_median_reference

    rng = np.random.default_rng(k)
    rows = rng.standard_normal((k, 300)).astype(np.float32)
    np.testing.assert_allclose(_median_rows(list(rows)), np.median(rows, axis=0), rtol=1e-6, atol=1e-6)
    ups = [{"w": r.reshape(3, 100)} for r in rows]
    ref = coordinate_median_reference(ups, ["w"])
    assert ref["w"].shape == (3, 100) and ref["w"].dtype == np.float32
    np.testing.assert_allclose(ref["w"].reshape(-1), np.median(rows, axis=0), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("k", [17, 50, 51])
def test_the_sorted_median_is_numpys_bit_for_bit_across_blocks(k):
    """Many rows (fedmed.server.robust.collusion._median_by_sorting): the same float32 values np.median picks, over more
    coordinates than one sorted block, with ties, and for an even count the same rounding of the middle pair."""
    from fedmed.server.robust.collusion import SORT_CHUNK, _median_rows

    rng = np.random.default_rng(k)
    rows = rng.standard_normal((k, 2 * SORT_CHUNK + 37)).astype(np.float32)
    rows[: k // 2, :100] = 1.5  # ties at the middle
    got = _median_rows(list(rows))
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, np.median(rows, axis=0))
