"""A photo-like three-class shapes set (disc, square, stripes), for tests and for trying a config on a CPU.

`classifier demo-data photos DIR` writes the full set: 80 images per class, 300-640 px, JPEG (quality 60-95) and
PNG, a quarter grey, a quarter stored sideways with an EXIF rotation. Each shape has a random place, size,
colour, aspect and angle, on a textured, noisy background under a lighting gradient, sometimes out of focus.
The same seed writes the same files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

CLASSES = ("disc", "square", "stripes")
ORIENTATION = 0x0112  # EXIF tag: how the stored pixels turn upright


def write_photos(root: Path, per_class: int = 12, seed: int = 0, sizes: tuple[int, int] = (80, 140)) -> Path:
    """Write `per_class` images of each class into `root/<class>/`, sides drawn from `sizes`; return `root`.

    Image i is grey when i % 4 == 1, stored sideways (EXIF orientation 6 or 8) when i % 4 == 2, and PNG when
    i % 3 == 0, JPEG otherwise.
    """
    rng = np.random.default_rng(seed)
    for label in CLASSES:
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            width, height = (int(side) for side in rng.integers(sizes[0], sizes[1] + 1, size=2))
            image = Image.fromarray(render(label, width, height, rng))
            if rng.random() < 0.3:  # out of focus
                image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 1.5) * width / 300))
            if i % 4 == 1:
                image = image.convert("L")
            kwargs: dict = {"quality": int(rng.integers(60, 96))}
            if i % 4 == 2:  # stored sideways; upright once EXIF's rotation is applied
                exif = Image.Exif()
                exif[ORIENTATION] = 6 if i % 8 == 2 else 8
                image, kwargs["exif"] = image.rotate(90 if exif[ORIENTATION] == 6 else 270, expand=True), exif
            ext = "png" if i % 3 == 0 else "jpg"
            if ext == "png":
                del kwargs["quality"]
            image.save(root / label / f"{label}_{i:03d}.{ext}", **kwargs)
    return root


def render(label: str, width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """One RGB uint8 picture of `label`'s shape on a textured background under uneven light."""
    y, x = np.mgrid[:height, :width].astype(np.float32)
    side = min(width, height)
    image = background(width, height, rng)
    # the shape's own frame: centre, angle, half-size and aspect, then a signed distance (pixels inside > 0)
    size = rng.uniform(0.25, 0.42) * side
    # inside the central square, as a photographer frames a subject (a centre crop keeps it)
    cx, cy = (extent / 2 + rng.uniform(size - side / 2, side / 2 - size) for extent in (width, height))
    angle = rng.uniform(-np.pi / 18, np.pi / 18)  # a subject roughly upright, as photographed
    u = (x - cx) * np.cos(angle) + (y - cy) * np.sin(angle)
    v = -(x - cx) * np.sin(angle) + (y - cy) * np.cos(angle)
    image = paint(image, label, u, v, size, rng)
    image *= lighting(x, y, width, height, rng)[..., None]
    image += rng.normal(0, rng.uniform(3, 12), image.shape)  # sensor noise
    return np.clip(image, 0, 255).astype(np.uint8)


def paint(
    image: np.ndarray, label: str, u: np.ndarray, v: np.ndarray, size: float, rng: np.random.Generator
) -> np.ndarray:
    """`image` with `label`'s shape of half-size `size` painted in, in its own frame (u, v: pixels from its centre,
    along its axes), in a colour that stands out from the background, lit unevenly."""
    aspect = rng.uniform(0.85, 1.0)
    if label == "disc":
        inside = size - np.hypot(u, v / aspect)
    elif label == "square":
        inside = size - np.maximum(np.abs(u), np.abs(v) / aspect)
    elif label == "ring":
        radius = np.hypot(u, v / aspect)
        inside = np.minimum(size - radius, radius - 0.55 * size)
    else:  # stripes: parallel bars across a rectangle
        period = size / rng.integers(2, 5)
        bars = period / 4 - np.abs((u % period) - period / 2)
        inside = np.minimum(size - np.maximum(np.abs(u), np.abs(v) / aspect), bars)
    alpha = np.clip(inside + 0.5, 0, 1)[..., None]  # anti-aliased edge
    colour = contrasting_colour(image.mean(axis=(0, 1)), rng)
    shading = 1 + rng.uniform(-0.25, 0.25) * u / size  # the shape is lit unevenly too
    return image * (1 - alpha) + (colour * shading[..., None]) * alpha


def background(width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """Texture: a random base colour, smooth blotches at two scales (mostly of brightness), and grain."""
    image = np.broadcast_to(rng.uniform(20, 140, size=3), (height, width, 3)).astype(np.float32).copy()
    for cells, strength in ((4, 25), (24, 10)):
        blotches = rng.normal(0, strength, (cells, cells, 1)) + rng.normal(0, strength / 3, (cells, cells, 3))
        smooth = [Image.fromarray(blotches[..., c].astype(np.float32)).resize((width, height), Image.BICUBIC)
                  for c in range(3)]  # fmt: skip
        image += np.stack([np.asarray(channel) for channel in smooth], axis=-1)
    return image + rng.normal(0, 6, image.shape)


def contrasting_colour(background: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random colour 60+ levels brighter than the background, so grey copies show it: a lit subject."""
    luma = np.array([0.299, 0.587, 0.114])
    while True:
        colour = rng.uniform(0, 255, size=3)
        if (colour - background) @ luma > 60:
            return colour.astype(np.float32)


def lighting(x: np.ndarray, y: np.ndarray, width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """A linear gradient of brightness in a random direction, 0.5-1.3, with a vignette."""
    angle = rng.uniform(0, 2 * np.pi)
    ramp = ((x / width - 0.5) * np.cos(angle) + (y / height - 0.5) * np.sin(angle)) * rng.uniform(0, 0.8)
    vignette = 1 - rng.uniform(0, 0.4) * (((x / width - 0.5) ** 2 + (y / height - 0.5) ** 2) * 2)
    return np.clip(1 + ramp, 0.5, 1.3) * vignette
