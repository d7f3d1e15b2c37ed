"""A torch Dataset over labelled radiographs, decoded and preprocessed once, then kept in memory."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from fedmed.data.dicom import PROJECTION_MODALITIES, read_dicom_image
from fedmed.data.labels import LabelledImage
from fedmed.data.transforms import augment, preprocess

log = logging.getLogger(__name__)


def read_image(path: Path, modalities=PROJECTION_MODALITIES) -> np.ndarray:
    """(rows, cols) float32, bright = dense (or high signal), from a DICOM file of one of `modalities` or an
    8/16-bit greyscale PNG."""
    path = Path(path)
    if path.suffix.lower() == ".png":
        from PIL import Image

        with Image.open(path) as im:
            if im.mode not in ("L", "I", "I;16", "I;16B", "F"):
                raise ValueError(f"{path}: PNG mode {im.mode} is not greyscale")
            return np.asarray(im, dtype=np.float32)
    return read_dicom_image(path, modalities)


class RadiographDataset(Dataset):
    """Items are decoded and resized once at construction (a few hundred 128 px images are a few MB), so epochs
    cost only augmentation. Returns (image[1, S, S], labels[K]). Despite the name it serves any 2-D greyscale
    image the task accepts (`modalities`: the DICOM Modality values allowed, e.g. MR for the brain task)."""

    def __init__(self, items: Sequence[LabelledImage], image_size: int, train: bool, seed: Optional[int] = None,
                 modalities=PROJECTION_MODALITIES):
        if not items:
            raise ValueError("RadiographDataset needs at least one item")
        prep = preprocess(image_size)
        self.images = torch.stack([torch.as_tensor(np.asarray(prep(read_image(it.path, modalities))), dtype=torch.float32)
                                   for it in items])
        self.labels = torch.as_tensor(np.stack([it.labels for it in items]), dtype=torch.float32)
        self.augment = augment(image_size) if train else None
        if seed is not None:
            self.reseed(seed)

    def reseed(self, seed: int) -> None:
        """Restart the augmentation stream, so a run can be repeated exactly on the same decoded images."""
        if self.augment is not None:
            self.augment.set_random_state(seed)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        image = self.images[i]
        if self.augment is not None:
            image = torch.as_tensor(np.asarray(self.augment(image)), dtype=torch.float32)
        return image, self.labels[i]
