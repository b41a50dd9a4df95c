"""Reading image files as correct RGB, whatever mode a real folder holds them in."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp")
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


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


def load_rgb(path: Path) -> Image.Image:
    """Decode one file to RGB; the file is closed before returning."""
    with Image.open(path) as image:
        return to_rgb(image)


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
