"""Training augmentation on the CPU: timm's pipeline with this project's options, and the decode size it needs."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from timm.data import create_transform
from torchvision.transforms import TrivialAugmentWide


def train_transform(
    data_config: dict[str, Any],
    hflip: float,
    crop_scale: tuple[float, float],
    crop_ratio: tuple[float, float],
    color_jitter: float | None,
    auto_augment: str | None,
) -> Callable:
    """timm's train pipeline for `data_config`, ending in a uint8 tensor (normalisation happens on the device)."""
    config = {key: data_config[key] for key in ("input_size", "interpolation", "crop_pct", "crop_mode")}
    trivial = auto_augment == "trivialaugment"
    pipeline = create_transform(
        **config,
        is_training=True,
        normalize=False,
        hflip=hflip,
        scale=tuple(crop_scale),
        ratio=tuple(crop_ratio),
        color_jitter=None if trivial else color_jitter,  # timm turns jitter off under its own policies
        auto_augment=None if trivial else auto_augment,
    )
    if trivial:  # timm has no TrivialAugment; torchvision's works on the same PIL images
        pipeline.transforms.insert(-1, TrivialAugmentWide())
    return pipeline


def crop_decode_size(
    image_pixels: int, scale_size: int, crop_scale: tuple[float, float], crop_ratio: tuple[float, float]
) -> int | None:
    """The shorter side training images keep (JPEG draft, RAM cache): enough that the smallest crop the settings
    allow (crop_scale[0] of a square image, at the extreme of crop_ratio) still spans `image_pixels` pixels each way,
    and at least `scale_size`; None (full decode) when crop_scale[0] is 0."""
    (smallest, _), (low, high) = crop_scale, crop_ratio
    if smallest <= 0:
        return None
    narrowest = min(math.sqrt(low), 1 / math.sqrt(high))  # the crop's shorter side over sqrt(its area)
    return max(scale_size, math.ceil(image_pixels / (math.sqrt(smallest) * narrowest)))
