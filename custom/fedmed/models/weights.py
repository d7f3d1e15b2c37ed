"""The model-file format, in one place: ``{"state_dict": {name: tensor}, "meta": {...}}`` written atomically, and a
content hash of a parameter dict. Pure (torch + numpy): the server's persistor, the hospitals' executor, the
inference tools and the scripts all write model files through save_state, and none needs NVFlare for it."""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import threading
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from fedmed.models.hashing import feed_params


def params_sha256(params: dict) -> str:
    """Order-independent content hash of a parameter dict (names, dtypes, shapes and bytes)."""
    return feed_params(hashlib.sha256(), params).hexdigest()


def _tensor(v) -> torch.Tensor:
    return v.detach().cpu() if isinstance(v, torch.Tensor) else torch.as_tensor(np.asarray(v))


# (params digest, meta digest) -> (path, its stat signature) of the files save_state wrote last: a server round saves
# the same model 2-4 times (the global model, the run's round copy, the best model and its run copy), and torch's
# pickler spent ~0.2 s of CPU on each (issue 30, bench_overhead's profile); a file already written with the same
# content, still as written, is copied instead.
_WRITTEN: dict = {}
_WRITTEN_MAX = 4
_written_lock = threading.Lock()
# Digests a caller already took (remember_digest), so that save_state's reuse key costs no second pass over the model:
# (the params dict, the ids of its arrays, its params_sha256) of the latest model only: it is held (so an identity check
# is sound), and holding older ones would keep their ~28 MB resident.
_KNOWN: list = []


def remember_digest(params: dict) -> str:
    """params_sha256(params), remembered for this very dict: save_state(reuse=True) of it then takes its reuse key from
    here instead of hashing the parameters again (the server hashes each round's global model once for the record and
    saves it up to four times). The caller must not change the arrays in place afterwards: a replaced array is noticed
    (the key is hashed afresh), an array written in place is not."""
    digest = params_sha256(params)
    with _written_lock:
        _KNOWN[:] = [(params, _array_ids(params), digest)]
    return digest


def _array_ids(params: dict) -> tuple:
    return tuple((k, id(v)) for k, v in params.items())


def _known_digest(params: dict) -> Optional[str]:
    with _written_lock:
        for held, ids, digest in _KNOWN:
            if held is params:
                return digest if ids == _array_ids(params) else None
    return None


def _content_key(params: dict, meta: dict) -> Optional[tuple]:
    """What a model file's content depends on: the parameters' digest and the meta's pickle; None when either cannot
    be taken (the file is then written, never copied)."""
    try:
        digest = _known_digest(params) or params_sha256(params)
        return digest, hashlib.sha256(pickle.dumps(meta, protocol=4)).hexdigest()
    except Exception:  # a tensor numpy cannot read, a meta the standard pickler refuses: no reuse, torch.save decides
        return None


def _signature(path: Path) -> tuple:
    st = path.stat()
    return st.st_ino, st.st_size, st.st_mtime_ns


def save_state(params: dict, path: Path, meta: Optional[dict] = None, reuse: bool = False) -> None:
    """torch.save a state dict (numpy arrays or tensors) with its meta, atomically: written to a temporary file,
    then renamed, so a crash never leaves half a model. reuse (the server, which saves each round's model several
    times): the same parameters and meta saved again are copied from the file written last with them with reuse,
    if it is still as written (same inode, size and modification time); it costs a SHA-256 of the parameters per
    call, none for a dict whose digest was remembered (remember_digest), so a caller that saves each model once (a
    site) leaves it off. A copy, not a hard link: the server's copies (the run's round file outside the job's folder)
    are there to survive damage to the first file, and copying 28 MB costs ~10 ms."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    meta = dict(meta or {})
    key = _content_key(params, meta) if reuse else None
    with _written_lock:
        earlier = _WRITTEN.get(key) if key is not None else None
    copied = False
    if earlier is not None:
        try:
            if _signature(earlier[0]) == earlier[1]:
                shutil.copyfile(earlier[0], tmp)
                copied = True
        except OSError:  # gone or unreadable: written afresh below
            pass
    if not copied:
        torch.save({"state_dict": {k: _tensor(v) for k, v in params.items()}, "meta": meta}, tmp)
    os.replace(tmp, path)
    if key is not None:
        with _written_lock:
            _WRITTEN.pop(key, None)
            _WRITTEN[key] = (path, _signature(path))
            while len(_WRITTEN) > _WRITTEN_MAX:
                _WRITTEN.pop(next(iter(_WRITTEN)))


def load_state(path: Path) -> tuple[dict, dict]:
    """(params as numpy arrays, meta) of a file save_state wrote. The file may be hostile (it sits on a disk others
    can write): torch's weights-only loader runs no code, and anything that is not such a file is a ValueError
    naming it."""
    path = Path(path)
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError... for a damaged or foreign file
        raise ValueError(f"{path.name} is not a readable model file ({type(e).__name__})") from None
    if not isinstance(blob, dict) or not isinstance(blob.get("state_dict"), dict):
        raise ValueError(f"{path.name} is not a fedmed model file (no state_dict)")
    params = {}
    for k, v in blob["state_dict"].items():
        if not isinstance(v, torch.Tensor):
            raise ValueError(f"{path.name}: {k!r} is not a tensor")
        params[k] = v.numpy()
    return params, dict(blob.get("meta") or {})
