"""fedmed.server.kernels: the compiled selection network gives np.median's values exactly."""

import numpy as np
import pytest

from fedmed.server.kernels import batcher_comparators, median_comparators, middle_of_rows


@pytest.mark.parametrize("k", [2, 3, 4, 5, 7, 8, 16, 17, 33, 50, 64, 101])
def test_batcher_network_sorts_every_zero_one_input_of_small_sizes_and_random_rows(k):
    """A comparator network sorts everything iff it sorts every 0-1 input (Knuth's 0-1 principle): all of them up to
    k = 16, random ones beyond, and random real rows."""
    pairs = batcher_comparators(k)
    rng = np.random.default_rng(k)
    if k <= 16:
        bits = ((np.arange(2**k)[None, :] >> np.arange(k)[:, None]) & 1).astype(np.float64)
    else:
        bits = rng.integers(0, 2, (k, 4000)).astype(np.float64)
    for rows in (bits, rng.standard_normal((k, 500))):
        r = rows.copy()
        for lo, hi in pairs:
            a, b = np.minimum(r[lo], r[hi]), np.maximum(r[lo], r[hi])
            r[lo], r[hi] = a, b
        assert np.array_equal(r, np.sort(rows, axis=0))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 10, 16, 17, 49, 50, 51, 100])
def test_middle_of_rows_is_np_median_exactly(k, dtype):
    rng = np.random.default_rng(100 + k)
    rows = rng.standard_normal((k, 3001)).astype(dtype) * np.logspace(-30, 30, 3001).astype(dtype)
    rows[:, :40] = np.round(rows[:, :40] * 0)  # ties (all zero)
    rows[:, 40:80] = rng.integers(-2, 3, (k, 40))  # ties among a few values
    rows[0, 80:100] = np.finfo(dtype).max  # extremes: an even count's two middle values still add finitely
    got = middle_of_rows(rows.copy())
    want = np.median(rows, axis=0)
    assert got.dtype == dtype
    assert np.array_equal(got, want.astype(dtype))


def test_pruned_network_keeps_what_the_middle_depends_on():
    assert len(median_comparators(50)) < len(batcher_comparators(50))
    assert len(median_comparators(1)) == 0
    with pytest.raises(ValueError, match="median of 0 rows"):
        median_comparators(0)


def test_middle_of_rows_refuses_what_it_cannot_take():
    with pytest.raises(ValueError, match="float16"):
        middle_of_rows(np.zeros((3, 4), np.float16))
    with pytest.raises(ValueError, match="C-contiguous"):
        middle_of_rows(np.zeros((4, 3), np.float32).T)


@pytest.mark.parametrize(
    ("a_dtype", "b_dtype"), [(np.float32, np.float32), (np.float64, np.float64), (np.float32, np.float64)]
)
def test_move_stats_is_the_float64_formula(a_dtype, b_dtype):
    from fedmed.server.kernels import move_stats

    rng = np.random.default_rng(3)
    b = (rng.standard_normal(100_003) * np.logspace(-20, 20, 100_003)).astype(b_dtype)
    a = (b + rng.standard_normal(b.size) * 1e-3).astype(a_dtype)
    a[:100] = b[:100]  # unmoved coordinates count as neither up nor down
    b[:100] = a[:100]  # (exactly equal where the dtypes differ)
    sq, up, down = move_stats(a, b)
    d = a.astype(np.float64) - b.astype(np.float64)
    assert sq == pytest.approx(float(d @ d), rel=1e-12)
    assert (up, down) == (int(np.count_nonzero(a > b)), int(np.count_nonzero(a < b)))
    assert up + down <= b.size - 100


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_move_stats_sum_is_non_finite_exactly_when_a_value_is(bad):
    from fedmed.server.kernels import move_stats

    b = np.zeros(1000, np.float32)
    a = np.full(1000, np.finfo(np.float32).max, np.float32)  # finite: its float64 squares do not overflow
    assert np.isfinite(move_stats(a, b)[0])
    a[517] = bad
    assert not np.isfinite(move_stats(a, b)[0])


def test_move_stats_refuses_what_it_cannot_take():
    from fedmed.server.kernels import move_stats

    with pytest.raises(ValueError, match="one size"):
        move_stats(np.zeros(3, np.float32), np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="float16"):
        move_stats(np.zeros(3, np.float16), np.zeros(3, np.float32))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_weighted_rows_is_the_float64_sum_cast_once(dtype):
    from fedmed.server.kernels import weighted_rows

    rng = np.random.default_rng(4)
    rows = rng.standard_normal((7, 5003)).astype(dtype)
    beta = rng.uniform(0, 1, 7)
    beta /= beta.sum()
    out = np.empty(5003, dtype)
    weighted_rows(rows[:, :5003], beta, out)
    want = np.zeros(5003, np.float64)
    for b, r in zip(beta, rows):
        want += b * r.astype(np.float64)
    assert np.array_equal(out, want.astype(dtype))
    part = np.empty(100, dtype)
    weighted_rows(rows[:, 50:150], beta, part)  # a block of a wider buffer: rows not adjacent in memory
    assert np.array_equal(part, want[50:150].astype(dtype))


def test_weighted_rows_refuses_mismatched_shapes_and_dtypes():
    from fedmed.server.kernels import weighted_rows

    with pytest.raises(ValueError, match="weights"):
        weighted_rows(np.zeros((3, 4), np.float32), np.ones(2), np.empty(4, np.float32))
    with pytest.raises(ValueError, match="int64 rows"):
        weighted_rows(np.zeros((3, 4), np.int64), np.ones(3), np.empty(4, np.float32))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_add_centred_gram_centres_in_place_and_adds_float64_products(dtype):
    from fedmed.server.kernels import add_centred_gram

    rng = np.random.default_rng(6)
    rows = (rng.standard_normal((4, 40_000)) * 1e3).astype(dtype)
    rows[1, :10] = dtype(3e37)  # float32 squares beyond float32's range stay finite in float64
    centre = np.median(rows, axis=0).astype(dtype)
    centred = rows - centre
    gram = np.ones((4, 4))
    add_centred_gram(rows, centre, gram)
    assert np.array_equal(rows, centred)
    wide = centred.astype(np.float64)
    np.testing.assert_allclose(gram, 1 + wide @ wide.T, rtol=1e-12)
    assert np.array_equal(gram, gram.T)


def test_add_centred_gram_refuses_mismatched_arrays():
    from fedmed.server.kernels import add_centred_gram

    with pytest.raises(ValueError, match="centre"):
        add_centred_gram(np.zeros((2, 5), np.float32), np.zeros(4, np.float32), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="float64"):
        add_centred_gram(np.zeros((2, 5), np.float32), np.zeros(5, np.float64), np.zeros((2, 2)))


def test_kernels_compile_without_a_disk_cache_where_numba_has_nowhere_to_write_one(monkeypatch):
    """numba refuses cache=True at decoration when neither the source's folder nor a user cache folder is writable
    (a read-only install; this test runs as a user who can write both, so numba's refusal is reproduced here by its
    own message): the kernel is then compiled without a cache and still works."""
    import numba

    from fedmed.server import kernels

    real = numba.njit

    def refusing(*args, **options):
        if options.get("cache"):
            raise RuntimeError("cannot cache function 'f': no locator available for file '/ro/kernels.py'")
        return real(*args, **options)

    monkeypatch.setattr(numba, "njit", refusing)

    @kernels._compiled()
    def double(x):
        return 2 * x

    assert double(21) == 42


def test_warm_up_loads_every_kernel_for_both_dtypes():
    from fedmed.server import kernels

    kernels._warm = False
    kernels.warm_up()
    assert kernels._warm
    for fn in (kernels._compare_exchange, kernels._move_stats, kernels._weighted_rows, kernels._add_centred_gram):
        assert {str(sig[0].dtype) for sig in fn.signatures} == {"float32", "float64"}
