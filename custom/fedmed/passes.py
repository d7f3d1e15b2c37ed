"""Single passes over one update, chunk by chunk in cache: its L2 distance to another state, and its content hash
fused with its distance to the global model (the screening's per-site work).

Why chunked: the obvious `np.subtract(u, c, dtype=float64)` then a dot allocates a float64 copy of each parameter
(up to 8 MB, fresh pages from the kernel each time), writes it and reads it back: 24 bytes of memory traffic per
value instead of the 8 read here (two float32 inputs), for the same float64 sum to rounding (one float64 buffer of
CHUNK values, reused). Why one BLAS thread: the dot of a chunk is memory- and latency-bound; with OpenBLAS's pool
of threads it took 40x the CPU on a loaded 2-core machine (0.46-0.74 s instead of 12 ms per DenseNet-121 update,
docs/bench_scale.md#passes-over-the-updates), and the server's threads (fedmed.parallel) already run one update each.
"""

from __future__ import annotations

import hashlib
from typing import Mapping, Sequence

import numpy as np

from fedmed.parallel import limited_blas

CHUNK = 1 << 15  # values per chunk: 256 kB of float64, in L2 beside the two float32 slices it is made from


def _sq_diff(a: np.ndarray, b: np.ndarray, buf: np.ndarray) -> float:
    """sum((a - b)^2) over flat arrays of equal size, the difference taken in float64 chunk by chunk in `buf`."""
    sq = 0.0
    for start in range(0, a.size, CHUNK):
        stop = min(a.size, start + CHUNK)
        d = buf[: stop - start]
        np.subtract(a[start:stop], b[start:stop], out=d, dtype=np.float64)
        sq += float(np.dot(d, d))
    return sq


def squared_distance(update: Mapping[str, np.ndarray], center: Mapping[str, np.ndarray], keys: Sequence[str]) -> float:
    """sum over `keys` of ||update[k] - center[k]||^2, accumulated in float64, in one pass over both."""
    buf = np.empty(CHUNK, np.float64)
    sq = 0.0
    with limited_blas(1):
        for k in keys:
            sq += _sq_diff(np.asarray(update[k]).reshape(-1), np.asarray(center[k]).reshape(-1), buf)
    return sq


def hash_and_norm(
    params: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray], keys: Sequence[str]
) -> tuple[str, float]:
    """(fedmed.weights.params_sha256(params), fedmed.aggregation.update_norm(params, reference, keys)) in one pass:
    each chunk of an update is hashed and, for the distance keys, its difference to the global model squared and
    summed while it is in cache. The digest is byte for byte params_sha256's (the same SHA-256 stream: name, dtype,
    shape, then the array's bytes), so records stay comparable with earlier rounds and runs."""
    h = hashlib.sha256()
    wanted = set(keys)
    buf = np.empty(CHUNK, np.float64)
    sq = 0.0
    with limited_blas(1):
        for k in sorted(params):
            v = np.ascontiguousarray(params[k])
            h.update(k.encode())
            h.update(str(v.dtype).encode())
            h.update(str(v.shape).encode())
            flat = v.reshape(-1)
            raw = flat.view(np.uint8)
            if k not in wanted:
                h.update(raw)
                continue
            ref = np.asarray(reference[k]).reshape(-1)
            step = CHUNK * flat.itemsize
            for start in range(0, flat.size, CHUNK):
                stop = min(flat.size, start + CHUNK)
                h.update(raw[start * flat.itemsize : start * flat.itemsize + step])
                d = buf[: stop - start]
                np.subtract(flat[start:stop], ref[start:stop], out=d, dtype=np.float64)
                sq += float(np.dot(d, d))
    return h.hexdigest(), float(np.sqrt(sq))
