"""Give the C heap's free memory back to the operating system at the end of a round (glibc's malloc_trim).

A server round allocates and frees hundreds of megabytes in buffers of a few megabytes (every site's update
deserialised, the aggregate, the model saved and sent). glibc serves buffers of that size from its heaps once its
dynamic mmap threshold has risen past them, and a heap only shrinks from its top: the freed pages below a buffer
still in use stay resident. Measured in NVFlare's simulator (docs/benchmarks.md#scale-many-hospitals), a server's
RSS grew ~35 MB per round under fedmed's Controller and as much under NVFlare's own FedAvg, with no Python object
growing; malloc_trim(0) at the end of each round keeps it flat. Python has no call for this (ctypes is the only
way), and on other C libraries (musl, macOS) there is nothing to call: trim_heap() then does nothing.

FEDMED_TRIM_HEAP=0 in the server's environment turns the trim off (to measure the growth without it);
FEDMED_TRIM_HEAP=1 also trims under the benchmarks' NVFlare FedAvg (fedmed.flare.probes.ProbedFedAvg).
"""

from __future__ import annotations

import ctypes
import os
from functools import lru_cache

ENV_TRIM_HEAP = "FEDMED_TRIM_HEAP"


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
