"""fedmed.server.heap: at the end of a round the server collects reference cycles and gives freed heap pages back to the OS."""

import gc
import weakref

import pytest

from fedmed.cli.bench_sim import memory_now
from fedmed.server import heap
from fedmed.server.heap import _malloc_trim, release_round_memory, trim_heap


@pytest.fixture(autouse=True)
def _unfreeze_after():
    """release_round_memory freezes what this process holds the first time; undone for the rest of the suite."""
    yield
    gc.unfreeze()
    heap._frozen = False


@pytest.mark.skipif(_malloc_trim() is None, reason="malloc_trim is glibc's")
def test_trim_returns_the_freed_pages_a_live_buffer_pins_below_it(monkeypatch):
    monkeypatch.delenv("FEDMED_TRIM_HEAP", raising=False)
    # 300 MB in 100 kB buffers (below glibc's mmap threshold, so from the heap, as a server's freed update buffers
    # are once the threshold has risen); every 20th kept alive, so the heap cannot shrink from its top.
    # The suite's earlier tests leave free chunks in this process's heap: give them back first, so the buffers below
    # fault in fresh pages whatever the allocator held before (else they reuse resident ones and RSS does not move).
    trim_heap()
    before = memory_now()[0]
    blocks = [bytearray(100_000) for _ in range(3000)]
    kept = blocks[::20]
    del blocks
    held = memory_now()[0] - before
    assert held > 200 * 2**20  # the freed 285 MB are still resident: what the server's RSS growth was
    assert trim_heap() is True
    after = memory_now()[0] - before
    assert after < held / 3, f"RSS above the start: {held >> 20} MB before the trim, {after >> 20} MB after"
    assert len(kept) == 150 and all(len(b) == 100_000 for b in kept)  # what is in use is untouched


class _Message:
    """A buffer that points back at its owner, as NVFlare's messages and models do."""

    def __init__(self):
        self.buffer = bytearray(20_000_000)
        self.me = self


def test_release_frees_buffers_held_by_reference_cycles(monkeypatch):
    monkeypatch.delenv("FEDMED_TRIM_HEAP", raising=False)
    gc.disable()  # the cycle stays until a collection: at the end of a round, the one release_round_memory makes
    try:
        message = _Message()
        alive = weakref.ref(message)
        del message
        assert alive() is not None
        assert release_round_memory() is (_malloc_trim() is not None)
        assert alive() is None
        assert gc.get_freeze_count() > 0  # start-up's objects: later collections skip them
        message = _Message()  # a round's garbage after the freeze is still collected
        alive = weakref.ref(message)
        del message
        release_round_memory()
        assert alive() is None
    finally:
        gc.enable()


def test_release_and_trim_can_be_turned_off_to_measure_the_growth_without_them(monkeypatch):
    monkeypatch.setenv("FEDMED_TRIM_HEAP", "0")
    assert trim_heap() is False and release_round_memory() is False
