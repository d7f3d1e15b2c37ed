"""Batched prediction, the decision per finding, Grad-CAM heatmaps and their overlays (PNG; the DICOM Secondary
Capture is built in fedmed.inference.dicom_out)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

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


class HeatmapMaker:
    """Grad-CAM (monai.visualize.GradCAM) for one finding (or class) of one preprocessed image.

    Args:
        model: the classifier, in eval mode (its hooks stay registered for the maker's lifetime).
        findings: output names in order.
    """

    def __init__(self, model: torch.nn.Module, findings: Sequence[str]):
        from monai.visualize import GradCAM

        self.cam = GradCAM(nn_module=model, target_layers=GRADCAM_LAYER)
        self.findings = list(findings)

    def __call__(self, image: torch.Tensor, finding: str) -> np.ndarray:
        """(1, S, S) image -> (S, S) heat in [0, 1]."""
        heat = self.cam(image[None], class_idx=self.findings.index(finding))
        return heat[0, 0].detach().numpy().astype(np.float32)


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


def stamp_banner(rgb: np.ndarray, text: str = BANNER_TEXT) -> np.ndarray:
    """A copy of the overlay with a dark red bar and `text` across its top: what a reader of the picture sees,
    where a header field or a JSON key would go unread (no patient data in it)."""
    from PIL import ImageDraw, ImageFont

    image = Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8), mode="RGB")
    height = max(12, image.height // 20)
    draw = ImageDraw.Draw(image)
    draw.rectangle([0, 0, image.width, height], fill=(150, 0, 0))
    draw.text((4, height // 2), text, fill=(255, 255, 255), anchor="lm", font=ImageFont.load_default(size=height * 0.7))
    return np.asarray(image)


def write_png(rgb: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb, mode="RGB").save(path)
