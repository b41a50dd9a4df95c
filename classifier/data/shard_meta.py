"""What `classifier shard` records beside the chunks, and where shards are: a folder, or a URL LitData streams.

Read without LitData where the shards are a folder; a URL's metadata comes through LitData's own clients.
"""

from __future__ import annotations

import json
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from classifier.data.splits import Splits, read_splits

META_FILE = "classifier_shards.json"  # beside the splits' folders: classes, task, split table, settings
FORMAT = 1
REMOTE_SCHEMES = ("s3://", "gs://", "azure://", "r2://", "hf://", "local:")  # hf:// is read as Parquet: refused


@dataclass(frozen=True)
class ShardMeta:
    """What `classifier shard` recorded beside the chunks."""

    location: str  # where they were read from (a folder or a URL)
    classes: list[str]
    task: str  # multiclass or multilabel
    root: str  # the folder the split table's paths start from, when they were written
    outside_root: bool  # the table may hold absolute paths (a manifest's)
    split_table: str  # splits.csv's text: every image, its split and fingerprint
    counts: dict[str, int]  # samples written per split
    skipped: list[str]  # unreadable files left out (--data.skip_bad_images), as the table names them
    settings: dict[str, Any]  # the data settings they were written with

    def split_location(self, name: str) -> str:
        """Where split `name`'s chunks are: a folder, or a URL LitData reads."""
        return f"{self.location.rstrip('/')}/{name}"


def litdata_location(location: str) -> str:
    """`location` as LitData reads it: `file://PATH` becomes LitData's `local:PATH`, which streams a folder the way
    it streams a bucket (chunks copied into the cache); URLs and folders as given."""
    return "local:" + location.removeprefix("file://") if location.startswith("file://") else location


def is_remote(location: str) -> bool:
    """Whether LitData reads `location` through a client and a local cache rather than in place."""
    return litdata_location(location).startswith(REMOTE_SCHEMES)


def read_meta(location: str, storage_options: dict | None = None) -> ShardMeta:
    """The metadata of the shards at `location` (a folder or URL; `storage_options` for its store's client), with a
    clear error when there are none."""
    if location.startswith("hf://"):
        raise ValueError(
            f"--data.shards {location}: LitData reads hf:// URLs as Parquet datasets, not as chunks; download the "
            "repo (`hf download --repo-type dataset ID --local-dir DIR`) and pass DIR"
        )
    source = litdata_location(location)
    if is_remote(source):
        with tempfile.TemporaryDirectory() as scratch:
            local = Path(scratch) / META_FILE
            try:
                from litdata.streaming.downloader import get_downloader  # optional: the [shards] extra

                remote = f"{source.rstrip('/')}/{META_FILE}"
                get_downloader(source, scratch, [], storage_options).download_file(remote, str(local))
                text = local.read_text()
            except Exception as error:  # noqa: BLE001 - each client raises its own kind; the message names it
                raise FileNotFoundError(
                    f"--data.shards {location}: cannot read {META_FILE} there ({type(error).__name__}: {error}). "
                    "Shards are written by `classifier shard --output DIR`; see docs/data.md for the credentials "
                    "each object store needs"
                ) from error
    else:
        path = Path(location) / META_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"--data.shards {location} holds no {META_FILE}: write shards with `classifier shard --config ... "
                "--output DIR`"
            )
        text = path.read_text()
    meta = json.loads(text)
    if meta.get("format") != FORMAT:
        raise ValueError(f"--data.shards {location}: shard format {meta.get('format')}, this version reads {FORMAT}")
    fields = {key: meta[key] for key in ShardMeta.__dataclass_fields__ if key != "location"}
    return ShardMeta(location=location, **fields)


def shard_splits(
    meta: ShardMeta,
    splits_file: str | None,
    folds: tuple[int | None, int],
    checkpoint: Path | None,
    table: bytes | None,
) -> Splits:
    """The split the shards were written with; refused beside --data.splits or another fold (num_folds, fold), or
    beside a checkpoint trained on another split, since the shards hold their own."""
    settings = meta.settings
    written = (settings.get("num_folds"), settings.get("fold", 0) if settings.get("num_folds") else 0)
    if folds[0] and tuple(folds) != written:
        held = f"fold {written[1]} of {written[0]}" if written[0] else "no folds"
        raise ValueError(
            f"--data.num_folds {folds[0]} --data.fold {folds[1]} with --data.shards {meta.location}, which hold "
            f"{held}: write shards of each fold with `classifier shard --data.num_folds K --data.fold I`"
        )
    if splits_file:
        raise ValueError(
            f"--data.splits {splits_file} with --data.shards {meta.location}: shards hold the split they were written "
            "with; write shards of that split with `classifier shard --data.splits FILE`"
        )
    if table is not None and zlib.decompress(table).decode() != meta.split_table:
        raise ValueError(
            f"--data.shards {meta.location} hold another split than checkpoint {checkpoint} was trained on: "
            "evaluate it on the shards (or the folder) it was trained from"
        )
    return read_splits(
        meta.split_table,
        f"--data.shards {meta.location}",
        Path(meta.root),
        meta.classes,
        settings.get("num_folds"),
        settings.get("fold", 0),
        meta.outside_root,
        meta.task == "multilabel",
    )


def split_files(splits: Splits, meta: ShardMeta, name: str) -> tuple[list[Path], list]:
    """Split `name`'s files and labels in the shards' row order: the table's, less those left out as unreadable."""
    skipped = {splits.root / path for path in meta.skipped}
    kept = [(path, label) for path, label in zip(*splits.subset(name), strict=True) if path not in skipped]
    if len(kept) != meta.counts.get(name, 0):
        raise ValueError(
            f"--data.shards {meta.location}: the {name} split lists {len(kept)} images and its shards hold "
            f"{meta.counts.get(name, 0)}; write the shards again"
        )
    return [path for path, _ in kept], [label for _, label in kept]
