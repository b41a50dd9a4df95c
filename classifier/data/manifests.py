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

from classifier.data.splits import LABEL_SEPARATOR, SPLITS, Splits, assign_splits, encode_labels, label_set

FORMATS = (".csv", ".tsv", ".parquet", ".jsonl", ".ndjson")


@dataclass
class Manifest:
    """The rows of a manifest, checked: each path relative to `root` (or absolute), its label (multi-label: its
    labels, joined by LABEL_SEPARATOR), and the optional columns (None when the manifest has no such column)."""

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
            message = f"--data.manifest {path}: reading Parquet needs pyarrow: pip install 'classifier[parquet]'"
            raise ImportError(message) from None
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
    label_delimiter: str | None = None,
    label_columns: list[str] | None = None,
) -> Manifest:
    """The manifest's rows, checked; a one-line error naming the row (1 is the first after the header) otherwise:
    an empty path, a missing file, an empty label, an unknown split, a path listed twice. Not `strict` (the audit),
    a path listed again is left out and recorded in `repeated` instead.

    Multi-label: `label_delimiter` splits the label column into a set, or `label_columns` reads one 0/1 column per
    class; an empty set (none of the classes) is a label like any other.
    """
    source = Path(manifest)
    if not source.is_file():
        raise FileNotFoundError(f"--data.manifest {source} does not exist")
    base = manifest_root(source, root)
    rows = list(_records(source))
    if not rows:
        raise ValueError(f"--data.manifest {source} lists no images")
    needed = [(path_column, "path_column")]
    needed += [(name, "label_columns") for name in label_columns] if label_columns else [(label_column, "label_column")]
    for column, option in needed:
        if column not in rows[0]:
            raise ValueError(
                f"--data.manifest {source} has no column {column!r} (--data.{option}); it has {', '.join(rows[0])}"
            )
    multilabel = bool(label_delimiter or label_columns)
    paths, labels, seen, repeated, keep = [], [], {}, [], [True] * len(rows)
    for number, row in enumerate(rows, 1):
        text = _text(row.get(path_column))
        if not text:
            raise ValueError(f"--data.manifest {source}, row {number}: the {path_column!r} column is empty")
        path = Path(text)
        if not os.path.lexists(base / path):
            raise FileNotFoundError(f"--data.manifest {source}, row {number}: {base / path} does not exist")
        where = f"--data.manifest {source}, row {number}"
        label = _labels(row, label_column, label_delimiter, label_columns, where)
        if not label and not multilabel:
            raise ValueError(f"{where}: {text} has no {label_column!r}")
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
    split = _column(rows, "split")
    if split is not None:
        for number, value in enumerate(split, 1):
            if value not in SPLITS:
                raise ValueError(
                    f"--data.manifest {source}, row {number}: split {value!r} is not one of {', '.join(SPLITS)}"
                )
        split = [value for value, kept in zip(split, keep, strict=True) if kept]
    rows = [row for row, kept in zip(rows, keep, strict=True) if kept]
    folds = _column(rows, "fold")
    fold = None
    if folds is not None:
        try:
            fold = [int(value) if value != "" else -1 for value in folds]
        except ValueError as error:
            raise ValueError(
                f"--data.manifest {source}: the fold column holds a value that is not a number: {error}"
            ) from None
    return Manifest(base, paths, labels, split, fold, _column(rows, "group"), repeated)


def _text(value: object) -> str:
    return "" if value is None else str(value).strip()


TRUE, FALSE = {"1", "1.0", "true", "yes"}, {"0", "0.0", "false", "no", ""}


def _labels(row: dict, column: str, delimiter: str | None, columns: list[str] | None, where: str) -> str:
    """One row's label; multi-label, its sorted set joined by LABEL_SEPARATOR (a label may not contain it)."""
    if columns:
        values = {name: _text(row.get(name)).lower() for name in columns}
        odd = {name: value for name, value in values.items() if value not in TRUE | FALSE}
        if odd:
            name = next(iter(odd))
            raise ValueError(f"{where}: column {name!r} holds {row.get(name)!r}, not 0 or 1 (--data.label_columns)")
        names = {name for name, value in values.items() if value in TRUE}
    elif delimiter:
        names = {part.strip() for part in _text(row.get(column)).split(delimiter)} - {""}
    else:
        return _text(row.get(column))
    clash = sorted(name for name in names if LABEL_SEPARATOR in name)
    if clash:
        raise ValueError(f"{where}: the label {clash[0]!r} holds {LABEL_SEPARATOR!r}, which separates labels")
    return LABEL_SEPARATOR.join(sorted(names))


def _column(rows: list[dict], name: str) -> list[str] | None:
    return [_text(row.get(name)) for row in rows] if name in rows[0] else None


def manifest_splits(
    manifest: Manifest,
    classes: list[str] | None = None,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 42,
    num_folds: int | None = None,
    fold: int = 0,
    multilabel: bool = False,
) -> Splits:
    """Every listed image with its split: the manifest's `split` column when it has one, else hold-outs of the given
    fractions, stratified by label; whole groups at a time when it has a `group` column. Under k-fold, its `fold`
    column when it has one, else stratified (group) folds over all but the test split. `multilabel` reads each
    label as a set (see `read_manifest`); its classes are those given, else every label met, sorted."""
    sets = [label_set(label, multilabel) for label in manifest.labels]
    classes = list(classes) if classes else sorted(set().union(*sets))
    unknown = sorted(set().union(*sets) - set(classes))
    if unknown:
        raise ValueError(f"the manifest's labels {unknown} are not among the classes {classes}")
    labels = encode_labels(sets, classes, multilabel)
    groups = None if manifest.group is None else np.array(manifest.group, dtype=object)
    given = manifest.split is not None
    split = np.array(manifest.split if given else ["train"] * len(labels), dtype=object)
    test, val = (0.0, 0.0) if given else (test_fraction, val_fraction)
    folds = None if manifest.fold is None else np.array(manifest.fold)
    fold_of = assign_splits(split, labels, classes, manifest.root, test, val, seed, num_folds, fold, groups, folds)
    _check_groups(manifest, split, fold_of)
    return Splits(manifest.root, classes, manifest.paths, labels, split.astype(str), fold_of, [""] * len(labels))


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
