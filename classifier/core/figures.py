"""Figures as files: matplotlib without pyplot, so the user's backend stays as it is, written atomically; and the
gallery of image files that evaluation and the data audit both draw."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from classifier.core.atomic import atomic_path
from classifier.core.imageio import load_rgb

GALLERY_COLUMNS = 4


def save_figure(figure: Figure, path: Path) -> None:
    """`figure` as an image file (its format from the suffix), written atomically."""
    with atomic_path(path) as partial:
        figure.savefig(partial, format=path.suffix.lstrip(".") or None)


def image_gallery_figure(paths: list[Path], captions: list[str], title: str, empty: str = "no images") -> Figure:
    """Each image titled with its caption, GALLERY_COLUMNS to a row; a grey tile for a file that no longer decodes,
    and `empty` in place of none."""
    columns = min(GALLERY_COLUMNS, max(1, len(paths)))
    rows = max(1, math.ceil(len(paths) / columns))
    figure = Figure(figsize=(3 * columns, 3.4 * rows), dpi=100, layout="constrained")
    grid = figure.subplots(rows, columns, squeeze=False)
    for axes in grid.flat:
        axes.axis("off")
    if not paths:
        grid[0, 0].text(0.5, 0.5, empty, ha="center", va="center")
    for axes, path, caption in zip(grid.flat, paths, captions, strict=False):
        try:
            axes.imshow(load_rgb(path), interpolation="nearest")
        except Exception as error:  # noqa: BLE001 - any decoder failure: the tile says so, the gallery goes on
            axes.imshow(np.full((8, 8, 3), 160, dtype=np.uint8))
            axes.text(3.5, 3.5, f"cannot read\n{Path(path).name}\n{type(error).__name__}", ha="center", va="center",
                      fontsize=8, wrap=True)  # fmt: skip
        axes.set_title(caption, fontsize=9)
    figure.suptitle(title)
    return figure
