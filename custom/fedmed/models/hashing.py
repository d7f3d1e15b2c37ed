"""Content hash of a whole model (clear part + ciphertexts); the clear part by fedmed.models.weights.params_sha256."""

from __future__ import annotations

import hashlib
from typing import Mapping, Optional

import numpy as np

from fedmed.models.weights import params_sha256


def model_sha256(params: Mapping[str, np.ndarray], encrypted_block=None) -> str:
    """Hash of the clear parameters, extended with the ciphertexts when some layers are encrypted."""
    return with_ciphertexts(params_sha256(params), encrypted_block)


def with_ciphertexts(sha: str, encrypted_block=None) -> str:
    """model_sha256 given the clear parameters' params_sha256 (computed elsewhere, e.g. fedmed.server.passes.hash_and_norm):
    that hash itself without encrypted layers, else extended with the ciphertexts' hash."""
    if encrypted_block is None:
        return sha
    from fedmed.security import ckks  # TenSEAL only when HE is in use

    enc_sha = ckks.encrypted_sha256(
        ckks.EncryptedLayers.from_wire(encrypted_block)
        if not isinstance(encrypted_block, ckks.EncryptedLayers)
        else encrypted_block
    )
    return hashlib.sha256(f"{sha}:{enc_sha}".encode()).hexdigest()


def optional_model_sha256(params: Optional[Mapping[str, np.ndarray]], encrypted_block=None) -> Optional[str]:
    return None if params is None else model_sha256(params, encrypted_block)
