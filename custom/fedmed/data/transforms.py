"""MONAI transforms shared by training, validation and inference (one preprocessing, everywhere)."""

from __future__ import annotations

from monai.transforms import (
    Compose,
    EnsureChannelFirst,
    RandAffine,
    RandGaussianNoise,
    RandScaleIntensity,
    Resize,
    ScaleIntensityRangePercentiles,
)


def preprocess(image_size: int) -> Compose:
    """(H, W) float image -> (1, S, S) in [0, 1]. Percentile scaling removes scanner gain/offset differences."""
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32, got {image_size}")
    return Compose(
        [
            EnsureChannelFirst(channel_dim="no_channel"),
            ScaleIntensityRangePercentiles(lower=0.5, upper=99.5, b_min=0.0, b_max=1.0, clip=True),
            Resize((image_size, image_size), mode="area"),
        ]
    )


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
