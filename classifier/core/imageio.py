"""The project's image decoding rules, with numpy and Pillow only: every file and mode to upright RGB.

Training, `classifier predict`, `Predictor` and the torch-free `classifier.deploy.onnx_predictor` all decode
through here.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp")
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
BOMB_PIXELS = re.compile(r"Image size \((\d+) pixels\)")  # PIL's DecompressionBombError
EXIF_ORIENTATION = 0x0112  # the EXIF tag saying how the stored pixels turn upright


def is_image_file(path: Path | str) -> bool:
    """Hidden files (`.DS_Store`, `._x.jpg`) and non-image files (`Thumbs.db`) are never samples."""
    name = os.path.basename(path)
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def list_images(root: Path) -> list[Path]:
    """Every image below `root`, sorted, skipping hidden folders such as `.ipynb_checkpoints`.

    A broken symbolic link or a link loop named like an image is listed, so that the decode check reports it;
    links to folders are not followed. `os.scandir`, not `Path.rglob`: several times faster on large folders.
    """
    found, folders = [], [str(root)]
    while folders:
        with os.scandir(folders.pop()) as entries:  # the entry's file type comes with it: no stat per file
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    if not entry.name.startswith("."):
                        folders.append(entry.path)
                elif is_image_file(entry.name) and listed(entry):
                    found.append(entry.path)
    return [Path(path) for path in sorted(found, key=lambda path: path.split(os.sep))]  # Path's order, by parts


def listed(entry: os.DirEntry) -> bool:
    """A file, a link to one, or a link to nothing (a broken link or a loop, for the decode check to report)."""
    if not entry.is_symlink():
        return entry.is_file(follow_symlinks=False)
    return os.path.isfile(entry.path) or not os.path.exists(entry.path)  # these two say False on a loop, not raise


def open_image(path: Path | BinaryIO) -> Image.Image:
    """PIL's lazy open, refusing before any decode an image whose header claims more than PIL.Image.MAX_IMAGE_PIXELS
    (PIL refuses above twice that, and below only warns and decodes it)."""
    try:
        image = Image.open(path)
    except Image.DecompressionBombError as error:
        raise too_many_pixels(int(BOMB_PIXELS.search(str(error))[1])) from None
    if Image.MAX_IMAGE_PIXELS and image.width * image.height > Image.MAX_IMAGE_PIXELS:
        image.close()
        raise too_many_pixels(image.width * image.height, f"{image.width}x{image.height} = ")
    return image


def too_many_pixels(pixels: int, size: str = "") -> Image.DecompressionBombError:
    return Image.DecompressionBombError(
        f"{size}{pixels} pixels, over the limit of {Image.MAX_IMAGE_PIXELS} (PIL.Image.MAX_IMAGE_PIXELS): not "
        "decoded, as it could be a decompression bomb"
    )


def unreadable_reason(path: Path, error: Exception) -> str:
    """What a user reads about a file that failed to decode: PIL's error, or plainer words where PIL's mislead."""
    if isinstance(error, FileNotFoundError):
        return "FileNotFoundError: " + (
            f"a broken symbolic link to {os.readlink(path)}" if path.is_symlink() else "gone since it was listed"
        )
    if isinstance(error, UnidentifiedImageError) and path.stat().st_size == 0:
        return "empty file (0 bytes)"
    return f"{type(error).__name__}: {error}"


def to_rgb(image: Image.Image) -> Image.Image:
    """Upright RGB; `convert("RGB")` alone saturates 16-bit images and keeps garbage under transparency."""
    image = ImageOps.exif_transpose(image)
    if image.mode in SIXTEEN_BIT_MODES or image.mode == "I":
        array = np.array(image, dtype=np.int32)  # 4 bytes a pixel, changed in place: no float64 copies
        if image.mode in SIXTEEN_BIT_MODES or array.max() > 255:
            array += 128
            array //= 257  # rint(value / 257) in integers: value / 257 is never halfway between two
        image = Image.fromarray(np.clip(array, 0, 255, out=array).astype(np.uint8), "L")
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


def load_rgb(path: Path | BinaryIO, min_size: int | None = None) -> Image.Image:
    """Decode one file to RGB; the file is closed before returning.

    With `min_size`, a JPEG decodes at the smallest 1/2, 1/4 or 1/8 scale whose shorter side stays at least
    `min_size` (DCT-domain downscaling, several times faster than a full decode followed by a resize).
    """
    with open_image(path) as image:
        if min_size:
            image.draft(image.mode, (min_size, min_size))
        return to_rgb(image)


def as_rgb_image(image: str | Path | Image.Image | np.ndarray) -> Image.Image:
    """A path, PIL image or uint8 HWC/HW array as upright RGB: what every predictor accepts."""
    if isinstance(image, (str, Path)):
        return load_rgb(Path(image))
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ValueError(f"arrays must be uint8 HWC RGB or HW grey images, not {image.dtype}")
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise TypeError(f"cannot predict on a {type(image).__name__}: pass paths, PIL images or uint8 arrays")
    return to_rgb(image)
