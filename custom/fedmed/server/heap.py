"""Give a round's freed memory back to the operating system at the end of the round (gc, then glibc's malloc_trim).

A server round allocates and frees hundreds of megabytes in buffers of a few megabytes (every site's update
deserialised, the aggregate, the model saved and sent). glibc serves buffers of that size from its heaps once its
dynamic mmap threshold has risen past them, and a heap only shrinks from its top: the freed pages below a buffer
still in use stay resident. Some buffers are not even freed until Python's oldest generation is collected (they
hang off reference cycles). Measured in NVFlare's simulator (docs/benchmarks.md#scale-many-hospitals), a server's
RSS grew ~35 MB per round under fedmed's Controller and as much under NVFlare's own FedAvg while the Python heap
(tracemalloc, after a collection) stayed flat; a full collection then malloc_trim(0) at the end of each round keeps
it flat. Python has no call for the trim (ctypes is the only way), and other C libraries (musl, macOS) have no
such call: trim_heap() then does nothing.

FEDMED_TRIM_HEAP=0 in the server's environment turns both off (to measure the growth without them);
FEDMED_TRIM_HEAP=1 also applies them under the benchmarks' NVFlare FedAvg (fedmed.flare.probes.ProbedFedAvg).
"""

from __future__ import annotations

import ctypes
import gc
import os
from functools import lru_cache

ENV_TRIM_HEAP = "FEDMED_TRIM_HEAP"
_frozen = False  # release_round_memory has frozen the objects that outlive start-up and the first round


@lru_cache(maxsize=1)
def _malloc_trim():
    """glibc's malloc_trim from the C library this process runs on, or None where that is not glibc."""
    try:
        libc = ctypes.CDLL(None)  # the symbols the process already has: its own C library's
    except OSError:  # Windows: no such handle
        return None
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "malloc_trim"):  # musl, macOS, ...
        return None
    trim = libc.malloc_trim
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def release_round_memory() -> bool:
    """At the end of a round: a full garbage collection, then trim_heap(). The collection frees the round's buffers
    that reference cycles still hold (messages and models that point back at their owners wait for Python's oldest
    generation, collected rarely); without it NVFlare's FedAvg server still grew ~20 MB a round with the trim. The
    first call freezes what survives its collection (gc.freeze: the imported modules, torch, NVFlare's engine,
    ~480k objects) so that later collections skip them: ~10 ms a round instead of ~350 ms of CPU. Returns
    trim_heap()'s answer. FEDMED_TRIM_HEAP=0: nothing done, False."""
    global _frozen
    if os.environ.get(ENV_TRIM_HEAP, "").strip() == "0":
        return False
    gc.collect()
    if not _frozen:
        gc.freeze()
        _frozen = True
    return trim_heap()


def trim_heap() -> bool:
    """Return the C heap's free pages to the operating system (malloc_trim(0): every arena, pages inside the heap
    as well as at its top). True where it ran (glibc), False where there is no such call. It frees nothing that is
    in use; it costs one pass over the heap's free lists (milliseconds for a server's heap). FEDMED_TRIM_HEAP=0:
    nothing done, False."""
    if os.environ.get(ENV_TRIM_HEAP, "").strip() == "0":
        return False
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
