"""Datasets listed in a file instead of class folders: a CSV, TSV, Parquet or JSON Lines manifest with one row per
image (its path and label, and optionally its split, fold and group), turned into the same `Splits` a folder gives,
so that the frozen split, the verification cache and `check-data` hold for manifests as they do for folders."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

from classifier.data.splits import SPLITS, Splits, hold_out

FORMATS = (".csv", ".tsv", ".parquet", ".jsonl", ".ndjson")


@dataclass
class Manifest:
    """The rows of a manifest, checked: each path relative to `root` (or absolute), its label, and the optional
    columns (None when the manifest has no such column)."""

    root: Path
    paths: list[Path]
    labels: list[str]
    split: list[str] | None
    fold: list[int] | None
    group: list[str] | None
    repeated: list[Repeat] = field(default_factory=list)  # rows that list a path again, when not refused


@dataclass
class Repeat:
    """A row listing an image listed before: with the same label a duplicate, with another a label conflict."""

    row: int
    first_row: int
    path: Path  # as the first row gives it
    label: str
    first_label: str


def manifest_root(manifest: str | Path, root: str | Path | None = None) -> Path:
    """Where a manifest's relative paths start: `--data.manifest_root`, else the manifest's own folder."""
    return Path(root) if root else Path(manifest).absolute().parent


def _records(path: Path) -> Iterator[dict[str, object]]:
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        with open(path, newline="", encoding="utf-8-sig") as file:
            yield from csv.DictReader(file, delimiter="\t" if suffix == ".tsv" else ",")
    elif suffix in (".jsonl", ".ndjson"):
        with open(path, encoding="utf-8") as file:
            for number, line in enumerate(file, 1):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as error:
                        raise ValueError(f"--data.manifest {path}: line {number} is not JSON: {error}") from None
    elif suffix == ".parquet":
        try:
            import pyarrow.parquet as parquet  # optional: only Parquet manifests need it
        except ImportError:
            raise ImportError(f"--data.manifest {path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
        yield from parquet.read_table(path).to_pylist()
    else:
        raise ValueError(
            f"--data.manifest {path}: a manifest is one of {', '.join(FORMATS)}, not {suffix or 'without a suffix'}"
        )


def read_manifest(
    manifest: str | Path,
    root: str | Path | None = None,
    path_column: str = "path",
    label_column: str = "label",
    strict: bool = True,
) -> Manifest:
    """The manifest's rows, checked; a one-line error naming the row (1 is the first after the header) otherwise:
    an empty path, a missing file, an empty label, an unknown split, a path listed twice. Not `strict` (the audit),
    a path listed again is left out and recorded in `repeated` instead."""
    source = Path(manifest)
    if not source.is_file():
        raise FileNotFoundError(f"--data.manifest {source} does not exist")
    base = manifest_root(source, root)
    rows = list(_records(source))
    if not rows:
        raise ValueError(f"--data.manifest {source} lists no images")
    for column, option in ((path_column, "path_column"), (label_column, "label_column")):
        if column not in rows[0]:
            raise ValueError(
                f"--data.manifest {source} has no column {column!r} (--data.{option}); it has {', '.join(rows[0])}"
            )
    paths, labels, seen, repeated, keep = [], [], {}, [], [True] * len(rows)
    for number, row in enumerate(rows, 1):
        text, label = _text(row.get(path_column)), _text(row.get(label_column))
        if not text:
            raise ValueError(f"--data.manifest {source}, row {number}: the {path_column!r} column is empty")
        path = Path(text)
        if not os.path.lexists(base / path):
            raise FileNotFoundError(f"--data.manifest {source}, row {number}: {base / path} does not exist")
        if not label:
            raise ValueError(f"--data.manifest {source}, row {number}: {text} has no {label_column!r}")
        key = (base / path).absolute()
        if key in seen:
            first, before = seen[key]
            if not strict:
                repeated.append(Repeat(number, before, paths[first], label, labels[first]))
                keep[number - 1] = False
                continue
            kind = "a duplicate" if labels[first] == label else f"a conflict: labelled {labels[first]!r} and {label!r}"
            raise ValueError(
                f"--data.manifest {source}, row {number}: {text} is listed again (row {before}), {kind}; "
                "list each image once (`classifier check-data` reports copies under other names)"
            )
        seen[key] = (len(paths), number)
        paths.append(
            path.relative_to(base.absolute()) if path.is_absolute() and path.is_relative_to(base.absolute()) else path
        )
        labels.append(label)
    split = _column(rows, "split", source)
    if split is not None:
        for number, value in enumerate(split, 1):
            if value not in SPLITS:
                raise ValueError(
                    f"--data.manifest {source}, row {number}: split {value!r} is not one of {', '.join(SPLITS)}"
                )
        split = [value for value, kept in zip(split, keep, strict=True) if kept]
    rows = [row for row, kept in zip(rows, keep, strict=True) if kept]
    folds = _column(rows, "fold", source)
    fold = None
    if folds is not None:
        try:
            fold = [int(value) if value != "" else -1 for value in folds]
        except ValueError as error:
            raise ValueError(
                f"--data.manifest {source}: the fold column holds a value that is not a number: {error}"
            ) from None
    return Manifest(base, paths, labels, split, fold, _column(rows, "group", source), repeated)


def _text(value: object) -> str:
    return "" if value is None else str(value).strip()


def _column(rows: list[dict], name: str, source: Path) -> list[str] | None:
    return [_text(row.get(name)) for row in rows] if name in rows[0] else None


def manifest_splits(
    manifest: Manifest,
    classes: list[str] | None = None,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 42,
    num_folds: int | None = None,
    fold: int = 0,
) -> Splits:
    """Every listed image with its split: the manifest's `split` column when it has one, else hold-outs of the given
    fractions, stratified by label; whole groups at a time when it has a `group` column. Under k-fold, its `fold`
    column when it has one, else stratified (group) folds over all but the test split."""
    classes = list(classes) if classes else sorted(set(manifest.labels))
    index = {name: i for i, name in enumerate(classes)}
    unknown = sorted(set(manifest.labels) - set(index))
    if unknown:
        raise ValueError(f"the manifest's labels {unknown} are not among the classes {classes}")
    labels = np.array([index[label] for label in manifest.labels], dtype=np.int64)
    groups = np.array(manifest.group if manifest.group is not None else range(len(labels)), dtype=object)
    split = np.array(manifest.split if manifest.split is not None else ["train"] * len(labels), dtype=object)
    fold_of = np.full(len(labels), -1, dtype=np.int64)
    pool = np.flatnonzero(split == "train")
    size = len(pool)
    if manifest.split is None and test_fraction > 0:
        pool, held = _held_out(pool, labels, groups, test_fraction, size, seed, "test", classes, manifest)
        split[held] = "test"
    if num_folds is not None:
        pool = np.sort(np.concatenate([pool, np.flatnonzero(split == "val")]))
        if manifest.fold is not None:
            fold_of[pool] = np.array(manifest.fold)[pool]
        else:
            folds = (
                StratifiedGroupKFold(num_folds, shuffle=True, random_state=seed)
                if manifest.group
                else StratifiedKFold(num_folds, shuffle=True, random_state=seed)
            )
            for k, (_, val_rows) in enumerate(folds.split(np.zeros(len(pool)), labels[pool], groups[pool])):
                fold_of[pool[val_rows]] = k
        split[pool] = np.where(fold_of[pool] == fold, "val", "train")
    elif manifest.split is None and val_fraction > 0:
        _, held = _held_out(pool, labels, groups, val_fraction, size, seed, "val", classes, manifest)
        split[held] = "val"
    _check_groups(manifest, split, fold_of)
    return Splits(manifest.root, classes, manifest.paths, labels, split.astype(str), fold_of, [""] * len(labels))


def _held_out(
    rows: np.ndarray,
    labels: np.ndarray,
    groups: np.ndarray,
    fraction: float,
    size: int,
    seed: int,
    name: str,
    classes: list[str],
    manifest: Manifest,
) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held out) of `rows`: `fraction` of `size`, stratified by label; with groups, one fold of a
    stratified group k-fold of 1/fraction folds, so that no group is on both sides."""
    if manifest.group is None:
        return hold_out(rows, labels, round(fraction * size), seed, name, manifest.root, classes)
    folds = StratifiedGroupKFold(max(2, round(1 / fraction)), shuffle=True, random_state=seed)
    kept, held = next(folds.split(np.zeros(len(rows)), labels[rows], groups[rows]))
    return np.sort(rows[kept]), np.sort(rows[held])


def _check_groups(manifest: Manifest, split: np.ndarray, fold_of: np.ndarray) -> None:
    """A group on both sides of a split or of two folds leaks: refused, naming it (a given split or fold column can
    do that; the hold-outs made here never do)."""
    if manifest.group is None:
        return
    parts: dict[str, set[str]] = {}
    for group, part, k in zip(manifest.group, split, fold_of, strict=True):
        parts.setdefault(group, set()).add("test" if part == "test" else f"fold {k}" if k >= 0 else str(part))
    straddling = sorted(group for group, found in parts.items() if len(found) > 1)
    if straddling:
        raise ValueError(
            f"the manifest's group {straddling[0]!r} has images in {' and '.join(sorted(parts[straddling[0]]))} "
            f"({len(straddling)} groups straddle): one group's images must stay together"
        )
