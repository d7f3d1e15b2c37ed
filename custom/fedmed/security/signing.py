"""Who sent this update: hybrid post-quantum signatures (ML-DSA-65 and Ed25519, both must verify).

mTLS authenticates a connection; it leaves nothing a third party can check later. Each hospital signs a digest of
what it sends (job, round, site, the canonical bytes of every parameter, the CKKS-encrypted chunks, the claimed
sample count, metrics and privacy spend); the server signs each global model it sends. Digests are BLAKE3 (format
2, domains `fedmed-update/2` and `fedmed-global-model/2`; format 1 was SHA-256 under `/1` domains, and no format-1
digest can stand for a format-2 one): the parameters enter as their BLAKE3 over the stream the server records for
each update (fedmed.models.hashing.params_blake3), so verifying a signature also gives the server that record's
digest, and it hashes each update once. ML-DSA-65 (FIPS 204) guards
against a future quantum forger, Ed25519 against a flaw in the young ML-DSA implementations: a forger must break
both. Both come from `cryptography` (OpenSSL), which is constant-time, unlike pure-Python ML-DSA.

Pure module: no NVFlare. Files, all in a startup kit's local/ (nothing under startup/ is touched):
    fedmed_signing.key        private keys of this site (0600): ML-DSA-65 seed and Ed25519 key, hex, JSON
    fedmed_signing.pub        public key bundle (JSON) that the operator carries to the other side out of band
    site_keys/<site>.pub      server kit: the installed bundles of the hospitals
    server_signing.pub        hospital kit: the installed bundle of the server

Signature wire format (bytes): MAGIC | signer fingerprint (32) | Ed25519 signature (64) | ML-DSA-65 signature
(3309). Both signatures are over MAGIC | purpose | fingerprint | digest, so neither can be stripped, swapped to
another purpose (update vs global model) or paired with another key.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Union

import blake3
import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519, mldsa

from fedmed.models.hashing import params_blake3_bytes

ALGORITHM = "ml-dsa-65+ed25519"
MAGIC = b"FMS1"
PRIVATE_FILE = "fedmed_signing.key"
PUBLIC_FILE = "fedmed_signing.pub"
SITE_KEYS_DIR = "site_keys"
SERVER_KEY_FILE = "server_signing.pub"
PUBLIC_FORMAT = "fedmed-signing-public/1"
PURPOSE_UPDATE = b"update"
PURPOSE_GLOBAL = b"global-model"
DOMAIN_UPDATE = b"fedmed-update/2"  # /1: the SHA-256 format, never verified as this one
DOMAIN_GLOBAL = b"fedmed-global-model/2"
ED25519_SIG = 64
MLDSA65_SIG = 3309
FINGERPRINT = 32
SIGNATURE_BYTES = len(MAGIC) + FINGERPRINT + ED25519_SIG + MLDSA65_SIG
SITE_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class SignatureError(ValueError):
    """A signature is missing, malformed, from another key, or does not verify; the message says which."""


class KeyFileError(ValueError):
    """A key file is missing, malformed or too open."""


# --- keys -----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PublicKeys:
    site: str
    mldsa: mldsa.MLDSA65PublicKey
    ed25519: ed25519.Ed25519PublicKey

    @property
    def fingerprint(self) -> bytes:
        return hashlib.sha256(
            b"fedmed-signing-key/1" + self.mldsa.public_bytes_raw() + self.ed25519.public_bytes_raw()
        ).digest()

    def to_json(self) -> str:
        return (
            json.dumps(
                {
                    "format": PUBLIC_FORMAT,
                    "algorithm": ALGORITHM,
                    "site": self.site,
                    "mldsa65": self.mldsa.public_bytes_raw().hex(),
                    "ed25519": self.ed25519.public_bytes_raw().hex(),
                    "fingerprint": self.fingerprint.hex(),
                },
                indent=2,
            )
            + "\n"
        )

    @classmethod
    def from_json(cls, text: str, source: str = "public key bundle") -> "PublicKeys":
        try:
            raw = json.loads(text)
            if raw.get("format") != PUBLIC_FORMAT or raw.get("algorithm") != ALGORITHM:
                raise KeyFileError(f"{source}: not a {PUBLIC_FORMAT} {ALGORITHM} bundle")
            site = _check_site(raw["site"])
            keys = cls(
                site,
                mldsa.MLDSA65PublicKey.from_public_bytes(bytes.fromhex(raw["mldsa65"])),
                ed25519.Ed25519PublicKey.from_public_bytes(bytes.fromhex(raw["ed25519"])),
            )
        except KeyFileError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise KeyFileError(f"{source}: malformed public key bundle ({type(e).__name__}: {e})") from None
        if raw.get("fingerprint") != keys.fingerprint.hex():
            raise KeyFileError(f"{source}: fingerprint does not match its keys (edited or corrupted)")
        return keys


@dataclass(frozen=True)
class SiteKeys:
    site: str
    mldsa: mldsa.MLDSA65PrivateKey
    ed25519: ed25519.Ed25519PrivateKey

    @property
    def public(self) -> PublicKeys:
        return PublicKeys(self.site, self.mldsa.public_key(), self.ed25519.public_key())


def _check_site(site) -> str:
    if not isinstance(site, str) or not SITE_NAME.fullmatch(site):
        raise KeyFileError(f"site name {site!r} must match {SITE_NAME.pattern}")
    return site


def _write_private(path: Path, text: str) -> None:
    """0600 from the start (mkstemp), then linked into place: never readable by others, never half written, never
    overwriting a key that exists (a site's identity is not replaced by accident)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name + ".")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, path)
    except FileExistsError:
        raise KeyFileError(
            f"{path} already exists: a site keeps its signing keys (remove it to make new ones, "
            f"and install the new public key everywhere)"
        ) from None
    finally:
        os.unlink(tmp)


def generate_site_keys(local_dir: Path, site: str) -> PublicKeys:
    """Make the site's key pair in its kit's local/: private keys 0600, public bundle beside them. Refuses to replace
    existing keys. Returns the public keys."""
    local_dir = Path(local_dir)
    _check_site(site)
    local_dir.mkdir(parents=True, exist_ok=True)
    keys = SiteKeys(site, mldsa.MLDSA65PrivateKey.generate(), ed25519.Ed25519PrivateKey.generate())
    _write_private(
        local_dir / PRIVATE_FILE,
        json.dumps(
            {
                "algorithm": ALGORITHM,
                "site": site,
                "mldsa65_seed": keys.mldsa.private_bytes_raw().hex(),
                "ed25519": keys.ed25519.private_bytes_raw().hex(),
            }
        )
        + "\n",
    )
    (local_dir / PUBLIC_FILE).write_text(keys.public.to_json())
    return keys.public


def load_site_keys(local_dir: Path) -> SiteKeys:
    path = Path(local_dir) / PRIVATE_FILE
    if not path.is_file():
        raise KeyFileError(f"no signing key at {path}: run the site install (fedmed-signing-keys generate)")
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise KeyFileError(f"signing key {path} is readable by others (mode {mode:o}); chmod 600 it")
    try:
        raw = json.loads(path.read_text())
        return SiteKeys(
            _check_site(raw["site"]),
            mldsa.MLDSA65PrivateKey.from_seed_bytes(bytes.fromhex(raw["mldsa65_seed"])),
            ed25519.Ed25519PrivateKey.from_private_bytes(bytes.fromhex(raw["ed25519"])),
        )
    except (ValueError, KeyError, TypeError) as e:
        raise KeyFileError(f"{path}: malformed signing key ({type(e).__name__})") from None


def load_public_keys(path: Path) -> PublicKeys:
    path = Path(path)
    if not path.is_file():
        raise KeyFileError(f"no public key bundle at {path}")
    return PublicKeys.from_json(path.read_text(), str(path))


def install_public_keys(bundle: Path, dest: Path, expected_site: Optional[str] = None, replace: bool = False) -> Path:
    """Copy a checked public bundle to dest (e.g. <server kit>/local/site_keys/<site>.pub). A different key already
    installed there is kept unless replace=True: swapping a hospital's identity is a deliberate act."""
    keys = load_public_keys(bundle)
    if expected_site is not None and keys.site != expected_site:
        raise KeyFileError(f"{bundle} is the key of {keys.site!r}, not {expected_site!r}")
    dest = Path(dest)
    if dest.exists() and not replace:
        old = load_public_keys(dest)
        if old.fingerprint != keys.fingerprint:
            raise KeyFileError(
                f"{dest} already holds another key of {old.site!r} (fingerprint "
                f"{old.fingerprint.hex()[:16]}...); pass replace to swap it"
            )
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix="." + dest.name + ".")
    with os.fdopen(fd, "w") as f:
        f.write(keys.to_json())
    os.chmod(tmp, 0o644)
    os.replace(tmp, dest)
    return dest


def site_key_path(server_local: Path, site: str) -> Path:
    return Path(server_local) / SITE_KEYS_DIR / f"{_check_site(site)}.pub"


def load_site_public_keys(server_local: Path) -> dict[str, PublicKeys]:
    """Every hospital key installed in a server kit's local/site_keys/, by site."""
    return load_public_keys_dir(Path(server_local) / SITE_KEYS_DIR)


def load_public_keys_dir(folder: Path) -> dict[str, PublicKeys]:
    """Every <site>.pub in a folder, by site; each bundle must name its file's site."""
    if not Path(folder).is_dir():
        raise KeyFileError(f"no folder of public keys at {folder}")
    out = {}
    for path in sorted(Path(folder).glob("*.pub")):
        keys = load_public_keys(path)
        if keys.site != path.stem:
            raise KeyFileError(f"{path} holds the key of {keys.site!r}, not {path.stem!r}")
        out[keys.site] = keys
    return out


# --- canonical digests ----------------------------------------------------------------------------------------------


class _Digest:
    """BLAKE3 (32 bytes) over length-prefixed fields: no two different inputs give the same byte stream."""

    def __init__(self, domain: bytes):
        self.h = blake3.blake3()
        self.bytes(domain)

    def bytes(self, b) -> None:
        b = memoryview(b).cast("B")
        self.h.update(struct.pack(">Q", b.nbytes))
        self.h.update(b)

    def text(self, s: str) -> None:
        self.bytes(s.encode("utf-8"))

    def json(self, obj) -> None:
        try:
            self.text(json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False, default=_jsonable))
        except ValueError as e:
            raise ValueError(f"cannot sign a non-finite number: {e}") from None


def _jsonable(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.bool_):
        return bool(o)
    raise TypeError(f"cannot sign a value of type {type(o).__name__}")


@dataclass(frozen=True)
class HashedParams:
    """A parameter dict as the digests read it, hashed once (hash_params): its header (sorted names, dtype with byte
    order, shape) and the BLAKE3 of its bytes (fedmed.models.hashing.params_blake3_bytes). The header fixes every
    name, dtype and shape, so the bytes that stream holds for each array are determined: one digest, one content."""

    header: tuple
    digest: bytes

    @property
    def blake3(self) -> str:
        """The digest as the server records the update's clear part (client_updates.update_blake3, before any
        ciphertexts: fedmed.models.hashing.update_blake3)."""
        return self.digest.hex()


def hash_params(params: Mapping) -> HashedParams:
    names = sorted(params)
    if not all(isinstance(n, str) for n in names):
        raise ValueError("parameter names must be strings")
    arrays = [np.asarray(params[n]) for n in names]
    for n, a in zip(names, arrays):
        if a.dtype.hasobject:
            raise ValueError(f"parameter {n!r} has dtype object: only numeric arrays can be signed")
    header = tuple((n, a.dtype.str, tuple(a.shape)) for n, a in zip(names, arrays))
    return HashedParams(header, params_blake3_bytes(dict(zip(names, arrays))))


def _params(d: _Digest, params: Union[Mapping, HashedParams]) -> None:
    """One JSON header (sorted names, dtype with byte order, shape), then the BLAKE3 of the arrays' bytes."""
    hashed = params if isinstance(params, HashedParams) else hash_params(params)
    d.json([[n, dtype, list(shape)] for n, dtype, shape in hashed.header])
    d.bytes(hashed.digest)


def _encrypted(d: _Digest, block: Optional[Mapping]) -> None:
    if block is None:
        d.json(None)
        return
    try:
        head = {
            "names": [str(n) for n in block["names"]],
            "shapes": [[int(x) for x in s] for s in block["shapes"]],
            "key_id": block.get("key_id"),
        }
        chunks = list(block["chunks"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"malformed encrypted block: {e!r}") from None
    d.json(head)
    d.json(len(chunks))
    for c in chunks:
        if not isinstance(c, (bytes, bytearray, memoryview)):
            raise ValueError("encrypted chunks must be bytes")
        d.bytes(c)


def update_digest(
    job_id: str,
    round_num: int,
    site: str,
    params: Union[Mapping, HashedParams],
    encrypted_block: Optional[Mapping],
    num_samples: int,
    metrics: Optional[Mapping],
    privacy: Optional[Mapping],
) -> bytes:
    """32-byte digest of one site's update. params: name -> array (the plaintext part), or hash_params of it (the
    server keeps that for its record); encrypted_block: the CKKS block as sent (EncryptedLayers.to_wire()) or None;
    metrics: name -> number; privacy: e.g. epsilon, delta."""
    d = _Digest(DOMAIN_UPDATE)
    d.json(
        {
            "job_id": str(job_id),
            "round": int(round_num),
            "site": str(site),
            "num_samples": int(num_samples),
            "metrics": dict(metrics or {}),
            "privacy": dict(privacy or {}),
        }
    )
    _params(d, params)
    _encrypted(d, encrypted_block)
    return d.h.digest()


def global_model_digest(
    job_id: str, round_num: int, params: Union[Mapping, HashedParams], encrypted_block: Optional[Mapping] = None
) -> bytes:
    """32-byte digest of the global model the server sends for a round."""
    d = _Digest(DOMAIN_GLOBAL)
    d.json({"job_id": str(job_id), "round": int(round_num)})
    _params(d, params)
    _encrypted(d, encrypted_block)
    return d.h.digest()


# --- sign / verify --------------------------------------------------------------------------------------------------


def _message(purpose: bytes, fingerprint: bytes, digest: bytes) -> bytes:
    return MAGIC + struct.pack(">B", len(purpose)) + purpose + fingerprint + digest


def sign(digest: bytes, keys: SiteKeys, purpose: bytes = PURPOSE_UPDATE) -> bytes:
    if not isinstance(digest, (bytes, bytearray)) or len(digest) != 32:
        raise ValueError("digest must be the 32 bytes of update_digest / global_model_digest")
    fp = keys.public.fingerprint
    msg = _message(purpose, fp, bytes(digest))
    return MAGIC + fp + keys.ed25519.sign(msg) + keys.mldsa.sign(msg)


def sign_global_model(digest: bytes, keys: SiteKeys) -> bytes:
    return sign(digest, keys, PURPOSE_GLOBAL)


def verify(digest: bytes, signature, public_keys: PublicKeys, purpose: bytes = PURPOSE_UPDATE) -> None:
    """Returns None when both signatures verify; raises SignatureError naming what is wrong otherwise."""
    if signature is None or (isinstance(signature, (bytes, bytearray)) and len(signature) == 0):
        raise SignatureError(f"unsigned: no signature from {public_keys.site}")
    if not isinstance(signature, (bytes, bytearray)):
        raise SignatureError(f"signature must be bytes, got {type(signature).__name__}")
    signature = bytes(signature)
    if len(signature) != SIGNATURE_BYTES or not signature.startswith(MAGIC):
        raise SignatureError(
            f"malformed signature: {len(signature)} bytes, expected {SIGNATURE_BYTES} "
            f"starting with {MAGIC!r} ({ALGORITHM})"
        )
    fp = signature[len(MAGIC) : len(MAGIC) + FINGERPRINT]
    if fp != public_keys.fingerprint:
        raise SignatureError(
            f"signed with key {fp.hex()[:16]}..., not {public_keys.site}'s installed key "
            f"{public_keys.fingerprint.hex()[:16]}..."
        )
    ed_sig = signature[len(MAGIC) + FINGERPRINT : len(MAGIC) + FINGERPRINT + ED25519_SIG]
    pq_sig = signature[len(MAGIC) + FINGERPRINT + ED25519_SIG :]
    msg = _message(purpose, fp, bytes(digest))
    failed = []
    try:
        public_keys.ed25519.verify(ed_sig, msg)
    except InvalidSignature:
        failed.append("Ed25519")
    try:
        public_keys.mldsa.verify(pq_sig, msg)
    except InvalidSignature:
        failed.append("ML-DSA-65")
    if failed:
        what = " and ".join(failed)
        raise SignatureError(
            f"{what} signature of {public_keys.site} does not verify: the "
            f"{'global model' if purpose == PURPOSE_GLOBAL else 'update'} was altered or signed by "
            f"someone else"
        )


def verify_global_model(digest: bytes, signature, server_keys: PublicKeys) -> None:
    verify(digest, signature, server_keys, PURPOSE_GLOBAL)
