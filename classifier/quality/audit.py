"""What `classifier check-data` finds in a split folder: bad files, odd images, class balance, duplicates and leaks.

Pure analysis of the split table and the checked facts of its files; `classifier.commands.check_data` writes it out.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from classifier.data.duplicates import Pair, exact_pairs, near_pairs
from classifier.data.file_facts import FileFacts
from classifier.data.splits import Splits, partitions

GATING = ("unreadable", "leakage", "label_conflict")  # what --strict stops on
FORMAT_EXTENSIONS = {
    "JPEG": (".jpg", ".jpeg"), "MPO": (".jpg", ".jpeg"), "PNG": (".png",), "GIF": (".gif",), "BMP": (".bmp",),
    "TIFF": (".tif", ".tiff"), "WEBP": (".webp",), "PPM": (".ppm", ".pgm", ".pbm"),
}  # fmt: skip
USUAL_MODES = ("RGB", "L")
TINY_SHARE = 0.25  # a shorter side under a quarter of the median's is tiny
HUGE_FACTOR = 16  # more than 16 times the median pixel count (and over HUGE_PIXELS) is huge
HUGE_PIXELS = 4_000_000
EXTREME_ASPECT = 4.0  # longer side over shorter side
SMALL_CLASS = 10  # training images under which a class is too small to learn or to score
NO_LABEL = "(no label)"  # how a multi-label image with an empty label set is named in findings


@dataclass(frozen=True)
class Finding:
    """One row of issues.csv."""

    path: str
    kind: str
    detail: str
    related: str = ""


@dataclass
class Audit:
    findings: list[Finding] = field(default_factory=list)
    pairs: list[Pair] = field(default_factory=list)
    report: dict[str, Any] = field(default_factory=dict)

    def count(self, kind: str) -> int:
        return sum(1 for finding in self.findings if finding.kind == kind)


def audit(splits: Splits, facts: list[FileFacts], near_dup_threshold: int, num_folds: int | None = None) -> Audit:
    """Every finding about the images of `splits`, whose FileFacts `facts` are in the same order."""
    result = Audit()
    names = [str(splits.root / path) for path in splits.paths]
    result.findings += file_findings(names, facts)
    result.findings += class_findings(splits, num_folds)
    exact = exact_pairs(facts)
    parts = partitions(splits)
    result.pairs = [oriented(pair, parts) for pair in exact + near_pairs(facts, names, near_dup_threshold, exact)]
    result.findings += duplicate_findings(splits, names, result.pairs)
    result.report = statistics(splits, facts)
    return result


def oriented(pair: Pair, parts: list[str]) -> Pair:
    """The copy in train first, then one in val or a fold, then one in test: the second is the one reported, as the
    copy that leaks into the evaluation."""
    rank = [0 if parts[i] == "train" else 2 if parts[i] == "test" else 1 for i in (pair.first, pair.second)]
    return replace(pair, first=pair.second, second=pair.first) if rank[1] < rank[0] else pair


def file_findings(names: list[str], facts: list[FileFacts]) -> list[Finding]:
    """Unreadable files, content that is not what the extension says, unusual modes, EXIF rotation, size outliers."""
    readable = [item for item in facts if item.reason is None]
    short_sides = [min(item.width, item.height) for item in readable]
    pixel_counts = [item.width * item.height for item in readable]
    median_short = float(np.median(short_sides)) if readable else 0.0
    median_pixels = float(np.median(pixel_counts)) if readable else 0.0
    found = []
    for name, item in zip(names, facts, strict=True):
        if item.reason is not None:
            found.append(Finding(name, "unreadable", item.reason))
            continue
        extensions = FORMAT_EXTENSIONS.get(item.format)
        if extensions and Path(name).suffix.lower() not in extensions:
            found.append(Finding(name, "format_mismatch", f"{item.format} content named {Path(name).suffix}"))
        if item.mode not in USUAL_MODES:
            found.append(Finding(name, "unusual_mode", f"{item.mode}: converted to RGB as training does"))
        if item.orientation not in (0, 1):
            found.append(Finding(name, "exif_rotated", f"EXIF orientation {item.orientation}: turned upright"))
        short, long = sorted((item.width, item.height))
        size = f"{item.width}x{item.height}"
        if short < TINY_SHARE * median_short:
            found.append(Finding(name, "tiny_image", f"{size}; the median shorter side is {median_short:g} px"))
        if long > EXTREME_ASPECT * short:
            found.append(Finding(name, "extreme_aspect", f"{size}, aspect {long / short:.1f}:1"))
        if item.width * item.height > max(HUGE_FACTOR * median_pixels, HUGE_PIXELS):
            found.append(Finding(name, "huge_image", f"{size}; the median image has {median_pixels:,.0f} pixels"))
    return found


def class_findings(splits: Splits, num_folds: int | None) -> list[Finding]:
    """Classes absent from a split that exists, and classes too small for training or for the folds."""
    found = []
    present = [name for name in ("train", "val", "test") if (splits.split == name).any()]
    for name in present:
        for index in np.flatnonzero(np.array(splits.class_counts(name)) == 0):
            found.append(Finding(splits.classes[index], "missing_class", f"no images in the {name} split"))
    trained = splits.class_counts("train")
    folded = splits.labels[splits.fold >= 0]
    pooled = folded.sum(axis=0) if splits.multilabel else np.bincount(folded, minlength=len(splits.classes))
    for index, name in enumerate(splits.classes):
        if num_folds and pooled[index] < num_folds:
            detail = f"{pooled[index]} images outside test for {num_folds} folds: some folds validate none of it"
            found.append(Finding(name, "small_class", detail))
        elif 0 < trained[index] < SMALL_CLASS:
            found.append(Finding(name, "small_class", f"{trained[index]} training images (under {SMALL_CLASS})"))
    return found


def duplicate_findings(splits: Splits, names: list[str], pairs: list[Pair]) -> list[Finding]:
    """Each copy within a class and part is a duplicate; across classes (multi-label: label sets), a label conflict;
    across parts, leakage (a pair can be both)."""
    parts = partitions(splits)
    found = []
    for pair in pairs:
        a, b = pair.first, pair.second
        how = {"bytes": "same bytes", "pixels": "same pixels"}.get(pair.match, f"near copy (distance {pair.distance})")
        labels = label_name(splits, a), label_name(splits, b)
        if parts[a] != parts[b]:
            found.append(Finding(names[b], "leakage", f"{how} in {parts[b]} as in {parts[a]}", names[a]))
        if labels[0] != labels[1]:
            found.append(Finding(names[b], "label_conflict", f"{how} labelled {labels[1]} and {labels[0]}", names[a]))
        if parts[a] == parts[b] and labels[0] == labels[1]:
            kind = "near_duplicate" if pair.match == "near" else "duplicate"
            found.append(Finding(names[b], kind, f"{how} in {parts[b]}, class {labels[1]}", names[a]))
    return found


def label_name(splits: Splits, row: int) -> str:
    """The row's class, or under multi-label its label set: `a;b`, or NO_LABEL."""
    return splits.label_text(row) or NO_LABEL


def statistics(splits: Splits, facts: list[FileFacts]) -> dict[str, Any]:
    """Counts per class and split (multi-label: images carrying each label, and images with none), imbalance,
    formats, modes and the spread of sizes and aspect ratios."""
    readable = [item for item in facts if item.reason is None]
    present = [name for name in ("train", "val", "test") if (splits.split == name).any()]
    per_split = {name: splits.class_counts(name) for name in present}
    counts = {name: {split: per_split[split][i] for split in per_split} for i, name in enumerate(splits.classes)}
    unlabelled = {}
    if splits.multilabel:
        unlabelled = {"images_without_label": {
            name: int((splits.labels[splits.split == name].sum(axis=1) == 0).sum()) for name in present
        }}  # fmt: skip
    trained = [n for n in splits.class_counts("train") if n > 0]
    widths = np.array([item.width for item in readable] or [0])
    heights = np.array([item.height for item in readable] or [0])
    aspects = np.maximum(widths, heights) / np.maximum(1, np.minimum(widths, heights))
    return {
        "images": len(facts),
        "readable": len(readable),
        "classes": len(splits.classes),
        "splits": dict(Counter(map(str, splits.split))),
        "class_counts": counts,
        **unlabelled,
        "imbalance_ratio": round(max(trained) / min(trained), 3) if trained else None,
        "formats": dict(Counter(item.format for item in readable).most_common()),
        "modes": dict(Counter(item.mode for item in readable).most_common()),
        "exif_rotated": sum(item.orientation not in (0, 1) for item in readable),
        "width": spread(widths),
        "height": spread(heights),
        "aspect_ratio": spread(aspects),
    }


def spread(values: np.ndarray) -> dict[str, float]:
    return {name: round(float(f(values)), 3) for name, f in (("min", np.min), ("median", np.median), ("max", np.max))}
