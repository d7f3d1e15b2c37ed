"""Pseudonyms for what leaves the clinician's workstation: HMAC-SHA256 of an identifier under a site secret.

A plain hash of a PatientID can be reversed by hashing every plausible ID; a keyed hash cannot without the key, and
the same key gives the same pseudonym, so one patient's studies stay linkable in the inference log.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path
from typing import Optional

ENV_PSEUDONYM_KEY = "FEDMED_PSEUDONYM_KEY"
MIN_KEY_BYTES = 16


def load_pseudonym_key(key_file: Optional[Path] = None) -> bytes:
    """The site secret: the contents of key_file, else $FEDMED_PSEUDONYM_KEY. Raises naming both when neither is
    set, or when the key is shorter than MIN_KEY_BYTES (a short key can be guessed)."""
    if key_file is not None:
        path = Path(key_file)
        if not path.is_file():
            raise FileNotFoundError(f"pseudonym key file not found: {path}")
        key, origin = path.read_bytes().strip(), str(path)
    else:
        key, origin = os.environ.get(ENV_PSEUDONYM_KEY, "").strip().encode(), f"${ENV_PSEUDONYM_KEY}"
        if not key:
            raise ValueError(
                f"no pseudonym key: give --pseudonym-key-file or set {ENV_PSEUDONYM_KEY} (a site secret, "
                f"e.g. `python -c 'import secrets; print(secrets.token_hex(32))'`)"
            )
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(f"pseudonym key from {origin} is {len(key)} bytes; at least {MIN_KEY_BYTES} are required")
    return key


def pseudonymise(key: bytes, kind: str, value: str) -> str:
    """64 hex characters. kind ("patient", "study") separates namespaces: a study UID never collides with an ID."""
    return hmac.new(key, f"{kind}:{value}".encode(), hashlib.sha256).hexdigest()
