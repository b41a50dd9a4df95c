"""Reading image files as correct RGB, whatever mode a real folder holds them in."""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from timm.data.transforms import str_to_interp_mode
from torch import Tensor
from torchvision import transforms

IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp")
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
EXIF_ORIENTATION = 0x0112
JPEG_EXTENSIONS = (".jpeg", ".jpg")


def is_image_file(path: Path) -> bool:
    """Hidden files (`.DS_Store`, `._x.jpg`) and non-image files (`Thumbs.db`) are never samples."""
    return not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS


def list_images(root: Path) -> list[Path]:
    """Every image below `root`, sorted, skipping hidden folders such as `.ipynb_checkpoints`."""
    return sorted(
        path
        for path in root.rglob("*")
        if is_image_file(path)
        and path.is_file()
        and not any(part.startswith(".") for part in path.relative_to(root).parent.parts)
    )


def to_rgb(image: Image.Image) -> Image.Image:
    """Upright RGB; `convert("RGB")` alone saturates 16-bit images and keeps garbage under transparency."""
    image = ImageOps.exif_transpose(image)
    if image.mode in SIXTEEN_BIT_MODES or image.mode == "I":
        array = np.asarray(image, dtype=np.float64)
        if image.mode in SIXTEEN_BIT_MODES or array.max() > 255:
            array = array / 257.0
        image = Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8), "L")
    elif image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        if array.max() <= 1.0:
            array = array * 255.0
        image = Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8), "L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ALPHA_MODES:
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert("RGB")


def load_rgb(path: Path, min_size: int | None = None) -> Image.Image:
    """Decode one file to RGB; the file is closed before returning.

    With `min_size`, a JPEG decodes at the smallest 1/2, 1/4 or 1/8 scale whose shorter side stays at least
    `min_size` (DCT-domain downscaling, several times faster than a full decode followed by a resize).
    """
    with Image.open(path) as image:
        if min_size:
            image.draft(image.mode, (min_size, min_size))
        return to_rgb(image)


def presize(path: Path, size: int, interpolation: str, draft: bool = True) -> Tensor:
    """uint8 CHW with the shorter side resized to `size`: what eval's resize makes, and what the RAM cache holds.

    `draft` decodes JPEGs at a reduced DCT scale first: fast, and fine for training; eval's pixels come from the
    full decode.
    """
    image = resize_shorter_side(load_rgb(path, min_size=size if draft else None), size, interpolation)
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


def check_image(path: Path) -> str | None:
    """Why `path` cannot be decoded in full, or None when it can (truncation is found, never tolerated)."""
    try:
        with Image.open(path) as image:
            image.draft("RGB", (64, 64))  # JPEG: decode at 1/8 scale, which still reads every byte
            image.load()
    except Exception as error:  # noqa: BLE001 - any decoder failure makes the file unusable
        return f"{type(error).__name__}: {error}"
    return None


def find_unreadable(paths: list[Path], num_threads: int = 8) -> dict[Path, str]:
    """Decode every file once, in parallel (PIL releases the GIL), and map each bad one to its reason."""
    with ThreadPoolExecutor(max(1, num_threads)) as pool:
        reasons = pool.map(check_image, paths, chunksize=64)
        return {path: reason for path, reason in zip(paths, reasons, strict=True) if reason is not None}
