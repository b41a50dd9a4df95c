"""The bundled dataset: scikit-learn's 1,797 real 8x8 handwritten digits as an image folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits


def write_digits(root: Path) -> Path:
    """One PNG per scan under `root/<digit>/`; the 0-16 ink levels are stretched to 0-255."""
    digits = load_digits()
    for index, (image, target) in enumerate(zip(digits.images, digits.target, strict=True)):
        folder = root / str(target)
        folder.mkdir(parents=True, exist_ok=True)
        pixels = np.rint(image * 255 / 16).astype(np.uint8)
        Image.fromarray(pixels, mode="L").save(folder / f"{index:04d}.png")
    return root
