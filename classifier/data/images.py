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
from torchvision.transforms import functional as F

from classifier.core.geometry import crop_resized_size
from classifier.core.imageio import EXIF_ORIENTATION, load_rgb

JPEG_EXTENSIONS = (".jpeg", ".jpg")


def presize(path: Path, size: int | tuple[int, int] | None, interpolation: str, training: bool = False) -> Tensor:
    """uint8 CHW presized: what eval's resize makes, and what the RAM cache holds.

    For eval, `size` is eval's (height, width) scale and the result exactly timm's `crop` resize of the full decode
    (`classifier.core.geometry.crop_resized_size`). For training, JPEGs decode at a reduced DCT scale first and the
    shorter side is resized to `size`, but a smaller image keeps its own size (the random crop resamples it anyway);
    None keeps every image's own size.
    """
    shorter = min(size) if isinstance(size, tuple) else size
    image = load_rgb(path, min_size=shorter if training else None)
    if size is None or (training and min(image.size) <= shorter):
        return to_tensor(image)
    height, width = crop_resized_size(image.height, image.width, size if isinstance(size, tuple) else (size, size))
    return to_tensor(F.resize(image, [height, width], interpolation=str_to_interp_mode(interpolation)))


def to_tensor(image: Image.Image) -> Tensor:
    """An RGB PIL image as a uint8 CHW tensor."""
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()


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
