"""A photo-like multi-label set: each scene shows any of four shapes (disc, ring, square, stripes; from common to
rare), or none, for trying multi-label training on a CPU and for the tests.

`classifier demo-data scenes DIR` writes `DIR/images/<opaque name>.jpg|png` and two manifests of the same labels:
`labels.csv` (`path,label`, the labels `;`-joined) and `labels_onehot.csv` (`path` and one 0/1 column per label).
Each shape is in its own cell of a 2x2 grid, at a random place, size, colour and angle, on the textured background
of the photos set, under uneven light, with sensor noise. The same seed writes the same files.
"""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import numpy as np
from PIL import Image

from classifier.data.photos import background, lighting, paint

LABELS = ("disc", "ring", "square", "stripes")
PRESENT = (0.5, 0.35, 0.25, 0.15)  # each label's chance of being in a scene: common to rare, as labels tend to be


def write_scenes(root: Path, count: int = 300, seed: int = 0, sizes: tuple[int, int] = (72, 112)) -> Path:
    """Write `count` scenes and their two manifests into `root`; return `root`."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        labels = [label for label, chance in zip(LABELS, PRESENT, strict=True) if rng.random() < chance]
        width, height = (int(side) for side in rng.integers(sizes[0], sizes[1] + 1, size=2))
        pixels = render_scene(labels, width, height, rng)
        name = hashlib.blake2b(f"{seed}-{i}".encode(), digest_size=6).hexdigest()  # says nothing of the labels
        path = Path("images") / f"{name}.{'png' if i % 3 == 0 else 'jpg'}"
        image = Image.fromarray(pixels)
        image.save(root / path, **({} if path.suffix == ".png" else {"quality": int(rng.integers(70, 96))}))
        rows.append((path.as_posix(), labels))
    with open(root / "labels.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["path", "label"])
        writer.writerows((path, ";".join(labels)) for path, labels in rows)
    with open(root / "labels_onehot.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["path", *LABELS])
        writer.writerows((path, *(int(label in labels) for label in LABELS)) for path, labels in rows)
    return root


def render_scene(labels: list[str], width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """One RGB uint8 picture with each of `labels`' shapes in a cell of its own."""
    y, x = np.mgrid[:height, :width].astype(np.float32)
    image = background(width, height, rng)
    cells = rng.permutation(4)[: len(labels)]
    for label, cell in zip(labels, cells, strict=True):
        cell_w, cell_h = width / 2, height / 2
        size = rng.uniform(0.28, 0.4) * min(cell_w, cell_h)
        cx = (cell % 2) * cell_w + rng.uniform(size, cell_w - size)
        cy = (cell // 2) * cell_h + rng.uniform(size, cell_h - size)
        angle = rng.uniform(-np.pi / 12, np.pi / 12)
        u = (x - cx) * np.cos(angle) + (y - cy) * np.sin(angle)
        v = -(x - cx) * np.sin(angle) + (y - cy) * np.cos(angle)
        image = paint(image, label, u, v, size, rng)
    image *= lighting(x, y, width, height, rng)[..., None]
    image += rng.normal(0, rng.uniform(3, 10), image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)
