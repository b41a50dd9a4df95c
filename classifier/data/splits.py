"""Which image goes to train, val or test: folder layouts, stratified hold-outs, k-fold, and frozen split tables."""

from __future__ import annotations

import csv
import io
import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from classifier.core.atomic import write_text
from classifier.core.imageio import IMAGE_EXTENSIONS, is_image_file, list_images
from classifier.data.file_facts import UNREADABLE, verify_files
from classifier.data.stratify import stratified_folds, stratified_holdout

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
SHOWN_FILES = 20  # files named in an error; the count says how many more
LABEL_SEPARATOR = ";"  # between the labels of one image in a multi-label split table


@dataclass
class Splits:
    """One row per image: its path (relative to `root`), class index (multi-label: a 0/1 row, one column per class),
    split, fold, and content fingerprint."""

    root: Path
    classes: list[str]
    paths: list[Path]
    labels: np.ndarray
    split: np.ndarray
    fold: np.ndarray  # -1 outside k-fold and for test rows
    fingerprints: list[str]  # each file's hash (`fingerprints()`) when the split was made; "" until computed

    @property
    def multilabel(self) -> bool:
        """Whether each image has a set of labels (a 0/1 row) rather than one class."""
        return self.labels.ndim == 2

    def subset(self, name: str) -> tuple[list[Path], list[int] | list[list[int]]]:
        """Full paths and class indices (multi-label: 0/1 rows) of one split, in path order."""
        rows = np.flatnonzero(self.split == name)
        return [self.root / self.paths[i] for i in rows], self.labels[rows].tolist()

    def class_counts(self, name: str = "train") -> list[int]:
        """Images per class in one split, in class-index order (multi-label: images carrying each label)."""
        chosen = self.labels[self.split == name]
        if self.multilabel:
            return chosen.sum(axis=0).astype(int).tolist()
        return np.bincount(chosen, minlength=len(self.classes)).tolist()

    def label_text(self, row: int) -> str:
        """The row's class name; multi-label, its labels joined by LABEL_SEPARATOR ("" for none)."""
        if self.multilabel:
            return LABEL_SEPARATOR.join(self.classes[i] for i in np.flatnonzero(self.labels[row]))
        return self.classes[self.labels[row]]

    def verify(self, name: str, source: str, hashes: dict[Path, str] | None = None) -> None:
        """Check that the files of split `name` are still those recorded in `source`, given the file hash of each
        (`verify_files`; looked up when not given); record the unrecorded ones."""
        rows = np.flatnonzero(self.split == name)
        root = str(self.root)
        missing = [self.paths[i] for i in rows if not os.path.lexists(os.path.join(root, self.paths[i]))]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} images of the {name} split recorded in {source} are missing from {self.root}:\n"
                f"{_listing(missing)}\nRestore them, or give the split to evaluate with --data.splits FILE "
                "(a splits.csv: path,label,split)."
            )
        now = (
            fingerprints(self.root, [self.paths[i] for i in rows])
            if hashes is None
            else [hashes[self.root / self.paths[i]] for i in rows]
        )
        changed = [  # an unreadable file is the decode check's to report, with its reason
            self.paths[i]
            for i, new in zip(rows, now, strict=True)
            if self.fingerprints[i] not in ("", new) and new != UNREADABLE
        ]
        if changed:
            raise ValueError(
                f"{len(changed)} images of the {name} split recorded in {source} have changed since (their size "
                f"or bytes differ):\n{_listing(changed)}\nRestore the originals, or, to evaluate the files as they "
                "are now, give the split with --data.splits FILE (a splits.csv without the fingerprint column)."
            )
        for i, new in zip(rows, now, strict=True):
            self.fingerprints[i] = new

    def record(self, hashes: dict[Path, str]) -> None:
        """Take the file hash of every row not yet recorded from `hashes` (`verify_files`), so that `to_csv` need not
        look them up again."""
        for i, value in enumerate(self.fingerprints):
            if not value and (found := hashes.get(self.root / self.paths[i])):
                self.fingerprints[i] = found

    def unlisted(self) -> list[Path]:
        """Images under `root` that this split does not hold, such as files added since it was made."""
        listed = set(self.paths)
        return [path for path in list_images(self.root) if path.relative_to(self.root) not in listed]

    def to_csv(self) -> str:
        """`path,label,split[,fold],fingerprint`, paths relative to `root`, so the table moves with the folder."""
        unknown = [i for i, value in enumerate(self.fingerprints) if not value]
        for i, value in zip(unknown, fingerprints(self.root, [self.paths[i] for i in unknown]), strict=True):
            self.fingerprints[i] = value
        with_fold = bool((self.fold >= 0).any())
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(["path", "label", "split", *(["fold"] if with_fold else []), "fingerprint"])
        for i, path in enumerate(self.paths):
            fold = [str(self.fold[i]) if self.fold[i] >= 0 else ""] if with_fold else []
            writer.writerow([path.as_posix(), self.label_text(i), self.split[i], *fold, self.fingerprints[i]])
        return text.getvalue()


def partitions(splits: Splits) -> list[str]:
    """The part of the data each image belongs to: test, else its fold under k-fold, else its split. Copies in two
    parts leak: under k-fold, one fold's copy is trained on when the other validates."""
    return [
        "test" if split == "test" else f"fold {fold}" if fold >= 0 else str(split)
        for split, fold in zip(splits.split, splits.fold, strict=True)
    ]


def write_split_files(
    folder: Path, table: str, unlisted: list[Path], data_dir: str, source: str | None, checkpoint: Path | None
) -> None:
    """splits.csv (`table`) into a run folder; with images of `data_dir` that the split recorded in `source` does not
    hold, also unlisted_images.txt, and what to do with them."""
    folder.mkdir(parents=True, exist_ok=True)
    write_text(folder / "splits.csv", table)
    if unlisted:
        listed = folder / "unlisted_images.txt"
        write_text(listed, "".join(f"{path.absolute()}\n" for path in unlisted))
        log.warning(
            "%d images under %s are in no split: the split recorded in %s does not hold them (added since?). "
            "They are listed in %s. Classify them with `classifier predict --ckpt_path %s --data.predict_dir "
            "%s`, or test them with --data.splits FILE, a splits.csv that lists them (path,label,split).",
            len(unlisted),
            data_dir,
            source,
            listed,
            checkpoint or "CKPT",
            listed,
        )


def fingerprints(root: Path, paths: list[Path]) -> list[str]:
    """The file hash of each `root / path` (`<bytes>-<BLAKE2b-64>`, or UNREADABLE for a file that cannot be
    opened): any edit, re-encode or replacement under the same name changes it. From the verification cache."""
    checked = verify_files([root / path for path in paths], root, num_threads=2 * (os.cpu_count() or 1))
    return [facts.file_hash for facts in checked.values()]


def _listing(paths: list[Path]) -> str:
    """One indented line per path, the first SHOWN_FILES of them."""
    lines = [f"  {path}" for path in paths[:SHOWN_FILES]]
    if len(paths) > SHOWN_FILES:
        lines.append(f"  ... and {len(paths) - SHOWN_FILES} more")
    return "\n".join(lines)


def read_splits(
    text: str,
    source: str,
    root: Path,
    classes: list[str] | None,
    num_folds: int | None,
    fold: int,
    outside_root: bool = False,
    multilabel: bool = False,
) -> Splits:
    """The split table written by `Splits.to_csv` (a run's splits.csv, or a checkpoint's copy of it).

    Paths are taken relative to `root`; absolute paths outside it are refused, unless `outside_root` (a manifest's
    absolute paths stay as they are). Under k-fold, the `fold` column decides val (`fold`) and train (the other
    folds); the fingerprint column is optional. `multilabel` reads each label as a LABEL_SEPARATOR-joined set.
    """
    rows = list(csv.DictReader(io.StringIO(text)))
    absent = {"path", "label", "split"} - set(rows[0] if rows else ())
    if absent:
        raise ValueError(f"{source} is not a split table: it needs the columns path,label,split (missing {absent})")
    if num_folds is not None and "fold" not in rows[0]:
        raise ValueError(f"{source} has no fold column, so it cannot give fold {fold} of --data.num_folds {num_folds}")
    sets = [label_set(row["label"], multilabel) for row in rows]
    classes = list(classes) if classes else sorted(set().union(*sets))
    unknown = set().union(*sets) - set(classes)
    if unknown:
        raise ValueError(f"{source} has labels {sorted(unknown)} that are not among the classes {classes}")
    bad = {row["split"] for row in rows} - set(SPLITS)
    if bad:
        raise ValueError(f"{source} has splits {sorted(bad)}; each row's split must be one of {', '.join(SPLITS)}")
    paths = [Path(row["path"]) for row in rows]
    outside = [path for path in paths if path.is_absolute() and not path.is_relative_to(root.absolute())]
    if outside and not outside_root:
        raise ValueError(f"{source} lists images outside --data.data_dir {root}:\n{_listing(outside)}")
    paths = [path.relative_to(root.absolute()) if path.is_relative_to(root.absolute()) else path for path in paths]
    repeated = sorted(path for path, count in Counter(paths).items() if count > 1)
    if repeated:
        raise ValueError(f"{source} lists images more than once:\n{_listing(repeated)}")
    split = np.array([row["split"] for row in rows], dtype=object)
    fold_of = np.array([int(row["fold"]) if row.get("fold") else -1 for row in rows], dtype=np.int64)
    if num_folds is not None:
        held = fold_of >= 0
        if set(fold_of[held].tolist()) != set(range(num_folds)):
            raise ValueError(f"{source}'s folds {sorted(set(fold_of[held].tolist()))} are not those of "
                             f"--data.num_folds {num_folds}")  # fmt: skip
        split[held] = np.where(fold_of[held] == fold, "val", "train")
    return Splits(
        root,
        classes,
        paths,
        encode_labels(sets, classes, multilabel),
        split.astype(str),
        fold_of,
        [row.get("fingerprint") or "" for row in rows],
    )


def label_set(text: str, multilabel: bool) -> set[str]:
    """A table's or manifest's label: one class, or under multi-label a LABEL_SEPARATOR-joined set (empty: no
    label)."""
    if not multilabel:
        return {text}
    return {name for name in text.split(LABEL_SEPARATOR) if name}


def encode_labels(sets: list[set[str]], classes: list[str], multilabel: bool) -> np.ndarray:
    """Class indices of one-class sets, or multi-label a 0/1 row per set, one column per class."""
    index = {name: i for i, name in enumerate(classes)}
    if not multilabel:
        return np.array([index[next(iter(names))] for names in sets], dtype=np.int64)
    labels = np.zeros((len(sets), len(classes)), dtype=np.int64)
    for row, names in enumerate(sets):
        labels[row, [index[name] for name in names]] = 1
    return labels


def scan_class_folders(root: Path) -> dict[str, list[Path]]:
    """Class name -> images, for a folder holding one subfolder per class."""
    folders = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not folders:
        raise ValueError(f"{root} has no class subfolders: put each class's images in a folder named after it")
    found = {}
    for folder in folders:
        images = list_images(folder)
        if not images:
            raise ValueError(
                f"class folder {folder} holds no images (looked for {', '.join(IMAGE_EXTENSIONS)}, in any case): add "
                "its images, or remove the folder"
            )
        found[folder.name] = images
    return found


def split_layout(data_dir: Path) -> dict[str, Path]:
    """Split name -> folder: train/ [val/] [test/] when present, else data_dir's class folders as train.

    A folder named train, val or test that holds images itself, or that sits beside other folders, may be a class
    folder rather than a split: refuse the guess.
    """
    folders = [d for d in data_dir.iterdir() if d.is_dir() and not d.name.startswith(".")]
    named = [name for name in SPLITS if (data_dir / name) in folders]
    if not named:
        return {"train": data_dir}
    others = sorted(d.name for d in folders if d.name not in SPLITS)
    direct = [name for name in named if any(is_image_file(p) and p.is_file() for p in (data_dir / name).iterdir())]
    if others or direct:
        found = f"{data_dir} has folders named {', '.join(named)} " + (
            f"beside other folders ({', '.join(others[:5])}{', ...' if len(others) > 5 else ''})"
            if others
            else f"holding images directly ({', '.join(direct)})"
        )
        raise ValueError(
            f"{found}: is {'/'.join(named)} a class or a split? Folders named train, val and test are read as "
            "splits of class folders. If they are classes, rename them (for example to class_test); if they are "
            "splits, put every class folder inside them, and nothing else beside them."
        )
    if "train" not in named:
        raise ValueError(f"{data_dir} has {'/'.join(named)} folders but no train/ folder")
    return {name: data_dir / name for name in named}


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
    layout = split_layout(data_dir)
    scanned = {name: scan_class_folders(folder) for name, folder in layout.items()}
    classes = list(classes) if classes else sorted(scanned["train"])
    class_to_idx = {name: i for i, name in enumerate(classes)}

    paths, labels, origin = [], [], []
    for split_name, by_class in scanned.items():
        for class_name, images in by_class.items():
            if class_name not in class_to_idx:
                raise ValueError(
                    f"class folder {layout[split_name] / class_name} is not one of the {len(classes)} training "
                    f"classes ({', '.join(classes)}): add {layout['train'] / class_name}/ with training images, or "
                    "remove or rename the folder"
                )
            folder = layout[split_name] / class_name  # list_images's paths begin with it: cut, not relative_to
            under, start = folder.relative_to(data_dir).as_posix(), len(str(folder))
            paths += [Path(under + str(image)[start:]) for image in images]
            labels += [class_to_idx[class_name]] * len(images)
            origin += [split_name] * len(images)
        absent = [name for name in classes if name not in by_class]
        if split_name != "train" and absent:
            log.warning(
                "%s holds no folder for %d of the %d classes (%s): its scores cannot measure them. Add their folders "
                "to measure them.", layout[split_name], len(absent), len(classes), ", ".join(absent)
            )  # fmt: skip
    order = np.argsort([str(p) for p in paths], kind="stable")
    paths = [paths[i] for i in order]
    labels = np.asarray(labels, dtype=np.int64)[order]
    split = np.asarray(origin, dtype=object)[order]

    test = test_fraction if "test" not in layout else 0.0
    val = val_fraction if "val" not in layout else 0.0
    fold_of = assign_splits(split, labels, classes, layout["train"], test, val, seed, num_folds, fold)
    return Splits(data_dir, classes, paths, labels, split.astype(str), fold_of, [""] * len(paths))


def assign_splits(
    split: np.ndarray,
    labels: np.ndarray,
    classes: list[str],
    folder: Path,
    test_fraction: float,
    val_fraction: float,
    seed: int,
    num_folds: int | None,
    fold: int,
    groups: np.ndarray | None = None,
    given_folds: np.ndarray | None = None,
) -> np.ndarray:
    """Carve the test split, then the folds (or the val split), out of the rows `split` marks train, in place;
    returns each row's fold (-1 outside k-fold and for test rows). Stratified by label; with `groups`, whole groups
    at a time. Under k-fold, rows already marked val join the folds, which `given_folds` gives when it is known."""
    fold_of = np.full(len(labels), -1, dtype=np.int64)
    pool = np.flatnonzero(split == "train")
    pool_size = len(pool)
    if test_fraction > 0:
        pool, held = hold_out(pool, labels, test_fraction, pool_size, seed, "test", folder, classes, groups)
        split[held] = "test"
    if num_folds is not None:
        pool = np.sort(np.concatenate([pool, np.flatnonzero(split == "val")]))
        if given_folds is not None:
            fold_of[pool] = given_folds[pool]
        else:
            in_pool = None if groups is None else groups[pool]
            for k, val_rows in enumerate(stratified_folds(labels[pool], num_folds, seed, in_pool)):
                fold_of[pool[val_rows]] = k
        split[pool] = np.where(fold_of[pool] == fold, "val", "train")
    elif val_fraction > 0:
        _, held = hold_out(pool, labels, val_fraction, pool_size, seed, "val", folder, classes, groups)
        split[held] = "val"
    return fold_of


def hold_out(
    rows: np.ndarray,
    labels: np.ndarray,
    fraction: float,
    pool_size: int,
    seed: int,
    name: str,
    folder: Path,
    classes: list[str],
    groups: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Split `rows` into (kept, held out): `fraction` of `pool_size` held out, stratified by label (label sets:
    iteratively); with `groups`, one fold of a stratified group k-fold of 1/fraction folds, so that no group is on
    both sides."""
    if groups is not None:
        held = next(stratified_folds(labels[rows], max(2, round(1 / fraction)), seed, groups[rows]))
        return np.sort(np.delete(rows, held)), np.sort(rows[held])
    size = round(fraction * pool_size)
    if size == 0:
        return rows, rows[:0]
    alone = []  # a label set cannot be split this way; iterative stratification spreads what it can
    if labels.ndim == 1:
        alone = [classes[i] for i in np.flatnonzero(np.bincount(labels[rows], minlength=len(classes)) == 1)]
    if alone:
        raise ValueError(
            f"cannot carve a stratified {name} split from {folder}: a class needs 2 images left for it, one to train "
            f"on and one to {name}, and these have 1: {', '.join(alone[:SHOWN_FILES])}. Add images to them, remove "
            f"their folders, or give the {name} images yourself in a {name}/ folder beside train/ (or "
            f"--data.{name}_fraction 0)"
        )
    try:
        kept, held = stratified_holdout(labels[rows], size, seed)
    except ValueError as error:
        raise ValueError(
            f"cannot carve a stratified {name} split of {size} images from {folder}: {error}. "
            f"Add images to the smallest classes, or change --data.{name}_fraction"
        ) from error
    return np.sort(rows[kept]), np.sort(rows[held])
