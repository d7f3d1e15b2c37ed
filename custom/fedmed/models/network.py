"""Model factory. DenseNet-121 from MONAI, single-channel input; the classifier head is named for selective HE."""

from __future__ import annotations

import torch
from monai.networks.nets import DenseNet121

# Parameter-name prefix of the classifier head (the part selected for encryption by default).
HEAD_PREFIX = "class_layers.out."


NORMS = ("batch", "group")


def build_densenet121(num_outputs: int = 14, in_channels: int = 1, norm: str = "batch") -> torch.nn.Module:
    """norm="group" gives the DP-SGD-compatible variant: GroupNorm (Opacus cannot privatise BatchNorm, which mixes
    samples) and non-inplace ReLUs (in-place ones break Opacus' backward hooks, Opacus issue #828). Use the same
    norm with and without DP when comparing."""
    if num_outputs < 1:
        raise ValueError(f"num_outputs must be >= 1, got {num_outputs}")
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if norm == "group":
        return DenseNet121(
            spatial_dims=2,
            in_channels=in_channels,
            out_channels=num_outputs,
            norm=("group", {"num_groups": 32}),
            act=("relu", {"inplace": False}),
        )
    return DenseNet121(spatial_dims=2, in_channels=in_channels, out_channels=num_outputs)


def state_to_numpy(model: torch.nn.Module) -> dict:
    """State dict as numpy arrays (what travels in an FLModel); includes BatchNorm buffers."""
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def load_numpy_state(model: torch.nn.Module, params: dict) -> None:
    """Load numpy params; raises naming missing/unexpected keys or mismatched shapes."""
    own = model.state_dict()
    missing = sorted(set(own) - set(params))
    extra = sorted(set(params) - set(own))
    if missing or extra:
        raise ValueError(f"model parameters do not match: missing {missing[:5]}, unexpected {extra[:5]}")
    tensors = {}
    for k, v in params.items():
        t = torch.as_tensor(v)
        if tuple(t.shape) != tuple(own[k].shape):
            raise ValueError(f"parameter {k}: shape {tuple(t.shape)} != model's {tuple(own[k].shape)}")
        tensors[k] = t.to(own[k].dtype)
    model.load_state_dict(tensors)


def set_trainable(model: torch.nn.Module, prefixes=None) -> list:
    """Train only the parameters whose names start with one of `prefixes` (None = all); the rest are frozen at the
    values they hold. Returns the trainable parameter names. DP-SGD spreads the same noise over every trainable
    coordinate, so a small trainable set (e.g. the last dense block and the head) keeps more signal per step."""
    names = [n for n, _ in model.named_parameters()]
    if prefixes is None:
        chosen = names
    else:
        if isinstance(prefixes, str) or not prefixes or not all(isinstance(p, str) and p for p in prefixes):
            raise ValueError(f"trainable layers must be a non-empty list of parameter-name prefixes, got {prefixes!r}")
        unmatched = [p for p in prefixes if not any(n.startswith(p) for n in names)]
        if unmatched:
            raise ValueError(
                f"trainable layers {unmatched} match no parameter of the model "
                f"(its top-level blocks: {sorted({'.'.join(n.split('.')[:2]) for n in names})})"
            )
        chosen = [n for n in names if n.startswith(tuple(prefixes))]
    wanted = set(chosen)
    for n, p in model.named_parameters():
        p.requires_grad_(n in wanted)
    return chosen
