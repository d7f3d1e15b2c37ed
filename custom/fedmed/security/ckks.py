"""Selective CKKS encryption (TenSEAL) of the model layers the server must never see in clear.

Pure core: no NVFlare import. Hospitals hold a context with the secret key; the server holds a context without it
and can only form weighted sums of ciphertexts (plain-scalar multiply + add: no rotations, so no Galois keys).

Written here rather than taken from NVFlare 2.9's HE components because those fail for selective encryption
(HEModelShareableGenerator flattens the clear layers and never reshapes them: "Incoming model parameter shape
mismatch"), cannot be combined with robust (non-mean) aggregation, and have no way to tell a ciphertext made with
another federation's keys from one made with ours.

Parameters (same file format as NVFlare's HEBuilder, so provisioned kits work): N = 8192, coefficient modulus
[60, 40, 40] bits (140 bits in all), scale 2^40. The HE standard (homomorphicencryption.org, 2018) gives 128-bit
classical security for N = 8192 up to 218 bits of modulus, so 140 bits is at least 128-bit secure. One level is
consumed by the plain-scalar multiply; nothing else needs one.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np
import tenseal as ts

# File names in a startup kit (NVFlare's HEBuilder / ProvFileName use the same two context names).
CLIENT_CONTEXT_FILE = "client_context.tenseal"
SERVER_CONTEXT_FILE = "server_context.tenseal"
# The key-set id: sha256 of the server context file, written beside each client context by fedmed's builder, so a
# ciphertext made with another provisioning's keys is refused instead of silently corrupting the global model.
KEY_ID_FILE = "he_key_id.txt"

POLY_MODULUS_DEGREE = 8192
COEFF_MOD_BIT_SIZES = (60, 40, 40)
SCALE_BITS = 40


class EncryptedUpdateError(ValueError):
    """An encrypted block cannot be aggregated; the message says why."""


@dataclass(frozen=True)
class KeySet:
    """Serialized contexts of one federation: client_context holds the secret key, server_context does not."""

    client_context: bytes
    server_context: bytes

    @property
    def key_id(self) -> str:
        return key_id_of(self.server_context)


def key_id_of(server_context_bytes: bytes) -> str:
    return hashlib.sha256(server_context_bytes).hexdigest()


def generate_key_set(
    poly_modulus_degree: int = POLY_MODULUS_DEGREE,
    coeff_mod_bit_sizes: Sequence[int] = COEFF_MOD_BIT_SIZES,
    scale_bits: int = SCALE_BITS,
) -> KeySet:
    """A fresh CKKS key set, serialized exactly as NVFlare's HEBuilder does (symmetric encryption: only the
    secret-key holders can encrypt or decrypt; relinearisation keys are kept for compatibility with its files)."""
    ctx = ts.context(
        ts.SCHEME_TYPE.CKKS,
        poly_modulus_degree=poly_modulus_degree,
        coeff_mod_bit_sizes=list(coeff_mod_bit_sizes),
        encryption_type=ts.ENCRYPTION_TYPE.SYMMETRIC,
    )
    ctx.generate_relin_keys()
    ctx.global_scale = 2**scale_bits
    client = ctx.serialize(save_public_key=True, save_secret_key=True, save_galois_keys=False, save_relin_keys=True)
    server = ctx.serialize(save_public_key=False, save_secret_key=False, save_galois_keys=False, save_relin_keys=True)
    return KeySet(client, server)


def write_key_files(keys: KeySet, server_dir: Path, client_dirs: Sequence[Path]) -> None:
    """Write the server context into server_dir and the client context + key id into each client dir."""
    server_dir = Path(server_dir)
    server_dir.mkdir(parents=True, exist_ok=True)
    (server_dir / SERVER_CONTEXT_FILE).write_bytes(keys.server_context)
    for d in client_dirs:
        d = Path(d)
        d.mkdir(parents=True, exist_ok=True)
        (d / CLIENT_CONTEXT_FILE).write_bytes(keys.client_context)
        (d / KEY_ID_FILE).write_text(keys.key_id + "\n")


@dataclass(frozen=True)
class LoadedContext:
    context: ts.Context
    key_id: Optional[str]  # None when the kit carries no key id (a kit not provisioned by fedmed's builder)
    path: Path


def load_server_context(path: Path) -> LoadedContext:
    """The server's context. Refuses a context that holds a secret key: the server must not be able to decrypt."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"HE server context not found: {path} (provision with the HE builder, or prepare the simulator keys)"
        )
    data = path.read_bytes()
    ctx = _deserialize_context(data, path)
    if ctx.is_private():
        raise PermissionError(
            f"{path} holds a CKKS secret key; the server must only ever hold a context without it "
            f"(this looks like a client context copied to the server)"
        )
    return LoadedContext(ctx, key_id_of(data), path)


def load_client_context(path: Path) -> LoadedContext:
    """A hospital's context (with the secret key) and the key id written beside it at provisioning."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"HE client context not found: {path} (this hospital's startup kit must carry "
            f"{CLIENT_CONTEXT_FILE}, written at provisioning)"
        )
    ctx = _deserialize_context(path.read_bytes(), path)
    if not ctx.is_private():
        raise PermissionError(f"{path} holds no CKKS secret key; a hospital needs the client context to decrypt")
    id_file = path.parent / KEY_ID_FILE
    key_id = id_file.read_text().strip() if id_file.is_file() else None
    return LoadedContext(ctx, key_id, path)


def _deserialize_context(data: bytes, path: Path) -> ts.Context:
    try:
        ctx = ts.context_from(data)
    except Exception as e:  # TenSEAL raises bare ValueError/RuntimeError for unreadable streams
        raise ValueError(f"{path} is not a TenSEAL context: {e}") from e
    if ctx.global_scale <= 0:
        raise ValueError(f"{path}: the context has no global scale set")
    return ctx


def slot_count(ctx: ts.Context) -> int:
    """CKKS packs N/2 real values per ciphertext."""
    return ctx.data.seal_context().first_context_data().parms().poly_modulus_degree() // 2


# ---------------------------------------------------------------------------------------------------------------
# Which parameters are encrypted


def resolve_encrypted_names(param_names: Sequence[str], selectors: Sequence[str]) -> tuple[str, ...]:
    """Parameter names picked by selectors: an exact name, or a prefix ending in '.' (e.g. 'class_layers.out.').
    Plain strings, not regular expressions (a regex in NVFlare's encrypt_layers breaks job export)."""
    if not selectors:
        raise ValueError("no layers selected for encryption")
    names = list(param_names)
    picked: list[str] = []
    for sel in selectors:
        if not isinstance(sel, str) or not sel:
            raise ValueError(f"encrypted layer selectors must be non-empty strings, got {sel!r}")
        hits = [n for n in names if n == sel or (sel.endswith(".") and n.startswith(sel))]
        if not hits:
            raise ValueError(
                f"encrypted layer selector {sel!r} matches no model parameter "
                f"(e.g. {names[-1]!r}); give an exact name or a prefix ending in '.'"
            )
        picked.extend(h for h in hits if h not in picked)
    return tuple(n for n in names if n in picked)  # model order, whatever the selector order


def split_params(params: Mapping[str, np.ndarray], encrypted_names: Sequence[str]) -> tuple[dict, dict]:
    """(clear part, part to encrypt), without copying arrays."""
    enc = set(encrypted_names)
    missing = sorted(enc - set(params))
    if missing:
        raise ValueError(f"parameters selected for encryption are missing from the model: {missing}")
    return {k: v for k, v in params.items() if k not in enc}, {k: params[k] for k in encrypted_names}


# ---------------------------------------------------------------------------------------------------------------
# The encrypted block: what travels in an update's meta and is kept by the server


@dataclass(frozen=True)
class EncryptedLayers:
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    chunks: tuple[bytes, ...]  # serialized CKKS vectors, each at most slot_count values, in order
    key_id: Optional[str]

    @property
    def num_values(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    @property
    def nbytes(self) -> int:
        return sum(len(c) for c in self.chunks)

    def to_wire(self) -> dict:
        """Plain dict (lists, str, bytes) that NVFlare's FOBS serializes natively."""
        return {
            "names": list(self.names),
            "shapes": [list(s) for s in self.shapes],
            "chunks": list(self.chunks),
            "key_id": self.key_id,
        }

    @classmethod
    def from_wire(cls, block) -> "EncryptedLayers":
        if not isinstance(block, Mapping):
            raise EncryptedUpdateError(f"encrypted block must be a mapping, got {type(block).__name__}")
        try:
            names = tuple(str(n) for n in block["names"])
            shapes = tuple(tuple(int(d) for d in s) for s in block["shapes"])
            chunks = tuple(block["chunks"])
            key_id = block.get("key_id")
        except (KeyError, TypeError, ValueError) as e:
            raise EncryptedUpdateError(f"malformed encrypted block: {e!r}") from e
        if len(names) != len(shapes):
            raise EncryptedUpdateError(f"encrypted block names {len(names)} but shapes {len(shapes)}")
        if not all(isinstance(c, (bytes, bytearray)) for c in chunks):
            raise EncryptedUpdateError("encrypted block chunks must be bytes")
        return cls(names, shapes, tuple(bytes(c) for c in chunks), key_id)


def expected_chunks(num_values: int, slots: int) -> int:
    return max(1, math.ceil(num_values / slots))


def encrypt_layers(layers: Mapping[str, np.ndarray], ctx: LoadedContext) -> EncryptedLayers:
    """Flatten the layers (in the given order), cut into slot-sized chunks, encrypt and serialize each chunk."""
    if not layers:
        raise ValueError("nothing to encrypt")
    names = tuple(layers)
    flat = np.concatenate([np.asarray(layers[n], dtype=np.float64).ravel() for n in names])
    if not np.all(np.isfinite(flat)):
        bad = [n for n in names if not np.all(np.isfinite(layers[n]))]
        raise ValueError(f"cannot encrypt non-finite values in {bad}")
    slots = slot_count(ctx.context)
    chunks = tuple(
        ts.ckks_vector(ctx.context, flat[i : i + slots].tolist()).serialize() for i in range(0, flat.size, slots)
    )
    return EncryptedLayers(names, tuple(tuple(np.shape(layers[n])) for n in names), chunks, ctx.key_id)


def decrypt_layers(block: EncryptedLayers, ctx: LoadedContext, dtype=np.float32) -> dict:
    """Back to named arrays (needs the secret key)."""
    if not ctx.context.is_private():
        raise PermissionError("decryption needs the client context (with the secret key)")
    values = np.concatenate(
        [np.asarray(ts.ckks_vector_from(ctx.context, c).decrypt(), dtype=np.float64) for c in block.chunks]
    )
    if values.size != block.num_values:
        raise EncryptedUpdateError(f"decrypted {values.size} values, the block's shapes need {block.num_values}")
    out, i = {}, 0
    for name, shape in zip(block.names, block.shapes):
        n = math.prod(shape)
        out[name] = values[i : i + n].reshape(shape).astype(dtype)
        i += n
    return out


def find_encrypted_problem(
    block, expected_names: Sequence[str], expected_shapes: Mapping[str, tuple], ctx: LoadedContext
) -> Optional[str]:
    """Why an encrypted block cannot be aggregated with this federation's, or None. Checks the key-set id, the
    layer names and shapes, the chunk count, and that every chunk parses as a CKKS vector of this context with the
    expected length (a tampered, truncated or other-parameter ciphertext fails to parse)."""
    try:
        enc = block if isinstance(block, EncryptedLayers) else EncryptedLayers.from_wire(block)
    except EncryptedUpdateError as e:
        return str(e)
    if ctx.key_id is not None and enc.key_id != ctx.key_id:
        return (
            f"encrypted with another key set (key id {str(enc.key_id)[:12]}, this federation's is "
            f"{ctx.key_id[:12]}): the site's startup kit comes from another provisioning"
        )
    if tuple(enc.names) != tuple(expected_names):
        return f"encrypted layers {list(enc.names)} differ from the job's {list(expected_names)}"
    for name, shape in zip(enc.names, enc.shapes):
        if tuple(shape) != tuple(expected_shapes[name]):
            return f"encrypted layer {name}: shape {tuple(shape)}, expected {tuple(expected_shapes[name])}"
    slots = slot_count(ctx.context)
    want = expected_chunks(enc.num_values, slots)
    if len(enc.chunks) != want:
        return f"{len(enc.chunks)} ciphertext chunk(s), expected {want} for {enc.num_values} values"
    for i, chunk in enumerate(enc.chunks):
        want_size = min(slots, enc.num_values - i * slots)
        try:
            vec = ts.ckks_vector_from(ctx.context, chunk)
            size = vec.size()
        except Exception as e:  # TenSEAL/SEAL raise ValueError or RuntimeError on unparsable data
            return f"ciphertext chunk {i} is unreadable with this federation's context ({e})"
        if size != want_size:
            return f"ciphertext chunk {i} holds {size} values, expected {want_size}"
        problem = _find_ciphertext_problem(vec, ctx)
        if problem:
            return f"ciphertext chunk {i}: {problem}"
    return None


def _find_ciphertext_problem(vec, ctx: LoadedContext) -> Optional[str]:
    """A fresh ciphertext as a hospital's encrypt_layers makes it: the context's global scale, the first level of
    the modulus chain (nothing consumed yet), two polynomials, NTT form; and the plain-scalar multiply the weighted
    sum will do must succeed on it. Anything else (another scale, a rescaled or multiplied ciphertext) would make
    the homomorphic sum fail, or silently decode to garbage, for every site of the round."""
    cts = vec.ciphertext()
    if len(cts) != 1:
        return f"{len(cts)} ciphertexts in one vector, expected 1"
    ct = cts[0]
    seal = ctx.context.data.seal_context()
    if ct.scale != ctx.context.global_scale:
        return f"scale 2^{math.log2(ct.scale) if ct.scale > 0 else float('nan'):.1f}, expected 2^{SCALE_BITS}"
    if ct.parms_id() != seal.first_parms_id():
        return "not at the first level of the modulus chain (it was rescaled or multiplied before sending)"
    if ct.size() != 2:
        return f"{ct.size()} polynomials, a fresh ciphertext has 2"
    if ct.poly_modulus_degree() != slot_count(ctx.context) * 2:
        return f"polynomial degree {ct.poly_modulus_degree()}, expected {slot_count(ctx.context) * 2}"
    if not ct.is_ntt_form():
        return "not in NTT form"
    try:
        _ = vec * 0.5
    except Exception as e:  # SEAL: "scale out of bounds", "encrypted is not valid for encryption parameters", ...
        return f"cannot be multiplied by a weight ({e})"
    return None


def weighted_sum(blocks: Sequence[EncryptedLayers], weights: Sequence[float], ctx: LoadedContext) -> EncryptedLayers:
    """sum_i w_i * block_i, computed on ciphertexts (plain-scalar multiply + add); works with the server's
    secret-free context. Blocks must have passed find_encrypted_problem."""
    if not blocks:
        raise ValueError("no encrypted blocks to combine")
    if len(weights) != len(blocks):
        raise ValueError(f"need one weight per block: {len(blocks)} blocks, {len(weights)} weights")
    w = [float(x) for x in weights]
    if not all(math.isfinite(x) for x in w):
        raise ValueError(f"weights must be finite, got {w}")
    ref = blocks[0]
    out = []
    for i in range(len(ref.chunks)):
        acc = None
        for block, wi in zip(blocks, w):
            if wi == 0.0:
                continue  # a site left out of the aggregate contributes nothing (and costs no multiply)
            term = ts.ckks_vector_from(ctx.context, block.chunks[i]) * wi
            acc = term if acc is None else acc + term
        if acc is None:
            raise ValueError("every weight is zero")
        out.append(acc.serialize())
    return EncryptedLayers(ref.names, ref.shapes, tuple(out), ctx.key_id)


def guarded_weighted_sum(blocks: Mapping[str, EncryptedLayers], weights: Mapping[str, float], ctx: LoadedContext):
    """sum_site w_site * block_site on ciphertexts, adding each site's whole block under its own guard: a site whose
    chunks cannot be multiplied or added (another scale or level that slipped past screening) is left out and named,
    and the sum of the others stays intact. Returns (EncryptedLayers or None if nothing was added,
    {site: reason})."""
    acc, failed, ref = None, {}, None
    for site, block in blocks.items():
        w = float(weights.get(site, 0.0))
        if w == 0.0:
            continue
        if not math.isfinite(w):
            failed[site] = f"weight {w} is not finite"
            continue
        try:
            terms = [ts.ckks_vector_from(ctx.context, c) * w for c in block.chunks]
            new = terms if acc is None else [a + t for a, t in zip(acc, terms)]
            if acc is not None and len(terms) != len(acc):
                raise EncryptedUpdateError(f"{len(terms)} chunks, the others have {len(acc)}")
        except Exception as e:  # SEAL: "scale out of bounds", "can't compute on vectors of different sizes", ...
            failed[site] = f"encrypted layers could not be combined with the others' ({e})"
            continue
        acc, ref = new, ref or block
    if acc is None:
        return None, failed
    return EncryptedLayers(ref.names, ref.shapes, tuple(v.serialize() for v in acc), ctx.key_id), failed


# ---------------------------------------------------------------------------------------------------------------
# Whole-model helpers used by both sides


def encrypt_selected(params: Mapping[str, np.ndarray], encrypted_names: Sequence[str], ctx: LoadedContext):
    """(clear params, EncryptedLayers of the selected ones): what a hospital sends."""
    clear, selected = split_params(params, encrypted_names)
    return clear, encrypt_layers(selected, ctx)


def merge_decrypted(clear: Mapping[str, np.ndarray], block, ctx: LoadedContext) -> dict:
    """Full params from the clear part and a wire-format encrypted block (decrypted with the hospital's key)."""
    enc = block if isinstance(block, EncryptedLayers) else EncryptedLayers.from_wire(block)
    if ctx.key_id is not None and enc.key_id is not None and enc.key_id != ctx.key_id:
        raise EncryptedUpdateError(
            f"the global model was encrypted with key set {enc.key_id[:12]}, this site holds "
            f"{ctx.key_id[:12]}: the site's startup kit comes from another provisioning"
        )
    overlap = sorted(set(enc.names) & set(clear))
    if overlap:
        raise EncryptedUpdateError(f"parameters both in clear and encrypted: {overlap[:3]}")
    return {**clear, **decrypt_layers(enc, ctx)}


def encrypted_sha256(block: Optional[EncryptedLayers]) -> Optional[str]:
    """Content hash of the ciphertexts (recorded with the update; the server cannot hash the plaintext)."""
    if block is None:
        return None
    h = hashlib.sha256()
    for name, shape in zip(block.names, block.shapes):
        h.update(f"{name}{shape}".encode())
    for c in block.chunks:
        h.update(c)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# What a hospital checks before training on a decrypted global model

# The decrypted global head may move at most this factor times the larger of the previous head's norm and
# MIN_HEAD_SCALE in one round. The server cannot see the encrypted layers, so it cannot bound a site that scales its
# own head before encrypting; the hospitals, which can decrypt, check the sum they receive. Honest rounds of Adam
# with lr 1e-3 move a DenseNet-121 head by well under its own norm; a site sending its head x100 moves the mean
# of three far beyond 10x.
MAX_HEAD_CHANGE = 10.0
MIN_HEAD_SCALE = 1.0


def find_global_head_problem(
    new: Mapping[str, np.ndarray], previous: Optional[Mapping[str, np.ndarray]], max_change: float = MAX_HEAD_CHANGE
) -> Optional[str]:
    """Why a hospital must not train on this decrypted global head, or None: non-finite values, or a change from
    the previous global head (when the hospital saw one) larger than max_change x max(norm of previous, 1)."""
    for name, v in new.items():
        if not np.all(np.isfinite(v)):
            return f"decrypted global layer {name} contains NaN or Inf"
    if previous is None or set(previous) != set(new):
        return None
    prev_norm = math.sqrt(sum(float(np.sum(np.asarray(previous[k], np.float64) ** 2)) for k in new))
    change = math.sqrt(
        sum(float(np.sum((np.asarray(new[k], np.float64) - np.asarray(previous[k], np.float64)) ** 2)) for k in new)
    )
    bound = max_change * max(prev_norm, MIN_HEAD_SCALE)
    if change > bound:
        return (
            f"decrypted global head changed by {change:.4g} in one round (previous norm {prev_norm:.4g}, bound "
            f"{bound:.4g}): a site may have scaled its encrypted head"
        )
    return None
