"""MONAI transforms shared by training, validation and inference (one preprocessing, everywhere)."""

from __future__ import annotations

import torch
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    EnsureChannelFirst,
    MapTransform,
    RandAffine,
    RandGaussianNoise,
    RandScaleIntensity,
    Resize,
    ScaleIntensityRangePercentiles,
)

from fedmed.data.dicom import PROJECTION_MODALITIES, read_dicom_image

# The preprocessing's parameters, named once: the exported MONAI bundle spells the same transforms from these.
INTENSITY_PERCENTILES = (0.5, 99.5)
RESIZE_MODE = "area"


def preprocess(image_size: int) -> Compose:
    """(H, W) float image -> (1, S, S) in [0, 1]. Percentile scaling removes scanner gain/offset differences."""
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32, got {image_size}")
    return Compose(
        [
            EnsureChannelFirst(channel_dim="no_channel"),
            ScaleIntensityRangePercentiles(*INTENSITY_PERCENTILES, b_min=0.0, b_max=1.0, clip=True),
            Resize((image_size, image_size), mode=RESIZE_MODE),
        ]
    )


class LoadRadiographd(MapTransform):
    """Dictionary transform: a DICOM path -> (rows, cols) float32 MetaTensor read by fedmed.data.dicom (rescale
    applied, MONOCHROME1 inverted, unusable files rejected with the reason), ``filename_or_obj`` in its meta.
    MONAI's own PydicomReader returns (cols, rows) and leaves MONOCHROME1 inverted, so the bundle uses this.

    Args:
        keys: keys whose values are DICOM file paths.
        modalities: DICOM Modality values accepted (the task's, e.g. ["MR"]); default the projection radiographs.
        allow_missing_keys: as for any MONAI MapTransform.
    """

    def __init__(self, keys, modalities=None, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.modalities = set(modalities) if modalities is not None else PROJECTION_MODALITIES

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            path = str(d[key])
            d[key] = MetaTensor(torch.as_tensor(read_dicom_image(path, self.modalities)), meta={"filename_or_obj": path})
        return d


def augment(image_size: int) -> Compose:
    """Light augmentation: small pose/scale changes, exposure and noise. No flips: the heart's side is anatomy."""
    return Compose(
        [
            RandAffine(
                prob=0.7,
                rotate_range=0.07,
                scale_range=0.07,
                translate_range=(0.04 * image_size, 0.04 * image_size),
                padding_mode="zeros",
            ),
            RandScaleIntensity(factors=0.1, prob=0.5),
            RandGaussianNoise(prob=0.3, std=0.02),
        ]
    )
