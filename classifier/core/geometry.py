"""Where eval puts an image of any shape into the model's height x width, as plain numbers: torch-free, so that the
ONNX predictor, the RAM cache and the device crops all compute timm's eval geometry the same way.

Three resize modes, each one of timm's eval crop modes: `crop` (timm's `center`: the shorter side to fit, the
centre cut out), `squash` (resize to the size, the aspect changes) and `letterbox` (timm's `border`: the longer
side to fit, padded with the normalisation mean).
"""

from __future__ import annotations

import math

RESIZE_MODES = {"crop": "center", "squash": "squash", "letterbox": "border"}  # ours -> timm's crop_mode
DEFAULT_CROP_PCT = 0.875  # timm's, when a config has none


def image_hw(image_size: int | list[int] | tuple[int, ...]) -> tuple[int, int]:
    """(height, width) of `--data.image_size`: one number is a square, two are height first."""
    if isinstance(image_size, int):
        return image_size, image_size
    if len(image_size) != 2 or not all(isinstance(side, int) and side > 0 for side in image_size):
        raise ValueError(f"--data.image_size {list(image_size)}: give one size, or [height, width]")
    return int(image_size[0]), int(image_size[1])


def resize_mode(crop_mode: str | None) -> str:
    """Our name of a timm crop_mode (`center` -> `crop`)."""
    names = {timm: ours for ours, timm in RESIZE_MODES.items()}
    if (crop_mode or "center") not in names:
        raise ValueError(f"crop_mode {crop_mode!r} is none of timm's {', '.join(names)}")
    return names[crop_mode or "center"]


def scale_size(preprocessing: dict) -> tuple[int, int]:
    """(height, width) eval resizes to before its crop: timm's `floor(size / crop_pct)`."""
    _, height, width = preprocessing["input_size"]
    crop_pct = preprocessing.get("crop_pct") or DEFAULT_CROP_PCT
    return math.floor(height / crop_pct), math.floor(width / crop_pct)


def resized_size(height: int, width: int, preprocessing: dict) -> tuple[int, int]:
    """(height, width) an image of this size has after eval's resize, as timm computes it for each crop mode."""
    scale = scale_size(preprocessing)
    mode = preprocessing.get("crop_mode") or "center"
    if mode == "squash":
        return scale
    if mode == "center":
        return crop_resized_size(height, width, scale)
    if mode == "border":  # timm's ResizeKeepRatio(longest=1): the longer side to fit
        ratio = max(height / scale[0], width / scale[1])
        return max(1, round(height / ratio)), max(1, round(width / ratio))  # never none of a side (LetterboxFit)
    raise ValueError(f"crop_mode {mode!r} is none of timm's {', '.join(RESIZE_MODES.values())}")


def crop_resized_size(height: int, width: int, scale: tuple[int, int]) -> tuple[int, int]:
    """The `crop` mode's resize: torchvision's Resize(int) to a square scale (the shorter side, the longer
    truncated), else timm's ResizeKeepRatio (the shorter side to fit, rounded)."""
    if scale[0] == scale[1]:
        short, long = sorted((height, width))
        longer = int(scale[0] * long / short)
        return (longer, scale[0]) if width <= height else (scale[0], longer)
    ratio = min(height / scale[0], width / scale[1])
    return round(height / ratio), round(width / ratio)


def centre_offsets(height: int, width: int, out_height: int, out_width: int) -> tuple[int, int, int, int]:
    """torchvision's centre crop (and timm's CenterCropOrPad) of a height x width image to out_height x out_width:
    the padding on the left and top where the image is smaller (the right and bottom get the rest), then the
    window's left and top in the padded image."""
    pad_left = (out_width - width) // 2 if out_width > width else 0
    pad_top = (out_height - height) // 2 if out_height > height else 0
    left = int(round((max(width, out_width) - out_width) / 2.0))
    top = int(round((max(height, out_height) - out_height) / 2.0))
    return pad_left, pad_top, left, top


def pad_fill(preprocessing: dict) -> tuple[int, int, int]:
    """The colour letterbox pads with: the normalisation mean on the 0-255 scale, as timm's `border` mode."""
    return tuple(round(255 * value) for value in preprocessing["mean"])
