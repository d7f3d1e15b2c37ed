"""Content hashes of models and updates.

- model_sha256 / with_ciphertexts: a whole model (clear part by fedmed.models.weights.params_sha256, + ciphertexts).
  SHA-256, what model files, their meta and the rounds' global_model_sha256 hold: other tools verify them.
- params_blake3 / update_blake3: the digest the server records for each site's update (client_updates.update_blake3)
  and what a signature covers (fedmed.security.signing). The same stream as params_sha256 (each name, str(dtype),
  str(shape), the array's bytes, names sorted) through BLAKE3, a collision-resistant 256-bit hash: 8.2 against
  SHA-256's 16.4 ms of CPU over DenseNet-121's 727 arrays on one core here (2.6x over one large buffer; small arrays
  do not fill its SIMD lanes). Issue 30: the server's hashes of every update were its largest single cost.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from typing import Mapping, Optional

import blake3
import numpy as np


def model_sha256(params: Mapping[str, np.ndarray], encrypted_block=None) -> str:
    """Hash of the clear parameters, extended with the ciphertexts when some layers are encrypted."""
    from fedmed.models.weights import params_sha256  # torch: not for the digests below (signing loads without it)

    return with_ciphertexts(params_sha256(params), encrypted_block)


def with_ciphertexts(sha: str, encrypted_block=None) -> str:
    """model_sha256 given the clear parameters' params_sha256 (computed elsewhere, e.g. fedmed.models.weights.remember_digest):
    that hash itself without encrypted layers, else extended with the ciphertexts' hash."""
    if encrypted_block is None:
        return sha
    from fedmed.security import ckks  # TenSEAL only when HE is in use

    enc_sha = ckks.encrypted_sha256(_layers(encrypted_block))
    return hashlib.sha256(f"{sha}:{enc_sha}".encode()).hexdigest()


def _layers(encrypted_block):
    from fedmed.security import ckks

    if isinstance(encrypted_block, ckks.EncryptedLayers):
        return encrypted_block
    return ckks.EncryptedLayers.from_wire(encrypted_block)


def optional_model_sha256(params: Optional[Mapping[str, np.ndarray]], encrypted_block=None) -> Optional[str]:
    return None if params is None else model_sha256(params, encrypted_block)


@lru_cache(maxsize=4096)
def stream_header(dtype: np.dtype, shape: tuple) -> bytes:
    """str(dtype) + str(shape), the bytes hashed before each array in a parameter stream: str of a dtype costs ~20 us,
    and the server hashes each round's ~700 layers for every site (fedmed.server.passes.update_pass)."""
    return str(dtype).encode() + str(shape).encode()


def feed_params(h, params: Mapping):
    """Feed hasher h the parameter stream params_sha256 and params_blake3 hash (names sorted; each name, str(dtype),
    str(shape), then the array's own bytes, without a copy); returns h. Numeric arrays only: an object array has no
    bytes of its own to hash."""
    for k in sorted(params):
        v = np.ascontiguousarray(params[k])
        if v.dtype.hasobject:
            raise ValueError(f"parameter {k!r} has dtype object: only numeric arrays can be hashed")
        h.update(k.encode())
        h.update(stream_header(v.dtype, v.shape))
        h.update(v.reshape(-1).view(np.uint8))
    return h


def params_blake3_bytes(params: Mapping) -> bytes:
    """The 32-byte BLAKE3 of params_sha256's stream (fedmed.server.passes.update_pass hashes the same bytes, fused
    with its other work)."""
    return feed_params(blake3.blake3(), params).digest()


def params_blake3(params: Mapping) -> str:
    """params_blake3_bytes as hex, as the record holds it."""
    return params_blake3_bytes(params).hex()


def update_blake3(clear_blake3: str, encrypted_block=None) -> str:
    """The recorded digest of an update given its clear part's params_blake3: that digest itself without encrypted
    layers, else BLAKE3 over it and the ciphertexts' BLAKE3 (the stream fedmed.security.ckks.encrypted_sha256 hashes:
    each layer's name and shape, then every chunk)."""
    if encrypted_block is None:
        return clear_blake3
    layers = _layers(encrypted_block)
    h = blake3.blake3()
    for name, shape in zip(layers.names, layers.shapes):
        h.update(f"{name}{shape}".encode())
    for c in layers.chunks:
        h.update(c)
    return blake3.blake3(f"{clear_blake3}:{h.hexdigest()}".encode()).hexdigest()


class KnownDigest:
    """A hasher whose digest is already known (hex): update() does nothing. For a pass that would otherwise hash bytes
    someone has just hashed the same way (fedmed.server.passes.update_pass given the digest signature verification
    took of the same arrays)."""

    def __init__(self, hexdigest: str):
        if not isinstance(hexdigest, str) or len(hexdigest) != 64 or hexdigest.strip("0123456789abcdef"):
            raise ValueError(f"a known digest must be 64 hex characters, got {hexdigest!r}")
        self._hex = hexdigest

    def update(self, _data) -> None:
        pass

    def hexdigest(self) -> str:
        return self._hex
