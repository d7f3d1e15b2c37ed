"""The model-file format, in one place: ``{"state_dict": {name: tensor}, "meta": {...}}`` written atomically, and a
content hash of a parameter dict. Pure (torch + numpy): the server's persistor, the hospitals' executor, the
inference tools and the scripts all write model files through save_state, and none needs NVFlare for it."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch


def params_sha256(params: dict) -> str:
    """Order-independent content hash of a parameter dict (names, dtypes, shapes and bytes)."""
    h = hashlib.sha256()
    for k in sorted(params):
        v = np.ascontiguousarray(params[k])
        h.update(k.encode())
        h.update(str(v.dtype).encode())
        h.update(str(v.shape).encode())
        h.update(v.reshape(-1).view(np.uint8))  # the array's own bytes, without a 28 MB copy per update
    return h.hexdigest()


def _tensor(v) -> torch.Tensor:
    return v.detach().cpu() if isinstance(v, torch.Tensor) else torch.as_tensor(np.asarray(v))


def save_state(params: dict, path: Path, meta: Optional[dict] = None) -> None:
    """torch.save a state dict (numpy arrays or tensors) with its meta, atomically: written to a temporary file,
    then renamed, so a crash never leaves half a model."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save({"state_dict": {k: _tensor(v) for k, v in params.items()}, "meta": dict(meta or {})}, tmp)
    os.replace(tmp, path)


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
