"""fedmed.server.parallel: server threads x BLAS threads never exceed the cores, with overrides."""

import os

import numpy as np
import pytest
from threadpoolctl import threadpool_info

from fedmed.server import parallel
from fedmed.server.parallel import (
    ENV_BLAS_THREADS,
    ENV_SERVER_THREADS,
    ENV_SITE_THREADS,
    blas_threads,
    limited_blas,
    server_threads,
    simulated_site_threads,
    site_torch_threads,
    thread_map,
)


def blas_now() -> list[int]:
    return [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]


@pytest.fixture
def cores(monkeypatch):
    """Pretend the process may run on 4 cores, whatever this machine has."""
    monkeypatch.setattr(parallel, "available_cores", lambda: 4)
    for name in (ENV_SERVER_THREADS, ENV_BLAS_THREADS, ENV_SITE_THREADS):
        monkeypatch.delenv(name, raising=False)
    return 4


@pytest.mark.parametrize(
    "pool, expected",
    [
        (1, 4),  # one server thread: BLAS may use every core
        (2, 2),  # two threads share the four cores
        (3, 1),  # 4 // 3
        (8, 1),  # more threads than cores: never below one
    ],
)
def test_blas_threads_times_pool_stays_within_the_cores(cores, pool, expected):
    assert blas_threads(pool) == expected


def test_environment_overrides_every_default(cores, monkeypatch):
    monkeypatch.setenv(ENV_SERVER_THREADS, "3")
    monkeypatch.setenv(ENV_BLAS_THREADS, "4")
    monkeypatch.setenv(ENV_SITE_THREADS, "2")
    assert (server_threads(), blas_threads(3), site_torch_threads()) == (3, 4, 2)


def test_site_threads_default_to_torchs_choice_and_share_the_cores_in_the_simulator(cores):
    assert site_torch_threads() is None
    assert [simulated_site_threads(n) for n in (1, 2, 3, 5)] == [4, 2, 1, 1]


@pytest.mark.parametrize(
    "name, value, match",
    [
        (ENV_BLAS_THREADS, "two", r"\$FEDMED_BLAS_THREADS must be a whole number of threads, got 'two'"),
        (ENV_BLAS_THREADS, "0", r"\$FEDMED_BLAS_THREADS must be >= 1, got 0"),
        (ENV_SITE_THREADS, "-1", r"\$FEDMED_SITE_THREADS must be >= 1, got -1"),
        (ENV_SERVER_THREADS, "1.5", r"\$FEDMED_SERVER_THREADS must be a whole number"),
    ],
)
def test_bad_thread_settings_are_refused_naming_the_variable(monkeypatch, name, value, match):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=match):
        {ENV_BLAS_THREADS: blas_threads, ENV_SITE_THREADS: site_torch_threads, ENV_SERVER_THREADS: server_threads}[
            name
        ](*((2,) if name == ENV_BLAS_THREADS else ()))


def test_blas_is_limited_while_the_server_threads_run_and_restored_after(monkeypatch):
    before = blas_now()
    if not before:
        pytest.skip("no BLAS library that threadpoolctl can see")
    monkeypatch.setenv(ENV_BLAS_THREADS, "1")
    seen = thread_map(lambda _: blas_now(), range(4), threads=2)
    assert seen == [[1] * len(before)] * 4
    assert blas_now() == before


def test_nested_limits_hold_until_the_outermost_ends():
    before = blas_now()
    if not before:
        pytest.skip("no BLAS library that threadpoolctl can see")
    with limited_blas(1):
        with limited_blas(1):
            pass
        assert blas_now() == [1] * len(before)  # the inner block's end did not restore the original
    assert blas_now() == before


def test_thread_map_keeps_order_and_results_under_the_limit(monkeypatch):
    monkeypatch.setenv(ENV_BLAS_THREADS, "1")
    rng = np.random.default_rng(0)
    mats = [rng.standard_normal((64, 64)) for _ in range(6)]
    got = thread_map(lambda m: m @ m.T, mats, 3)
    assert all(np.allclose(a, m @ m.T, rtol=1e-12, atol=1e-12) for a, m in zip(got, mats))


def test_benchmark_thread_modes_set_and_restore_the_blas_limit(monkeypatch):
    from fedmed.cli.bench_threads import THREAD_MODES, thread_mode

    monkeypatch.delenv(ENV_BLAS_THREADS, raising=False)
    before = blas_now()
    seen = {}
    for mode in THREAD_MODES:
        with thread_mode(mode):
            seen[mode] = (blas_now(), os.environ.get(ENV_BLAS_THREADS))
    assert seen["one-thread"][0] == [1] * len(before)
    assert seen["oversubscribed"][1] == str(parallel.available_cores())  # every server thread gets all the cores
    assert seen["default"] == (before, None)
    assert blas_now() == before and ENV_BLAS_THREADS not in os.environ
    with pytest.raises(ValueError, match="unknown thread mode 'fast'; choose one of"):
        with thread_mode("fast"):
            pass
