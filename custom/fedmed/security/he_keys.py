"""CKKS keys made at a hospital, not at provisioning: the key custodian's side of selective HE.

Pure core (no NVFlare). One hospital, the key custodian, runs `scripts/he_keys.py make --out DIR` on its own machine:

    DIR/server/server_context.tenseal        secret-free context -> the FL admin (installs it in the server kit)
    DIR/hospitals/client_context.tenseal     context WITH the secret key -> every hospital, out of band
    DIR/hospitals/he_key_id.txt              sha256 of the server context: ties the two together

Each site's IT installs its part with `site_configs/install.sh <kit> <site> --he-context FILE` (server: the server
context, into startup/, where fedmed's controller reads it; hospitals: the client context and key id, into local/).
Provisioning creates no keys, so neither the provisioning machine nor the server operator ever holds the secret key.

What this does not change: all hospitals share one secret key (the server aggregates ciphertexts under one key), so
the server (which holds each site's ciphertext) together with any one hospital (which holds the key) can decrypt a
single site's head. The guarantee rests on the server operator not colluding with a hospital (docs/THREAT_MODEL.md).
"""

from __future__ import annotations

import os
from pathlib import Path

from fedmed.security.ckks import (
    CLIENT_CONTEXT_FILE,
    KEY_ID_FILE,
    SERVER_CONTEXT_FILE,
    KeySet,
    generate_key_set,
    load_client_context,
    load_server_context,
)

SERVER_DIR = "server"
HOSPITALS_DIR = "hospitals"


def make_key_set(out: Path) -> KeySet:
    """A fresh key set written under out/ (server/ public, hospitals/ secret, mode 0600). Refuses to overwrite:
    replacing a federation's keys by accident would lock every hospital out of the current global model."""
    out = Path(out)
    targets = [
        out / SERVER_DIR / SERVER_CONTEXT_FILE,
        out / HOSPITALS_DIR / CLIENT_CONTEXT_FILE,
        out / HOSPITALS_DIR / KEY_ID_FILE,
    ]
    existing = [str(t) for t in targets if t.exists()]
    if existing:
        raise FileExistsError(f"{existing} already exist; a key set is never overwritten (choose another --out)")
    keys = generate_key_set()
    (out / SERVER_DIR).mkdir(parents=True, exist_ok=True)
    (out / HOSPITALS_DIR).mkdir(parents=True, exist_ok=True)
    os.chmod(out / HOSPITALS_DIR, 0o700)
    _write(targets[0], keys.server_context, 0o644)
    _write(targets[1], keys.client_context, 0o600)
    _write(targets[2], (keys.key_id + "\n").encode(), 0o644)
    return keys


def _write(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def install_server_context(source: Path, kit: Path) -> str:
    """Copy the custodian's server context into the server kit's startup/ (where fedmed's controller reads it).
    Refuses a context holding a secret key. Returns the key id."""
    loaded = load_server_context(Path(source))  # PermissionError if it holds a secret key
    dest = Path(kit) / "startup" / SERVER_CONTEXT_FILE
    dest.write_bytes(Path(source).read_bytes())
    return loaded.key_id


def install_client_context(source: Path, kit: Path) -> str:
    """Copy the custodian's client context and its key id into a hospital kit's local/ (the site's own folder;
    fedmed's trainer reads it there before startup/). Refuses a context without a secret key, or without the key
    id beside it. Returns the key id."""
    source = Path(source)
    loaded = load_client_context(source)  # PermissionError if it holds no secret key
    if loaded.key_id is None:
        raise FileNotFoundError(f"no {KEY_ID_FILE} beside {source}: install the custodian's hospitals/ folder whole")
    local = Path(kit) / "local"
    _replace(local / CLIENT_CONTEXT_FILE, source.read_bytes(), 0o600)
    _replace(local / KEY_ID_FILE, (loaded.key_id + "\n").encode(), 0o644)
    return loaded.key_id


def _replace(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
