"""fedmed.heap: the server's end-of-round malloc_trim gives freed heap pages back to the operating system."""

import pytest

from fedmed.cli.bench_sim import memory_now
from fedmed.heap import _malloc_trim, trim_heap


@pytest.mark.skipif(_malloc_trim() is None, reason="malloc_trim is glibc's")
def test_trim_returns_the_freed_pages_a_live_buffer_pins_below_it(monkeypatch):
    monkeypatch.delenv("FEDMED_TRIM_HEAP", raising=False)
    # 300 MB in 100 kB buffers (below glibc's mmap threshold, so from the heap, as a server's freed update buffers
    # are once the threshold has risen); every 20th kept alive, so the heap cannot shrink from its top.
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


def test_trim_can_be_turned_off_to_measure_the_growth_without_it(monkeypatch):
    monkeypatch.setenv("FEDMED_TRIM_HEAP", "0")
    assert trim_heap() is False
