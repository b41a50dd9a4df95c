"""`classifier shard`: the split fit would train on, written as LitData shards for `fit --data.shards`, when the data
outgrows what one disk and one file system hold and list quickly."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from rich.table import Table

from classifier.cli.base import ParsedCLI
from classifier.core.console import lightning_silenced, print_table
from classifier.data.shard_writer import Written, new_output, write_shards
from classifier.data.splits import SPLITS
from classifier.data.workers import available_cores

log = logging.getLogger(__name__)

MB = 1e6


def shard(argv: list[str]) -> Path:
    """Check the images as fit does, write each split's shards and their metadata; returns the shards' folder."""
    parser = argparse.ArgumentParser(
        prog="classifier shard",
        description="Write the frozen split of a folder or a manifest (with fit's --config and --data options) as "
        "LitData shards: each split's images as their original bytes, with labels, paths and fingerprints. Train "
        "on them with `classifier fit --data.shards DIR` (or the URL you copy DIR to).",
    )
    parser.add_argument("--output", required=True, help="a new folder for the shards")
    parser.add_argument("--chunk_bytes", default="64MB", help="size of each chunk file (default 64MB)")
    parser.add_argument("--num_workers", type=int, help="processes writing chunks (default: one per core)")
    options, fit_args = parser.parse_known_args(argv)
    new_output(options.output)  # before the images are read
    with lightning_silenced():
        cli = ParsedCLI(args=fit_args, run=False)
    datamodule = cli.datamodule
    if datamodule.hparams.shards:
        raise ValueError(f"--data.shards {datamodule.hparams.shards}: shard reads a folder or a manifest, not shards")
    kept = datamodule.checked_splits(SPLITS, "fit")  # bad files refused or skipped, copies warned of, as fit does
    settings = {key: value for key, value in datamodule.hparams.items() if not key.startswith("_")}
    workers = options.num_workers or available_cores()
    written = write_shards(datamodule.splits, kept, options.output, options.chunk_bytes, workers, settings)
    show(written)
    return written.output


def show(written: Written) -> None:
    """Images and megabytes per split, of the shards and of the files they hold."""
    table = Table(title=f"Shards in {written.output}")
    for column in ("split", "images", "shards (MB)", "files (MB)"):
        table.add_column(column, justify="left" if column == "split" else "right")
    for name in SPLITS:
        if written.counts[name]:
            sizes = (written.sizes[name] / MB, written.source_bytes[name] / MB)
            table.add_row(name, str(written.counts[name]), *(f"{size:.2f}" for size in sizes))
    print_table(table)
    log.info("Train on them: classifier fit --data.shards %s (with the same --model options)", written.output)
