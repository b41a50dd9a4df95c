"""Image files for training and evaluation: presized tensors, JPEG sizes for the GPU decoder, decode checks.

The decoding rules themselves (every mode to upright RGB) live in the torch-free `classifier.core.imageio`.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from timm.data.transforms import str_to_interp_mode
from torch import Tensor
from torchvision import transforms

from classifier.core.imageio import EXIF_ORIENTATION, load_rgb

JPEG_EXTENSIONS = (".jpeg", ".jpg")


def presize(path: Path, size: int | None, interpolation: str, training: bool = False) -> Tensor:
    """uint8 CHW with the shorter side resized to `size`: what eval's resize makes, and what the RAM cache holds.

    For eval, exactly timm's eval resize of the full decode. For training, JPEGs decode at a reduced DCT scale
    first and a smaller image keeps its own size (the random crop resamples it anyway); None keeps every image's
    own size.
    """
    image = load_rgb(path, min_size=size if training else None)
    if size is not None and (not training or min(image.size) > size):
        image = resize_shorter_side(image, size, interpolation)
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()


def resize_shorter_side(image: Image.Image, size: int, interpolation: str) -> Image.Image:
    """torchvision's `Resize(size)`, as timm's eval transform applies it before the centre crop."""
    return transforms.Resize(size, interpolation=str_to_interp_mode(interpolation))(image)


def is_jpeg_name(path: Path) -> bool:
    """Named like a JPEG: only such files are worth reading as bytes for the GPU decoder."""
    return path.suffix.lower() in JPEG_EXTENSIONS


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) of a JPEG that nvJPEG decodes as PIL would; None for anything else.

    Other formats, CMYK JPEGs and JPEGs that EXIF says to rotate are decoded on the CPU instead.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format != "JPEG" or image.mode not in ("RGB", "L"):
                return None
            if image.getexif().get(EXIF_ORIENTATION, 1) != 1:
                return None
            return image.height, image.width
    except Exception:  # noqa: BLE001 - unreadable here means: let the CPU path report it
        return None
