"""Is an aggregated global model usable at all: on fixed probe images its outputs are finite and depend on the input.

A round's score cannot tell: a model whose outputs are NaN at every site was recorded with a validation score of
0.5000 (each site's AUROC of its own collapsed local model) and could be picked as best; it surfaced only in the
cross-site evaluation. The server runs this check on every aggregated model, with or without a test set, before
the round is scored: a model that fails it is alerted in that round and never becomes the best model.
No NVFlare import (fedmed.flare.controller calls it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

PROBE_IMAGES = 4
# Below this spread (largest std over the probe images of any output logit) every input gets the same answer. A
# freshly initialised DenseNet-121 spreads its logits by ~1e-2 on these images; a collapsed model by exactly 0.
COLLAPSED_SPREAD = 1e-6


@dataclass(frozen=True)
class OutputCheck:
    images: int
    non_finite: int  # probe images with any NaN or infinite output
    spread: float  # largest std over the probe images of any output (0: the same answer for every input)

    @property
    def problem(self) -> Optional[str]:
        if self.non_finite:
            return (
                f"the global model's outputs are not finite (NaN or infinite) on {self.non_finite} of {self.images} "
                "probe images: it is not usable and will not be picked as best"
            )
        if self.spread < COLLAPSED_SPREAD:
            return (
                f"the global model has collapsed: its outputs are the same for all {self.images} probe images "
                f"(spread {self.spread:.1e}): it is not usable and will not be picked as best"
            )
        return None


def probe_images(image_size: int, in_channels: int = 1, n: int = PROBE_IMAGES, seed: int = 0) -> torch.Tensor:
    """n fixed images (standard normal pixels, like normalised inputs): the same every round, nothing from a site."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, in_channels, image_size, image_size, generator=g)


def check_outputs(model: torch.nn.Module, images: torch.Tensor, params: Optional[dict] = None) -> OutputCheck:
    """The model's raw outputs (logits) on images, in eval mode: how many images give a non-finite output, and how
    much the outputs vary between images. params: {name: tensor} for every parameter and buffer, used in place of
    the model's own without loading them into it (torch.func.functional_call: nothing copied)."""
    model.eval()
    with torch.no_grad():
        raw = model(images) if params is None else torch.func.functional_call(model, params, (images,))
        out = raw.reshape(len(images), -1).double().numpy()
    finite = np.isfinite(out)
    non_finite = int((~finite.all(axis=1)).sum())
    spread = float(out.std(axis=0).max()) if non_finite == 0 and len(out) > 1 else 0.0
    return OutputCheck(len(images), non_finite, spread)
