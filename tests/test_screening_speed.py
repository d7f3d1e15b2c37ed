"""find_statistics_problem's all-layers pass (fedmed.server.screening._statistics_pass) agrees with its layer-by-layer walk:
an update the walk would reject is never waved through, and the sentence is the walk's."""

import numpy as np
import pytest

from fedmed.server import screening
from fedmed.server.screening import find_statistics_problem

LAYERS = 5


def _reference(rng):
    ref = {}
    for i in range(LAYERS):
        ref[f"l{i}.weight"] = rng.standard_normal(4).astype(np.float32)
        ref[f"l{i}.running_mean"] = rng.standard_normal(4).astype(np.float32)
        ref[f"l{i}.running_var"] = rng.uniform(0.5, 2.0, 4).astype(np.float32)
        ref[f"l{i}.num_batches_tracked"] = np.array(10, np.int64)
    return ref


def _walk(update, reference, factor):
    """The layer-by-layer walk alone (the pass told it is not all clear)."""
    saved = screening._statistics_pass
    screening._statistics_pass = lambda *a: False
    try:
        return find_statistics_problem(update, reference, factor)
    finally:
        screening._statistics_pass = saved


HOSTILE = [
    lambda u, i: u.__setitem__(f"l{i}.running_var", np.full(4, -1.0, np.float32)),
    lambda u, i: u.__setitem__(f"l{i}.running_var", u[f"l{i}.running_var"] * np.float32(150)),
    lambda u, i: u.__setitem__(f"l{i}.running_var", u[f"l{i}.running_var"] / np.float32(150)),
    lambda u, i: u.__setitem__(f"l{i}.running_mean", u[f"l{i}.running_mean"] + np.float32(1e4)),
    lambda u, i: u.__setitem__(f"l{i}.running_mean", np.full(4, np.nan, np.float32)),
    lambda u, i: u.__setitem__(f"l{i}.running_var", np.full(4, np.inf, np.float32)),
    lambda u, i: u.__setitem__(f"l{i}.num_batches_tracked", np.array(-1, np.int64)),
    lambda u, i: u.__setitem__(f"l{i}.running_var", u[f"l{i}.running_var"] * np.float32(99)),  # inside the bound
    lambda u, i: None,  # honest
]


@pytest.mark.parametrize("seed", range(6))
def test_the_pass_and_the_walk_give_the_same_verdict(seed):
    rng = np.random.default_rng(seed)
    ref = _reference(rng)
    for change in HOSTILE:
        for layers in ([], [rng.integers(LAYERS)], list(rng.choice(LAYERS, 2, replace=False))):
            update = {k: np.array(v, copy=True) for k, v in ref.items()}
            for i in layers:
                change(update, int(i))
            walked = _walk(update, ref, 100.0)
            assert screening._statistics_pass(update, ref, 100.0) == (walked is None)
            assert find_statistics_problem(update, ref, 100.0) == walked


def test_a_statistic_that_does_not_convert_is_named_by_the_walk():
    rng = np.random.default_rng(0)
    ref = _reference(rng)
    update = dict(ref)
    update["l0.running_var"] = np.full(4, -2.0, np.float32)
    update["l3.running_mean"] = np.array(["a", "b", "c", "d"])  # no float64 cast: the pass gives way to the walk
    assert "l0.running_var: variance must be > 0" in find_statistics_problem(update, ref)
