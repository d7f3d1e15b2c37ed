"""Batched prediction, the decision per finding, Grad-CAM heatmaps and their overlays (PNG; the DICOM Secondary
Capture is built in fedmed.inference.dicom_out)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from fedmed.data.transforms import preprocess

GRADCAM_LAYER = "class_layers.relu"  # last activation before pooling: the finest map that still sees the whole image
OVERLAY_LONG_SIDE = 512
OVERLAY_HEAT_WEIGHT = 0.45
MIN_GRADCAM_CELLS = 2  # a 1x1 last feature map gives one value per image: the normalised heatmap is uniform
COARSE_GRADCAM_CELLS = 4  # below 4x4 cells a heatmap shows a region of the image, not where a lesion is


def gradcam_grid(model: torch.nn.Module, image_size: int) -> tuple:
    """(rows, cols) of the layer Grad-CAM reads (GRADCAM_LAYER) at this input size: the heatmap's real resolution,
    measured by one forward pass rather than assumed (DenseNet-121 divides by 32)."""
    layer = dict(model.named_modules())[GRADCAM_LAYER]
    seen = {}

    def record(_module, _inputs, output) -> None:  # returns None: a forward hook's return value replaces the output
        seen["shape"] = tuple(output.shape[-2:])

    hook = layer.register_forward_hook(record)
    try:
        with torch.no_grad():
            model(torch.zeros(1, 1, image_size, image_size))
    finally:
        hook.remove()
    return seen["shape"]


def gradcam_resolution_note(grid: tuple, image_size: int) -> tuple:
    """(draw, note): whether Grad-CAM can show anything at this resolution, and what to tell the reader.

    Refused below MIN_GRADCAM_CELLS cells a side (a uniform map that looks like "no finding"); a warning below
    COARSE_GRADCAM_CELLS; (True, None) otherwise."""
    rows, cols = grid
    if min(rows, cols) < MIN_GRADCAM_CELLS:
        return False, (
            f"Grad-CAM not drawn: at {image_size} px the model's last feature map is {rows}x{cols}, so a "
            f"heatmap would be one uniform value and show nothing; it needs a model trained at >= "
            f"{image_size * MIN_GRADCAM_CELLS // max(1, min(rows, cols))} px"
        )
    if min(rows, cols) < COARSE_GRADCAM_CELLS:
        return True, (
            f"Grad-CAM is coarse: the model's last feature map is {rows}x{cols} at {image_size} px, so each "
            f"heatmap cell covers {image_size // min(rows, cols)} px; it shows a region, not a lesion"
        )
    return True, None


class Preprocessor:
    """The training preprocessing (fedmed.data.transforms.preprocess) as a callable: (rows, cols) -> (1, S, S)."""

    def __init__(self, image_size: int):
        self.transform = preprocess(image_size)

    def __call__(self, pixels: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.asarray(self.transform(pixels)), dtype=torch.float32)


@torch.no_grad()
def predict_batches(
    model: torch.nn.Module,
    images: torch.Tensor,
    batch_size: int,
    probabilities: Callable[[torch.Tensor], torch.Tensor] = torch.sigmoid,
) -> np.ndarray:
    """Probabilities (N, K) for preprocessed images (N, 1, S, S), batch_size images per forward pass.

    Args:
        probabilities: logits -> probabilities; the task's (sigmoid for multi-label, softmax for multi-class).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    model.eval()
    out = [probabilities(model(images[i : i + batch_size])).numpy() for i in range(0, len(images), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def positive_findings(probabilities: dict, thresholds: dict) -> list:
    """Findings whose probability reaches their threshold (p >= t), in the given finding order."""
    return [f for f, p in probabilities.items() if p >= thresholds[f]]


HEAT_GRAD_CAM = "grad-cam"
HEAT_RELATIVE = "relative"
HEAT_FLAT = "flat"
# Below this spread of the per-cell evidence (in logit units: what each cell would give the logit if the whole
# image looked like it) no region stands out: a min-max scaling would paint float noise as heat.
FLAT_LOGIT_SPREAD = 1e-3


@dataclass(frozen=True)
class Heatmap:
    """One finding's map on one image.

    Args:
        heat: (S, S) in [0, 1]; all zero when method is HEAT_FLAT.
        method: HEAT_GRAD_CAM (the positive part of Grad-CAM), HEAT_RELATIVE (Grad-CAM was negative everywhere:
            where the evidence is least negative, relative to the rest of the image) or HEAT_FLAT (nothing stands out).
        note: what the reader must know about this map (None for plain Grad-CAM).
    """

    heat: np.ndarray
    method: str
    note: Optional[str] = None

    @property
    def banner(self) -> Optional[str]:
        """The short line stamped into the picture, where a JSON note would go unread."""
        return {
            HEAT_RELATIVE: "HEATMAP RELATIVE: evidence negative everywhere",
            HEAT_FLAT: "HEATMAP FLAT: no region stands out",
        }.get(self.method)


class HeatmapMaker:
    """Grad-CAM for one finding (or class) of one preprocessed image, with a stated fallback when it is empty.

    Grad-CAM (Selvaraju et al.) weights the target layer's channels by their mean gradient and keeps the positive
    part of the sum. Two things made fedmed's maps silently empty or wrong with monai.visualize.GradCAM:
    - its default normaliser maps the minimum to 1 and the maximum to 0 (MONAI's docstring: "This will flip
      magnitudes"; Project-MONAI/tutorials#1796): wherever the map had heat, the overlay was inverted;
    - a weakly trained multi-label model pushes a rare finding's logit down through the features, not the bias: at
      class_layers.relu (followed by average pooling and the linear head, so Grad-CAM there is CAM) every cell's
      evidence is negative, the ReLU leaves zeros, and a finding positive by a low threshold (p=0.034) got an empty
      map with no note.
    So the map is computed here from MONAI's hooks (monai.visualize.ModelWithHooks): Grad-CAM scaled by its own
    maximum (0 stays "no evidence"); when no cell is positive, the map of where the evidence is least negative,
    named as such; when the evidence is the same everywhere, no heat and a note saying the map is flat.

    Args:
        model: the classifier, in eval mode (its hooks stay registered for the maker's lifetime).
        findings: output names in order.
    """

    def __init__(self, model: torch.nn.Module, findings: Sequence[str]):
        from monai.visualize import ModelWithHooks

        self.hooks = ModelWithHooks(model, GRADCAM_LAYER, register_forward=True, register_backward=True)
        self.findings = list(findings)

    def evidence(self, image: torch.Tensor, finding: str) -> np.ndarray:
        """(rows, cols) Grad-CAM before its ReLU, in logit units per cell: sum over channels of the channel's mean
        gradient times its activation, times the number of cells (for a pooled linear head, the logit the image
        would get if it looked like this cell everywhere, less the bias)."""
        k = self.findings.index(finding)
        _, acti, grad = self.hooks(image[None], class_idx=k)
        acti, grad = acti[-1].detach(), grad[-1].detach()
        weights = grad.mean(dim=(2, 3), keepdim=True)
        cells = acti.shape[2] * acti.shape[3]
        return ((weights * acti).sum(1)[0] * cells).numpy().astype(np.float64)

    def __call__(self, image: torch.Tensor, finding: str) -> Heatmap:
        """(1, S, S) image -> its Heatmap for `finding` at (S, S)."""
        cells = self.evidence(image, finding)
        size = tuple(image.shape[-2:])
        spread = float(cells.max() - cells.min())
        if cells.max() > 0:
            return Heatmap(_upsampled(np.maximum(cells, 0) / cells.max(), size), HEAT_GRAD_CAM)
        if spread < FLAT_LOGIT_SPREAD:
            return Heatmap(
                np.zeros(size, np.float32),
                HEAT_FLAT,
                f"heatmap flat: the model's evidence for {finding} is the same in every region (spread "
                f"{spread:.1e} logit), so no region is shown",
            )
        return Heatmap(
            _upsampled((cells - cells.min()) / spread, size),
            HEAT_RELATIVE,
            f"heatmap relative: Grad-CAM for {finding} is negative in every region (the model's evidence is against "
            f"it everywhere; the decision rests on its threshold); the map shows where the evidence is least "
            f"negative",
        )


def _upsampled(cells: np.ndarray, size: tuple) -> np.ndarray:
    """Bilinear upsampling of a (rows, cols) map in [0, 1] to the image size (MONAI's default upsampler)."""
    t = torch.as_tensor(cells, dtype=torch.float32)[None, None]
    up = torch.nn.functional.interpolate(t, size=size, mode="bilinear", align_corners=False)
    return up[0, 0].clamp(0, 1).numpy()


def overlay_rgb(image: np.ndarray, heat: np.ndarray, shape: tuple) -> np.ndarray:
    """Blend a jet-coloured heatmap over the greyscale image, resized to the source's aspect ratio.

    Args:
        image: (S, S) preprocessed image in [0, 1].
        heat: (S, S) Grad-CAM in [0, 1].
        shape: the source image's (rows, cols); the overlay keeps its aspect ratio, long side OVERLAY_LONG_SIDE.
    """
    from matplotlib import colormaps

    rows, cols = shape
    scale = OVERLAY_LONG_SIDE / max(rows, cols)
    size = (max(1, round(cols * scale)), max(1, round(rows * scale)))  # PIL wants (width, height)

    def resized(a):
        return np.asarray(Image.fromarray(a.astype(np.float32), mode="F").resize(size, Image.BILINEAR))

    grey = np.clip(resized(image), 0, 1)[..., None].repeat(3, axis=2)
    h = np.clip(resized(heat), 0, 1)
    colour = colormaps["jet"](h)[..., :3]
    weight = OVERLAY_HEAT_WEIGHT * h[..., None]  # cold regions stay plain greyscale
    return np.round(255 * ((1 - weight) * grey + weight * colour)).astype(np.uint8)


BANNER_TEXT = "NOT FOR CLINICAL USE"
TOP_BANNER_COLOUR = (150, 0, 0)  # dark red: not for clinical use
BOTTOM_BANNER_COLOUR = (20, 20, 120)  # dark blue: out of distribution, heatmap relative or flat


def stamp_banners(rgb: np.ndarray, top: Sequence[str] = (), bottom: Sequence[str] = ()) -> np.ndarray:
    """A copy of the overlay with one bar per line of text: `top` from the top edge down (dark red), `bottom` from
    the bottom edge up (dark blue). What a reader of the picture sees, where a header field or a JSON key would go
    unread (no patient data in it)."""
    from PIL import ImageDraw, ImageFont

    image = Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8), mode="RGB")
    height = max(12, image.height // 20)
    font = ImageFont.load_default(size=height * 0.7)
    draw = ImageDraw.Draw(image)
    bars = [(i * height, text, TOP_BANNER_COLOUR) for i, text in enumerate(top)]
    bars += [(image.height - (i + 1) * height, text, BOTTOM_BANNER_COLOUR) for i, text in enumerate(bottom)]
    for y, text, colour in bars:
        draw.rectangle([0, y, image.width, y + height], fill=colour)
        draw.text((4, y + height // 2), text, fill=(255, 255, 255), anchor="lm", font=font)
    return np.asarray(image)


def write_png(rgb: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb, mode="RGB").save(path)
