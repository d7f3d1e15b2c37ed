"""fedmed.server.passes: the one-pass kernels give the results of the passes they replace (same digest; distances equal to
1e-6 relative, the float32 chunks' rounding)."""

import blake3
import numpy as np
import pytest

from fedmed.models.hashing import params_blake3
from fedmed.server.aggregation import distance, update_norm
from fedmed.server.passes import CHUNK, has_non_finite, hash_and_norm, squared_distance
from fedmed.server.robust.geometric_median import distance_keys


def old_distance(update, center, keys) -> float:
    """The two-pass formula fedmed.server.aggregation.distance used before (a float64 copy of each difference, then a dot)."""
    sq = 0.0
    for k in keys:
        d = np.subtract(update[k], center[k], dtype=np.float64).reshape(-1)
        sq += float(np.dot(d, d))
    return float(np.sqrt(sq))


def state(rng, scale=1.0) -> dict:
    return {
        "conv.weight": (rng.standard_normal((CHUNK + 17, 3)) * scale).astype(np.float32),  # spans several chunks
        "fc.weight": (rng.standard_normal((5, 7)) * scale).astype(np.float64).T,  # not C-contiguous
        "fc.bias": rng.standard_normal(CHUNK).astype(np.float32),  # exactly one chunk
        "empty": np.zeros((0, 4), np.float32),  # no values at all
        "norm.running_mean": rng.standard_normal(11).astype(np.float32),  # a statistic: hashed, not in the norm
        "norm.num_batches_tracked": np.array(12, np.int64),  # an integer buffer: hashed only
    }


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hash_and_norm_equal_the_separate_hash_and_norm(seed):
    rng = np.random.default_rng(seed)
    reference = state(rng)
    update = {k: v + np.asarray(rng.normal(0, 0.01, v.shape), v.dtype) for k, v in reference.items()}
    keys = distance_keys(reference)
    assert "norm.running_mean" not in keys and "conv.weight" in keys
    sha, norm = hash_and_norm(update, reference, keys)
    assert sha == params_blake3(update)  # the digest signature verification takes of the same arrays
    assert norm == pytest.approx(old_distance(update, reference, keys), rel=1e-6)
    assert norm == pytest.approx(update_norm(update, reference, keys), rel=1e-6)


def test_the_hash_sees_every_parameter_and_the_norm_only_the_distance_keys():
    rng = np.random.default_rng(3)
    reference = state(rng)
    update = {k: v.copy() for k, v in reference.items()}
    update["norm.running_mean"] = update["norm.running_mean"] + 5  # a statistic moved: hash changes, norm does not
    sha, norm = hash_and_norm(update, reference, distance_keys(reference))
    assert norm == 0.0
    assert sha != params_blake3(reference) and sha == params_blake3(update)


def test_the_update_digest_is_blake3_over_the_stream_params_sha256_hashes():
    rng = np.random.default_rng(5)
    update = state(rng)
    h = blake3.blake3()
    for k in sorted(update):  # each name, str(dtype), str(shape), the C-order bytes (model files' stream)
        v = np.ascontiguousarray(update[k])
        h.update(k.encode() + str(v.dtype).encode() + str(v.shape).encode() + v.tobytes())
    assert hash_and_norm(update, update, distance_keys(update))[0] == params_blake3(update) == h.hexdigest()


def test_update_pass_given_the_digest_takes_it_and_finds_the_rest_as_before():
    from fedmed.server.passes import update_pass

    rng = np.random.default_rng(6)
    reference = state(rng)
    update = moved_state(rng, reference)
    keys = distance_keys(reference)
    hashed = update_pass(update, reference, keys)
    known = update_pass(update, reference, keys, digest="ab" * 32)  # whatever the caller took is what is reported
    assert known.sha == "ab" * 32 and hashed.sha == params_blake3(update)
    assert (known.norm, known.up, known.down, known.non_finite) == (hashed.norm, hashed.up, hashed.down, frozenset())
    with pytest.raises(ValueError, match="64 hex characters"):
        update_pass(update, reference, keys, digest="abc")


@pytest.mark.parametrize("scale", [1e-6, 1.0, 1e6])  # tiny, ordinary and huge parameter values
def test_chunked_distance_equals_the_two_pass_formula(scale):
    rng = np.random.default_rng(4)
    a, b = state(rng, scale), state(rng, scale)
    keys = distance_keys(a)
    assert distance(a, b) == pytest.approx(old_distance(a, b, keys), rel=1e-6)
    assert squared_distance(a, b, keys) == pytest.approx(old_distance(a, b, keys) ** 2, rel=1e-6)


def test_values_near_the_float32_range_fall_back_to_float64_and_stay_finite():
    a = {"w": np.full(CHUNK + 5, 3e38, np.float32)}
    b = {"w": np.full(CHUNK + 5, -3e38, np.float32)}  # the float32 difference overflows; float64's does not
    assert np.isfinite(distance(a, b))
    assert distance(a, b) == pytest.approx(old_distance(a, b, ["w"]), rel=1e-12)


def test_a_non_finite_value_makes_the_norm_non_finite():
    rng = np.random.default_rng(5)
    reference = state(rng)
    update = {k: v.copy() for k, v in reference.items()}
    update["conv.weight"][CHUNK // 3 + 1, 1] = np.nan  # in the second chunk
    assert np.isnan(hash_and_norm(update, reference, distance_keys(reference))[1])


@pytest.mark.parametrize(
    "values, expected",
    [
        (np.zeros(5, np.float32), False),
        (np.array([1, np.nan, 2], np.float32), True),
        (np.array([1, -np.inf], np.float64), True),
        (np.array([np.inf, -np.inf], np.float32), True),  # the sum is NaN
        (np.full(4, 3e38, np.float32), False),  # finite values whose float32 sum overflows
        (np.full(4, 1.7e308), False),  # the same in float64
        (np.zeros(0, np.float32), False),  # no values
    ],
)
def test_has_non_finite_matches_the_element_wise_check(values, expected):
    assert has_non_finite(values) == expected == (not np.all(np.isfinite(values)))


# -- update_pass: screening's one pass also answers the sign rule, the near-copy sketch and the finiteness test ------


def moved_state(rng, reference) -> dict:
    """An update whose moves include every case the sign count must get right: unmoved coordinates, +0.0 against
    -0.0, differences that are subnormal in float32, and ordinary moves of both signs."""
    update = {k: v + np.asarray(rng.normal(0, 0.01, v.shape), v.dtype) for k, v in reference.items()}
    w = update["conv.weight"].reshape(-1)
    w[:100] = reference["conv.weight"].reshape(-1)[:100]  # not moved
    update["fc.bias"][:3] = np.float32(-0.0)
    reference["fc.bias"][:3] = np.float32(0.0)
    reference["fc.bias"][3:6] = np.float32(2e-38)
    update["fc.bias"][3:6] = np.array([1.9e-38, 2.1e-38, 2e-38], np.float32)  # differences below float32's normals
    return update


@pytest.mark.parametrize("seed", [0, 1])
def test_update_pass_equals_the_separate_passes_it_replaces(seed):
    from fedmed.server.passes import update_pass
    from fedmed.server.robust.collusion import UpdateSketch
    from fedmed.server.robust.sign_balance import sign_balance

    rng = np.random.default_rng(seed)
    reference = state(rng)
    update = moved_state(rng, reference)
    keys = distance_keys(reference)
    sketch = UpdateSketch(reference, size=1000, seed=seed)
    done = update_pass(update, reference, keys, sketch.layout())
    assert done.sha == params_blake3(update)
    assert (done.sha, done.norm) == hash_and_norm(update, reference, keys)
    balance, moved = sign_balance(update, reference, keys)
    assert done.up + done.down == moved and (done.up - done.down) / moved == balance
    assert done.up > 0 and done.down > 0 and moved < sum(np.asarray(reference[k]).size for k in keys)
    assert np.array_equal(done.sketch, sketch.values(update)) and done.sketch.size == 1000
    assert done.non_finite == frozenset()


def test_update_pass_takes_numpy_chunks_for_dtypes_the_kernel_does_not_take():
    """A float16 distance key beside float32 ones: the same digest, distance and signs as the formulas."""
    from fedmed.server.passes import CHUNK, update_pass

    rng = np.random.default_rng(5)
    reference = {"a.weight": rng.standard_normal(CHUNK + 9).astype(np.float16), "b.weight": np.ones(7, np.float32)}
    update = {
        "a.weight": (reference["a.weight"] + np.float16(0.01)).astype(np.float16),
        "b.weight": np.zeros(7, np.float32),
    }
    update["a.weight"][:5] = reference["a.weight"][:5]
    done = update_pass(update, reference, ["a.weight", "b.weight"])
    assert done.sha == params_blake3(update)
    want = sum(float(np.sum((update[k].astype(np.float64) - reference[k].astype(np.float64)) ** 2)) for k in update)
    assert done.norm == pytest.approx(np.sqrt(want), rel=1e-6)
    assert done.up == int(np.count_nonzero(update["a.weight"] > reference["a.weight"]))
    assert done.down == int(np.count_nonzero(update["a.weight"] < reference["a.weight"])) + 7


def test_update_pass_counts_signs_by_comparison_where_subnormal_differences_could_be_flushed(monkeypatch):
    import fedmed.server.passes as passes
    from fedmed.server.robust.sign_balance import sign_balance

    rng = np.random.default_rng(7)
    reference = state(rng)
    update = moved_state(rng, reference)
    keys = distance_keys(reference)
    assert passes.gradual_underflow()  # this process keeps IEEE's default: the differences' signs are used
    exact = passes.update_pass(update, reference, keys)
    monkeypatch.setattr(passes, "gradual_underflow", lambda: False)
    compared = passes.update_pass(update, reference, keys)
    balance, moved = sign_balance(update, reference, keys)
    assert (exact.up, exact.down) == (compared.up, compared.down)
    assert compared.up + compared.down == moved and (compared.up - compared.down) / moved == balance


def test_update_pass_names_the_layers_find_update_problem_would_reject():
    from fedmed.server.aggregation import find_update_problem
    from fedmed.server.passes import update_pass

    rng = np.random.default_rng(8)
    reference = state(rng)
    keys = distance_keys(reference)
    update = {k: v.copy() for k, v in reference.items()}
    update["conv.weight"][CHUNK // 2 + 3, 0] = np.inf  # a distance key, second chunk
    update["norm.running_mean"][4] = np.nan  # a statistic (hashed, not in the norm)
    done = update_pass(update, reference, keys)
    assert done.non_finite == {"conv.weight", "norm.running_mean"}
    first = next(k for k in reference if k in done.non_finite)
    assert find_update_problem(update, reference) == f"parameter {first}: contains NaN or Inf"
    huge = {k: v.copy() for k, v in reference.items()}
    huge["conv.weight"][:] = np.float32(3e38)  # finite, but the float32 sums of squares overflow
    assert update_pass(huge, reference, keys).non_finite == frozenset()


# -- reference_pass: the judging reference, the distances to it and the Gram matrix in one blocked pass -----------


def cloud(rng, k: int, size: int = 2 * 4096 + 37) -> list:
    """k float32 updates over two parameters, the larger spanning several of reference_pass's blocks."""
    return [
        {
            "a": rng.standard_normal((size, 1)).astype(np.float32),
            "b.weight": (0.1 * rng.standard_normal((7, 3))).astype(np.float32),
        }
        for _ in range(k)
    ]


@pytest.mark.parametrize("k", [1, 2, 3, 5, 16, 17, 50, 51])
@pytest.mark.parametrize("groups", [[], [[0, 1]], [[2, 0], [1]]])
def test_reference_pass_gives_the_coordinate_median_reference_bit_for_bit(k, groups):
    from fedmed.server.passes import reference_pass
    from fedmed.server.robust.collusion import coordinate_median_reference

    groups = [g for g in groups if max(g) < k]
    rng = np.random.default_rng(k)
    ups = cloud(rng, k)
    ups[0]["a"][:50] = 1.5  # ties
    keys = ["a", "b.weight"]
    found = reference_pass(ups, keys, groups)
    want = coordinate_median_reference(ups, keys, groups)
    for key in keys:
        assert found.reference[key].dtype == want[key].dtype and found.reference[key].shape == want[key].shape
        np.testing.assert_array_equal(found.reference[key], want[key])
    # the Gram matrix is centred on the reference: its diagonal is each update's squared distance to it
    wanted = [distance(u, want, keys) for u in ups]
    np.testing.assert_allclose(found.distances, wanted, rtol=1e-6)


def pairwise(gram: np.ndarray) -> np.ndarray:
    d = np.diag(gram)
    return np.sqrt(np.maximum(d[:, None] + d[None, :] - 2 * gram, 0.0))


@pytest.mark.parametrize("k", [5, 9])  # the compiled float64 Gram (up to SMALL_GRAM_SITES) and BLAS's float32 one
@pytest.mark.parametrize("far", [0.0, 1e2, 1e4, 1e6])
def test_reference_pass_gram_gives_float64s_weiszfeld_weights_with_far_outliers(far, k):
    """The float32 Gram matrix centred on the coordinate median against the float64 one centred on the mean
    (fedmed.server.robust.geometric_median.centred_gram): pairwise distances to 1e-5 relative, the Weiszfeld
    weights to 1e-6 and the median itself to 1e-6 of the honest spread, with two outliers up to 1e6 away (where a
    float32 Gram centred on the mean lost the honest sites' distances: docs/bench_scale.md)."""
    from fedmed.server.passes import reference_pass
    from fedmed.server.robust.geometric_median import centred_gram, geometric_median, weiszfeld_on_gram

    rng = np.random.default_rng(7)
    ups = cloud(rng, k)
    for u, sign in zip(ups[:2], (1, -1)):
        u["a"] += np.float32(sign * far)
    keys = ["a", "b.weight"]
    w = np.full(len(ups), 1 / len(ups))
    found = reference_pass(ups, keys)
    exact = centred_gram(ups, w, keys)
    np.testing.assert_allclose(pairwise(found.gram), pairwise(exact), rtol=1e-5, atol=1e-6 * (1 + far))
    beta32, *_ = weiszfeld_on_gram(found.gram, w)
    beta64, *_ = weiszfeld_on_gram(exact, w)
    np.testing.assert_allclose(beta32, beta64, atol=1e-6)
    fast, slow = geometric_median(ups, w, gram=found.gram), geometric_median(ups, w)
    for key in keys:
        np.testing.assert_allclose(fast.median[key], slow.median[key], atol=1e-6)


def test_reference_pass_redoes_a_block_in_float64_where_float32_squares_overflow():
    from fedmed.server.passes import reference_pass

    rng = np.random.default_rng(8)
    ups = cloud(rng, 5)
    ups[3]["a"][5] = np.float32(3e37)  # squared: beyond float32's range
    ups[4]["a"][9] = np.float32(-3e37)
    keys = ["a", "b.weight"]
    found = reference_pass(ups, keys)
    assert np.isfinite(found.gram).all()
    x = np.stack([np.concatenate([u[k].reshape(-1).astype(np.float64) for k in keys]) for u in ups])
    exact = np.array([[np.linalg.norm(a - b) for b in x] for a in x])  # centring on the mean loses the small ones
    np.testing.assert_allclose(pairwise(found.gram), exact, rtol=1e-6)


def test_reference_pass_takes_the_sorted_path_for_keys_the_network_does_not_take():
    """A float16 parameter (the compiled network takes float32 and float64) beside float32 ones: the same reference
    as coordinate_median_reference, bit for bit, and the Gram's distances."""
    from fedmed.server.passes import reference_pass
    from fedmed.server.robust.collusion import coordinate_median_reference

    rng = np.random.default_rng(12)
    ups = cloud(rng, 6)
    for u in ups:
        u["h"] = rng.standard_normal(5000).astype(np.float16)
    keys = ["a", "b.weight", "h"]
    found = reference_pass(ups, keys, [[1, 4]])
    want = coordinate_median_reference(ups, keys, [[1, 4]])
    for key in keys:
        assert found.reference[key].dtype == want[key].dtype
        np.testing.assert_array_equal(found.reference[key], want[key])
    np.testing.assert_allclose(found.distances, [distance(u, want, keys) for u in ups], rtol=1e-5)


def test_reference_pass_keeps_float64_updates_in_float64():
    from fedmed.server.passes import reference_pass
    from fedmed.server.robust.geometric_median import centred_gram

    rng = np.random.default_rng(9)
    ups = [{"a": 1e8 + rng.standard_normal(300)} for _ in range(6)]  # a large common offset
    found = reference_pass(ups, ["a"])
    assert found.reference["a"].dtype == np.float64
    np.testing.assert_allclose(pairwise(found.gram), pairwise(centred_gram(ups, np.full(6, 1 / 6), ["a"])), rtol=1e-9)


@pytest.mark.parametrize(
    ("groups", "match"), [([[0, 9]], "outside 0..2"), ([[]], "names no update"), ([[-1, 0]], "outside 0..2")]
)
def test_reference_pass_refuses_groups_that_name_no_update(groups, match):
    from fedmed.server.passes import reference_pass

    with pytest.raises(ValueError, match=match):
        reference_pass(cloud(np.random.default_rng(0), 3, 10), ["a"], groups)
    with pytest.raises(ValueError, match="zero updates"):
        reference_pass([], ["a"])


def test_geometric_median_refuses_a_gram_of_the_wrong_shape_or_not_finite():
    from fedmed.server.robust.geometric_median import geometric_median

    ups = cloud(np.random.default_rng(1), 3, 10)
    with pytest.raises(ValueError, match="finite 3 x 3"):
        geometric_median(ups, [1, 1, 1], gram=np.eye(2))
    with pytest.raises(ValueError, match="finite 3 x 3"):
        geometric_median(ups, [1, 1, 1], gram=np.full((3, 3), np.nan))


@pytest.mark.parametrize("kind", ["alie", "min_max_unit", "min_sum_std", "ipm", "alie_balanced"])
def test_reference_pass_gram_agrees_with_float64_on_colluding_attacks(kind):
    """The red team's colluding attacks (fedmed.sim.attacks.craft_colluding: 3 colluders at one crafted point, each
    with a little noise of its own, among 7 honest non-IID-ish sites): the geometric median from reference_pass's
    Gram matrix against the all-float64 one: Weiszfeld weights within 1e-5 relative (the colluders, 1e-4 apart and
    carrying most of the weight, are where float32's products lose most: measured 7e-6), the median within 1e-6 of
    the honest spread (measured: one float32 rounding of the result)."""
    from fedmed.server.passes import reference_pass
    from fedmed.server.robust.geometric_median import distance_keys, geometric_median
    from fedmed.sim.attacks import Attack, craft_colluding

    rng = np.random.default_rng(11)
    glob = {"a": rng.normal(0, 0.05, (4096 * 2 + 37,)).astype(np.float32), "b": np.zeros((5, 5), np.float32)}
    drift = {k: rng.normal(0, 0.01, v.shape) for k, v in glob.items()}
    honest = [
        {k: (v + drift[k] * (1 + i % 3) + rng.normal(0, 0.01, v.shape)).astype(np.float32) for k, v in glob.items()}
        for i in range(7)
    ]
    point = craft_colluding(honest, glob, Attack(kind, 0.0 if kind.startswith("alie") else 1.0), 3)
    hostile = [{k: (v + rng.normal(0, 1e-4, v.shape)).astype(np.float32) for k, v in point.items()} for _ in range(3)]
    ups = honest + hostile
    keys = distance_keys(glob)
    w = rng.uniform(1, 3, len(ups))
    w /= w.sum()
    found = reference_pass(ups, keys, [[7, 8, 9]])  # the colluders voting once, as the engine counts a near-copy group
    fast, slow = geometric_median(ups, w, gram=found.gram), geometric_median(ups, w)
    assert fast.iterations == slow.iterations
    np.testing.assert_allclose(fast.site_weights, slow.site_weights, rtol=1e-5, atol=1e-7)
    spread = float(np.std([u["a"] for u in honest]))
    for key in keys:
        np.testing.assert_allclose(fast.median[key], slow.median[key], atol=1e-6 * spread)
