"""Which image goes to train, val or test: folder layouts, stratified hold-outs and k-fold."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedKFold, train_test_split

from classifier.images import IMAGE_EXTENSIONS, list_images

SPLITS = ("train", "val", "test")


@dataclass
class Splits:
    """One row per image: its path, class index, split and, under k-fold, the fold that validates it."""

    classes: list[str]
    paths: list[Path]
    labels: np.ndarray
    split: np.ndarray
    fold: np.ndarray  # -1 outside k-fold and for test rows

    def subset(self, name: str) -> tuple[list[Path], list[int]]:
        """Paths and class indices of one split, in path order."""
        rows = np.flatnonzero(self.split == name)
        return [self.paths[i] for i in rows], self.labels[rows].tolist()

    def class_counts(self, name: str = "train") -> list[int]:
        """Images per class in one split, in class-index order."""
        return np.bincount(self.labels[self.split == name], minlength=len(self.classes)).tolist()

    def write_csv(self, path: Path) -> None:
        """`path,label,split` (plus `fold` under k-fold), so a run's data can be audited and reproduced."""
        with_fold = bool((self.fold >= 0).any())
        with open(path, "w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(["path", "label", "split"] + (["fold"] if with_fold else []))
            for i, image in enumerate(self.paths):
                row = [str(image), self.classes[self.labels[i]], self.split[i]]
                if with_fold:
                    row.append(str(self.fold[i]) if self.fold[i] >= 0 else "")
                writer.writerow(row)


def scan_class_folders(root: Path) -> dict[str, list[Path]]:
    """Class name -> images, for a folder holding one subfolder per class."""
    folders = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not folders:
        raise ValueError(f"{root} has no class subfolders: put each class's images in a folder named after it")
    found = {}
    for folder in folders:
        images = list_images(folder)
        if not images:
            raise ValueError(f"class folder {folder} holds no images (looked for {', '.join(IMAGE_EXTENSIONS)})")
        found[folder.name] = images
    return found


def build_splits(
    data_dir: Path,
    classes: list[str] | None = None,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 42,
    num_folds: int | None = None,
    fold: int = 0,
) -> Splits:
    """Read `data_dir` (class folders, or train/ [val/] [test/] of class folders) and assign every image a split.

    A missing val/ or test/ is carved from train/ by its fraction, stratified by class. Under k-fold, val/ (if
    present) joins train/ and the folds cover both; the test split stays the same for every fold.
    """
    if not data_dir.is_dir():
        raise FileNotFoundError(f"--data.data_dir {data_dir} does not exist: point it at a folder of class subfolders")
    if num_folds is not None and not (num_folds >= 2 and 0 <= fold < num_folds):
        raise ValueError(f"--data.fold {fold} is not in [0, {num_folds}) or --data.num_folds {num_folds} is below 2")
    layout = {name: data_dir / name for name in SPLITS if (data_dir / name).is_dir()}
    if "train" not in layout:
        if layout:
            raise ValueError(f"{data_dir} has {'/'.join(layout)} folders but no train/ folder")
        layout = {"train": data_dir}
    scanned = {name: scan_class_folders(folder) for name, folder in layout.items()}
    classes = list(classes) if classes else sorted(scanned["train"])
    class_to_idx = {name: i for i, name in enumerate(classes)}

    paths, labels, origin = [], [], []
    for split_name, by_class in scanned.items():
        for class_name, images in by_class.items():
            if class_name not in class_to_idx:
                raise ValueError(
                    f"class folder {layout[split_name] / class_name} is not one of the {len(classes)} training "
                    f"classes ({', '.join(classes)})"
                )
            paths += images
            labels += [class_to_idx[class_name]] * len(images)
            origin += [split_name] * len(images)
    order = np.argsort([str(p) for p in paths], kind="stable")
    paths = [paths[i] for i in order]
    labels = np.asarray(labels, dtype=np.int64)[order]
    split = np.asarray(origin, dtype=object)[order]
    fold_of = np.full(len(paths), -1, dtype=np.int64)

    pool = np.flatnonzero(split == "train")
    pool_size = len(pool)
    if "test" not in layout and test_fraction > 0:
        pool, held = _hold_out(pool, labels, round(test_fraction * pool_size), seed, "test", layout["train"])
        split[held] = "test"
    if num_folds is not None:
        pool = np.sort(np.concatenate([pool, np.flatnonzero(split == "val")]))
        folds = StratifiedKFold(n_splits=num_folds, shuffle=True, random_state=seed)
        for k, (_, val_rows) in enumerate(folds.split(np.zeros(len(pool)), labels[pool])):
            fold_of[pool[val_rows]] = k
        split[pool] = np.where(fold_of[pool] == fold, "val", "train")
    elif "val" not in layout and val_fraction > 0:
        _, held = _hold_out(pool, labels, round(val_fraction * pool_size), seed, "val", layout["train"])
        split[held] = "val"
    return Splits(classes, paths, labels, split.astype(str), fold_of)


def _hold_out(
    rows: np.ndarray, labels: np.ndarray, size: int, seed: int, name: str, folder: Path
) -> tuple[np.ndarray, np.ndarray]:
    """Split `rows` into (kept, held out), `size` held out, stratified by label."""
    if size == 0:
        return rows, rows[:0]
    try:
        kept, held = train_test_split(rows, test_size=size, stratify=labels[rows], random_state=seed)
    except ValueError as error:
        raise ValueError(
            f"cannot carve a stratified {name} split of {size} images from {folder}: {error}. "
            f"Add images to the smallest classes, or change --data.{name}_fraction"
        ) from error
    return np.sort(kept), np.sort(held)
