"""Training augmentation on the CPU: timm's pipeline with this project's options and the resize mode's geometry,
and the decode size it needs."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from PIL import Image
from timm.data import create_transform
from timm.data.transforms import CenterCropOrPad, RandomResizedCropAndInterpolation
from torchvision.transforms import TrivialAugmentWide
from torchvision.transforms import functional as F

from classifier.core.geometry import pad_fill
from classifier.model.net import LetterboxFit


class ModeCrop(RandomResizedCropAndInterpolation):
    """timm's random-resized crop, keeping the eval resize mode's geometry: `center` (crop) draws crops at the
    model's aspect (width / height, times `ratio`) and resizes them to its size; `squash` and `border` (letterbox)
    draw them at each image's own aspect, then squash stretches the crop to the size and letterbox fits it inside,
    as eval does to the whole image (`train_transform` pads it last, so that colour changes leave the padding at the
    mean)."""

    def __init__(
        self,
        size: tuple[int, int],
        scale: tuple[float, float],
        ratio: tuple[float, float],
        interpolation: str,
        crop_mode: str,
    ) -> None:
        aspect = size[1] / size[0] if crop_mode == "center" else 1.0
        super().__init__(size, scale, (ratio[0] * aspect, ratio[1] * aspect), interpolation)
        self.crop_mode = crop_mode
        self.fit = LetterboxFit(size, interpolation)

    def __call__(self, image: Image.Image) -> Image.Image:
        if self.crop_mode == "center":
            return super().__call__(image)
        aspect = image.width / image.height
        top, left, height, width = self.get_params(image, self.scale, (self.ratio[0] * aspect, self.ratio[1] * aspect))
        if self.crop_mode == "squash":
            return F.resized_crop(image, top, left, height, width, list(self.size), self.interpolation)
        return self.fit(F.crop(image, top, left, height, width))


def train_transform(
    data_config: dict[str, Any],
    hflip: float,
    crop_scale: tuple[float, float],
    crop_ratio: tuple[float, float],
    color_jitter: float | None,
    auto_augment: str | None,
) -> Callable:
    """timm's train pipeline for `data_config` with the resize mode's crop (`ModeCrop`), ending in a uint8 tensor
    (normalisation happens on the device)."""
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
    _, height, width = data_config["input_size"]
    crop_mode, interpolation = data_config.get("crop_mode") or "center", data_config["interpolation"]
    pipeline.transforms[0] = ModeCrop((height, width), tuple(crop_scale), tuple(crop_ratio), interpolation, crop_mode)
    if trivial:  # timm has no TrivialAugment; torchvision's works on the same PIL images
        pipeline.transforms.insert(-1, TrivialAugmentWide())
    if crop_mode == "border":  # the letterbox's padding, after every colour change
        pipeline.transforms.insert(-1, CenterCropOrPad((height, width), fill=list(pad_fill(data_config))))
    return pipeline


def crop_decode_size(
    image_pixels: int,
    scale_size: int,
    crop_scale: tuple[float, float],
    crop_ratio: tuple[float, float],
    aspect: float = 1.0,
) -> int | None:
    """The shorter side training images keep (JPEG draft, RAM cache): enough that the smallest crop the settings
    allow (crop_scale[0] of a square image, at the extreme of crop_ratio times the crops' `aspect`) still spans
    `image_pixels` pixels each way, and at least `scale_size`; None (full decode) when crop_scale[0] is 0."""
    (smallest, _), (low, high) = crop_scale, crop_ratio
    if smallest <= 0:
        return None
    narrowest = min(math.sqrt(low * aspect), 1 / math.sqrt(high * aspect))  # the crop's shorter side / sqrt(area)
    return max(scale_size, math.ceil(image_pixels / (math.sqrt(smallest) * narrowest)))
