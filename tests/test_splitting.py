import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmed.data.splitting import dirichlet_partition, primary_class, train_val_split


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(20, 300),
    k=st.integers(1, 6),
    sites=st.integers(1, 5),
    alpha=st.floats(0.05, 100.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_partition_is_a_partition(n, k, sites, alpha, seed):
    classes = np.random.default_rng(seed).integers(0, k, n)
    parts = dirichlet_partition(classes, sites, alpha, seed, min_size=1)
    allidx = np.concatenate(parts)
    assert len(parts) == sites
    assert len(allidx) == n and len(np.unique(allidx)) == n  # disjoint and complete
    assert all(len(p) >= 1 for p in parts)
    again = dirichlet_partition(classes, sites, alpha, seed, min_size=1)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))  # deterministic


def test_small_alpha_skews_labels_more_than_large_alpha():
    classes = np.repeat(np.arange(4), 250)

    def skew(alpha):
        parts = dirichlet_partition(classes, 4, alpha, seed=1)
        hist = np.stack([np.bincount(classes[p], minlength=4) / len(p) for p in parts])
        return np.abs(hist - 0.25).mean()

    assert skew(0.1) > 2 * skew(100.0)


@settings(max_examples=50, deadline=None)
@given(n=st.integers(2, 500), frac=st.floats(0.01, 0.99), seed=st.integers(0, 1000))
def test_train_val_split_properties(n, frac, seed):
    tr, va = train_val_split(n, frac, seed)
    assert len(tr) >= 1 and len(va) >= 1 and len(tr) + len(va) == n
    assert set(tr).isdisjoint(va)


def test_primary_class_prefers_the_rarest_positive():
    labels = np.array([[1, 1, 0], [1, 0, 0], [0, 0, 0], [1, 0, 0]])  # finding 1 is rarer than finding 0
    assert primary_class(labels).tolist() == [1, 0, 3, 0]


@pytest.mark.parametrize(
    "args, match",
    [
        ((np.zeros(10), 0, 1.0, 0), "num_sites"),
        ((np.zeros(10), 2, 0.0, 0), "alpha"),
        ((np.zeros(3), 2, 1.0, 0, 2), "cannot give 2 sites 2 samples"),
    ],
)
def test_partition_rejects_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        dirichlet_partition(*args)
