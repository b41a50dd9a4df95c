"""Writing a run's frozen split as LitData shards: one dataset of chunks per split, each sample the original file's
bytes (not decoded pixels) with its target, row, relative path and fingerprint; and the metadata beside them."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
from litdata import optimize

from classifier.core.atomic import write_text
from classifier.data.shard_meta import FORMAT, META_FILE, is_remote
from classifier.data.splits import SPLITS, Splits

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Written:
    """What `write_shards` wrote: samples and bytes per split, and where."""

    output: Path
    counts: dict[str, int]
    sizes: dict[str, int]  # bytes of chunks per split
    source_bytes: dict[str, int]  # bytes of the image files they hold


def encode(item: tuple[int, str, str, Any, str]) -> dict[str, Any]:
    """One sample: the file's bytes as they are on disk, its target (a class index, or a 0/1 uint8 row), its row in
    the split, its path relative to the data folder and its fingerprint."""
    row, path, relative, target, fingerprint = item
    target = np.asarray(target, dtype=np.uint8) if isinstance(target, list) else int(target)
    data = Path(path).read_bytes()
    return {"row": row, "image": data, "target": target, "path": relative, "fingerprint": fingerprint}


def write_shards(
    splits: Splits,
    kept: dict[str, tuple[list[Path], list]],
    output: str,
    chunk_bytes: str,
    num_workers: int,
    settings: dict[str, Any],
) -> Written:
    """`kept` (each split's readable files and targets, in row order) as LitData chunks under OUTPUT/<split>, and
    META_FILE beside them; an existing OUTPUT is refused, so shards are never half replaced. The train split is
    written in a seeded random order (each sample keeps its row): the table lists it class by class, and LitData's
    shuffle only mixes the samples of nearby chunks."""
    target = new_output(output)
    fingerprint = {path: splits.fingerprints[i] for i, path in enumerate(splits.paths)}
    counts, sizes, source_bytes = {}, {}, {}
    for name in SPLITS:
        paths, targets = kept.get(name, ([], []))
        counts[name] = len(paths)
        if not paths:
            continue
        relative = [relative_path(path, splits.root) for path in paths]
        items = [
            (row, str(path), rel.as_posix(), label, fingerprint.get(rel, ""))
            for row, (path, rel, label) in enumerate(zip(paths, relative, targets, strict=True))
        ]
        if name == "train":  # LitData shuffles chunks, then samples within a window of them: mixed chunks mix batches
            items = [items[i] for i in np.random.default_rng(settings.get("seed", 0)).permutation(len(items))]
        log.info("Writing the %s split: %d images", name, len(items))
        optimize(
            fn=encode,
            inputs=items,
            output_dir=str(target / name),
            chunk_bytes=chunk_bytes,
            num_workers=min(num_workers, len(items)),
            reorder_files=False,
            keep_data_ordered=True,  # in this order: an eval split streams in row order
            start_method="fork",
            verbose=True,
        )
        sizes[name] = sum(file.stat().st_size for file in (target / name).glob("*.bin"))
        source_bytes[name] = sum(path.stat().st_size for path in paths)
    listed = {path for name in SPLITS for path in kept.get(name, ([], []))[0]}
    skipped = [  # unreadable files --data.skip_bad_images left out
        path.as_posix()
        for path, split in zip(splits.paths, splits.split.tolist(), strict=True)
        if split in SPLITS and splits.root / path not in listed
    ]
    meta = {
        "format": FORMAT,
        "classes": splits.classes,
        "task": "multilabel" if splits.multilabel else "multiclass",
        "root": str(splits.root),
        "outside_root": bool(settings.get("manifest")),
        "split_table": splits.to_csv(),
        "counts": counts,
        "skipped": skipped,
        "settings": settings,
        "litdata": version("litdata"),
        "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "bytes": sizes,
    }
    write_text(target / META_FILE, json.dumps(meta, indent=1))
    return Written(target, counts, sizes, source_bytes)


def new_output(output: str) -> Path:
    """`output` as a folder to write shards into: refused when it is a URL, or a folder that holds anything."""
    if is_remote(output):
        raise ValueError(
            f"--output {output}: write shards to a local folder, then copy it to the object store (`aws s3 sync DIR "
            "s3://bucket/DIR`, `gcloud storage rsync -r DIR gs://bucket/DIR`); training reads the URL"
        )
    target = Path(output)
    if target.exists() and any(target.iterdir()):
        raise FileExistsError(f"--output {output} exists and is not empty: give a new folder")
    return target


def relative_path(path: Path, root: Path) -> Path:
    """`path` as the split table names it: relative to the data folder, or absolute when outside it (a manifest's)."""
    try:
        return path.relative_to(root)
    except ValueError:
        return path
