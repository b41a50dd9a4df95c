"""Where a run's split comes from: a recorded split table (--data.splits, or the checkpoint's), a manifest, or the
class folders; whichever it is, the datamodule gets the same `Splits`."""

from __future__ import annotations

import logging
import zlib
from pathlib import Path
from typing import Any

from classifier.data.manifests import manifest_root, manifest_splits, read_manifest
from classifier.data.splits import Splits, build_splits, read_splits

log = logging.getLogger(__name__)


def recorded_split(
    splits_file: str | None, checkpoint: Path | None, table: bytes | None, data_dir: str
) -> tuple[str, str] | None:
    """(split table, where from): --data.splits, or the compressed `table` the checkpoint was trained on."""
    if splits_file:
        if not Path(splits_file).is_file():
            raise FileNotFoundError(f"--data.splits {splits_file} does not exist")
        return Path(splits_file).read_text(), f"--data.splits {splits_file}"
    if checkpoint is None:
        return None
    if table is None:
        log.warning(
            "%s records no split (it predates split tables): the split is made again from %s as it is now",
            checkpoint,
            data_dir,
        )
        return None
    return zlib.decompress(table).decode(), f"checkpoint {checkpoint}"


def make_splits(hp: Any, recorded: tuple[str, str] | None, multilabel: bool, from_file: bool = False) -> Splits:
    """The split `recorded`, else the manifest's, else the folder's, from the datamodule's settings `hp`. A table
    `from_file` (--data.splits) of a manifest's images has its paths from the manifest's root; a checkpoint's, from
    the data_dir it recorded (or the one given, where the images moved)."""
    carving = (hp.val_fraction, hp.test_fraction, hp.seed, hp.num_folds, hp.fold)
    classes = hp.classes or hp.label_columns
    if multilabel and not hp.manifest:
        raise ValueError("--data.label_delimiter and --data.label_columns read a --data.manifest; it is not set")
    if recorded is not None:
        root = manifest_root(hp.manifest, hp.manifest_root) if hp.manifest and from_file else Path(hp.data_dir)
        return read_splits(*recorded, root, classes, hp.num_folds, hp.fold, bool(hp.manifest), multilabel)
    if hp.manifest:
        label_options = (hp.label_delimiter, hp.label_columns)
        listed = read_manifest(hp.manifest, hp.manifest_root, hp.path_column, hp.label_column, True, *label_options)
        return manifest_splits(listed, classes, *carving, multilabel)
    return build_splits(Path(hp.data_dir), hp.classes, *carving)
