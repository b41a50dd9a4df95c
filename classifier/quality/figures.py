"""The pictures of a data audit: images per class and split, the spread of sizes and modes, and near copies."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from classifier.core.imageio import load_rgb
from classifier.data.duplicates import Pair
from classifier.data.file_facts import FileFacts

SHOWN_PAIRS = 12


def class_counts_figure(counts: dict[str, dict[str, int]]) -> Figure:
    """One horizontal bar per class, stacked by split, so a class that is small or missing from a split stands out."""
    classes = list(counts)
    figure = Figure(figsize=(8, 1.5 + 0.28 * len(classes)), dpi=100, layout="constrained")
    axes = figure.subplots()
    left = np.zeros(len(classes))
    for split in next(iter(counts.values()), {}):
        values = np.array([counts[name][split] for name in classes])
        axes.barh(classes, values, left=left, label=split)
        left += values
    axes.invert_yaxis()
    axes.set(xlabel="images", title="images per class and split")
    figure.legend(loc="outside right upper")
    return figure


def image_sizes_figure(facts: list[FileFacts]) -> Figure:
    """Width against height (log scales), the aspect ratios, and the colour modes of the readable images."""
    readable = [item for item in facts if item.reason is None]
    widths = np.array([item.width for item in readable])
    heights = np.array([item.height for item in readable])
    figure = Figure(figsize=(15, 4.2), dpi=100, layout="constrained")
    sizes, aspects, modes = figure.subplots(1, 3)
    (width, height), count = np.unique(np.stack([widths, heights]), axis=1, return_counts=True)
    sizes.scatter(width, height, s=8 + 400 * np.sqrt(count / max(1, count.max())), alpha=0.5)
    sizes.set(xscale="log", yscale="log", xlabel="width (px)", ylabel="height (px)")
    sizes.set_title("image sizes (upright; area: how many)")
    aspects.hist(widths / np.maximum(heights, 1), bins=40)
    aspects.set(xscale="log", xlabel="width / height", ylabel="images", title="aspect ratios")
    modes.bar(*zip(*sorted(Counter(item.mode for item in readable).items()), strict=True))
    modes.set(ylabel="images", title="colour modes")
    return figure


def near_duplicates_figure(pairs: list[Pair], names: list[str], captions: list[str]) -> Figure:
    """The first SHOWN_PAIRS pairs side by side, each image with its caption (split and class), then how close."""
    shown = pairs[:SHOWN_PAIRS]
    columns = 2 if len(shown) > 3 else 1
    rows = max(1, math.ceil(len(shown) / columns))
    figure = Figure(figsize=(6.4 * columns, 3.3 * rows), dpi=100, layout="constrained")
    grid = figure.subplots(rows, 2 * columns, squeeze=False)
    for axes in grid.flat:
        axes.axis("off")
    if not shown:
        grid[0, 0].text(0.5, 0.5, "no copies found", ha="center", va="center")
    for k, pair in enumerate(shown):
        row, column = divmod(k, columns)
        how = f"{pair.match}" if pair.match != "near" else f"near: distance {pair.distance}, rms {pair.rms:g}"
        for side, index in enumerate((pair.first, pair.second)):
            axes = grid[row, 2 * column + side]
            axes.imshow(load_rgb(Path(names[index])), interpolation="nearest")
            axes.set_title(f"{captions[index]}\n{Path(names[index]).name}" + (f"\n{how}" if side else ""), fontsize=8)
    figure.suptitle("copies (cross-split and cross-class first)")
    return figure
