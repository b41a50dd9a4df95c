"""The data audit and the verification cache it shares with `fit`, on a generated folder of small JPEGs with
planted copies.

    python -m benchmarks.check_data --out check_data.json     # 20,000 originals + planted copies, a few minutes
    python -m benchmarks.check_data --quick                   # 600 originals: a smoke run, seconds
    python -m benchmarks.check_data --images 2000 --sizes 300 500   # photo-sized: the fixed costs' share

Reported, each against a reference measured in the same run:
- the first `classifier check-data` (empty cache) in seconds and img/s, over a plain loop that decodes every file
  to RGB with PIL (the floor), single-threaded and in as many threads as the audit uses;
- the second audit on the unchanged folder, over the first;
- the data set-up of a second `classifier fit` (datamodule setup, which checks every file) and its time to the first
  training step, over the first fit's;
- recall of each kind of planted copy, and the precision of all reported pairs.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from lightning.pytorch import Callback
from PIL import Image

from classifier.cli.entry import cli_main
from classifier.data.file_facts import CACHE_ENV
from classifier.data.photos import CLASSES, render
from classifier.data.workers import available_cores

log = logging.getLogger("check_data")

PLANTED = ("exact", "recompressed", "resized", "cropped")  # cropped (5% off each side) is reported, not a target
TIMES_FILE = "CHECK_DATA_BENCH_TIMES"  # where the FitTimes callback writes, from the fit it runs in


class FitTimes(Callback):
    """Seconds from the trainer's creation (just before fit) to the end of the data set-up, and to the first step."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.times: dict[str, float] = {}

    def setup(self, trainer, pl_module, stage: str) -> None:  # after the datamodule's setup
        self.times["data_setup_s"] = time.perf_counter() - self.start

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self.times.setdefault("first_step_s", time.perf_counter() - self.start)
        Path(os.environ[TIMES_FILE]).write_text(json.dumps(self.times))


def write_folder(
    root: Path, count: int, sizes: tuple[int, int] = (64, 112), seed: int = 0
) -> dict[str, list[tuple[str, str]]]:
    """`count` distinct JPEGs (sides drawn from `sizes`) in three class folders, and copies of some of them planted
    beside (a share of each kind); the planted (copy, original) pairs by kind, as paths relative to `root`."""
    rng = np.random.default_rng(seed)
    originals = []
    for i in range(count):
        label = CLASSES[i % len(CLASSES)]
        width, height = (int(side) for side in rng.integers(sizes[0], sizes[1] + 1, size=2))
        path = Path(label) / f"{label}_{i:05d}.jpg"
        (root / label).mkdir(parents=True, exist_ok=True)
        Image.fromarray(render(label, width, height, rng)).save(root / path, quality=int(rng.integers(75, 96)))
        originals.append(path)
    planted: dict[str, list[tuple[str, str]]] = {kind: [] for kind in PLANTED}
    share = max(1, count // 100)  # 1% of the originals per kind
    chosen = rng.choice(len(originals), size=share * len(PLANTED), replace=False)
    for k, index in enumerate(chosen):
        kind, original = PLANTED[k // share], originals[index]
        copy = original.with_name(f"{original.stem}_{kind}.jpg")
        image = Image.open(root / original)
        if kind == "exact":
            shutil.copy(root / original, root / copy)
        elif kind == "recompressed":
            image.save(root / copy, quality=60)
        elif kind == "resized":
            image.resize((round(image.width * 0.8), round(image.height * 0.8)), Image.Resampling.BICUBIC).save(
                root / copy, quality=70
            )
        else:
            dx, dy = round(image.width * 0.05), round(image.height * 0.05)
            image.crop((dx, dy, image.width - dx, image.height - dy)).save(root / copy, quality=90)
        planted[kind].append((copy.as_posix(), original.as_posix()))
    return planted


def timed(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def decode(path: Path) -> None:
    with Image.open(path) as image:
        image.convert("RGB")


def audit(root: Path, out: Path) -> float:
    return timed(lambda: cli_main(["check-data", "--data.data_dir", str(root), "--out", str(out)]))


def fit(root: Path, work: Path, times: Path) -> dict[str, float]:
    """One training step of a tiny model on `root`: the FitTimes of its run."""
    os.environ[TIMES_FILE] = str(times)
    cli_main(["fit", "--data.data_dir", str(root), "--model.backbone", "test_resnet", "--data.image_size", "32",
              "--data.num_workers", "0", "--data.batch_size", "32", "--trainer.max_steps", "1",
              "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0",
              "--trainer.logger", "lightning.pytorch.loggers.CSVLogger",
              "--trainer.logger.save_dir", str(work / "logs"),
              "--trainer.enable_progress_bar", "false",
              "--trainer.callbacks+=benchmarks.check_data.FitTimes"])  # fmt: skip
    return json.loads(times.read_text())


def scores(report: Path, planted: dict[str, list[tuple[str, str]]], root: Path) -> dict[str, float]:
    """Recall per planted kind, and the precision of every reported pair."""
    with open(report / "duplicates.csv", newline="") as file:
        found = {
            frozenset(Path(row[key]).relative_to(root).as_posix() for key in ("path", "related"))
            for row in csv.DictReader(file)
        }
    expected = {frozenset(pair) for pairs in planted.values() for pair in pairs}
    result = {
        f"recall_{kind}": sum(frozenset(p) in found for p in pairs) / len(pairs) for kind, pairs in planted.items()
    }
    result["precision"] = len(found & expected) / len(found) if found else 1.0
    result["reported_pairs"] = len(found)
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, help="distinct originals, copies added (default 20,000; 600 quick)")
    parser.add_argument("--sizes", type=int, nargs=2, default=(64, 112), help="smallest and largest side, px")
    parser.add_argument("--quick", action="store_true", help="600 originals unless --images says: a smoke run")
    parser.add_argument("--out", type=Path, help="write the figures as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.images is None:
        args.images = 600 if args.quick else 20_000
    threads = 2 * available_cores()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        root = work / "photos"
        start = time.perf_counter()
        planted = write_folder(root, args.images, tuple(args.sizes))
        paths = sorted(root.rglob("*.jpg"))
        print(f"{len(paths)} JPEGs written in {time.perf_counter() - start:.0f} s")
        os.environ[CACHE_ENV] = str(work / "cache")
        figures: dict = {"images": len(paths), "threads": threads}
        figures["plain_decode_s"] = timed(lambda: [decode(path) for path in paths])
        with ThreadPoolExecutor(threads) as pool:
            figures["plain_decode_threads_s"] = timed(lambda: list(pool.map(decode, paths, chunksize=16)))
        figures["first_audit_s"] = audit(root, work / "audit_1")
        figures["second_audit_s"] = audit(root, work / "audit_2")
        figures["first_audit_img_s"] = len(paths) / figures["first_audit_s"]
        figures["first_audit_vs_plain"] = figures["first_audit_s"] / figures["plain_decode_s"]
        figures["first_audit_vs_plain_threads"] = figures["first_audit_s"] / figures["plain_decode_threads_s"]
        figures["second_audit_vs_first"] = figures["second_audit_s"] / figures["first_audit_s"]
        figures |= scores(work / "audit_1", planted, root)
        os.environ[CACHE_ENV] = str(work / "fit_cache")  # the fits start from an empty cache too
        first, second = fit(root, work, work / "times_1.json"), fit(root, work, work / "times_2.json")
        figures |= {f"first_fit_{key}": value for key, value in first.items()}
        figures |= {f"second_fit_{key}": value for key, value in second.items()}
        for key in first:
            figures[f"second_fit_{key.removesuffix('_s')}_vs_first"] = second[key] / first[key]
    for key, value in figures.items():
        print(f"{key:36} {value:10.3f}" if isinstance(value, float) else f"{key:36} {value:10}")
    if args.out:
        args.out.write_text(json.dumps(figures, indent=2) + "\n")
    return figures


if __name__ == "__main__":
    main()
