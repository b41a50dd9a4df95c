"""LitData shards (`classifier shard`, `--data.shards`) beside the folder they were written from, on one machine.

Two datasets: the bundled digits (data/digits, 1,797 PNGs of about 120 bytes, where a file per image costs most)
and `classifier demo-data photos` (JPEG and PNG photos, 300-640 px, where decoding costs most). Each is written as
shards with `classifier shard` (its split: `configs/resnet18.yaml`'s, seed 42), then:

- throughput: the training loader of each CPU data path over the same training split, iterated without a trainer
  (`ImageFolderDataModule(...).setup("fit")`, then `train_dataloader()`): `--data.shards` (LitData), the folder
  (`--data.decode cpu`, the reference) and `--data.cache ram`. Each batch is then moved and normalised as the trainer
  has it done (`transfer_batch_to_device`, `on_after_batch_transfer`: the RAM cache's crops are cut there). Images
  per second of the best epoch after the first, and each path's ratio to the folder's;
- size on disk: the shards' bytes (chunks, index.json and classifier_shards.json) beside the folder's files, both
  as the files' sizes and as the blocks the file system allocates (each tiny file takes a whole block);
- accuracy: `classifier fit --config configs/resnet18.yaml` on the digits from the folder and from the shards, for
  each seed, then `classifier test`: test accuracy side by side (they should agree within seed noise), and the
  run's own training images/s from its summary.json.

    python -m benchmarks.shards --out shards.json    # 6 minutes on an idle 2-core VM, most of it the six fits
    python -m benchmarks.shards --quick              # a smoke test (tiny data, one fit each): about a minute, most of
                                                     # it the imports of the seven `classifier` commands it runs
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
CONFIG = "configs/resnet18.yaml"
PATHS = ("folder", "shards", "cache=ram")  # the folder (--data.decode cpu) is every ratio's reference
DATASETS = {  # name -> the datamodule's options for the loader runs: configs/resnet18.yaml's, photos_cpu.yaml's
    "digits": {"image_size": 32, "crop_pct": 1.0, "hflip": 0.0, "crop_scale": (0.6, 1.0), "color_jitter": None},
    "photos": {"image_size": 64, "crop_pct": 1.0, "hflip": 0.5, "crop_scale": (0.5, 1.0)},
}


def classifier(*args: str) -> None:
    """`classifier ARGS` from the repository root, as a user runs it."""
    done = subprocess.run([sys.executable, "-m", "classifier", *args], cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"classifier {' '.join(args)} failed:\n{done.stderr[-3000:]}")


def subset(source: Path, target: Path, per_class: int) -> Path:
    """The first `per_class` images of each class folder of `source`, copied under `target`."""
    for folder in sorted(path for path in source.iterdir() if path.is_dir()):
        (target / folder.name).mkdir(parents=True)
        for path in sorted(folder.iterdir())[:per_class]:
            shutil.copy2(path, target / folder.name / path.name)
    return target


def disk_bytes(root: Path) -> tuple[int, int, int]:
    """(files, their bytes, the bytes the file system allocates for them, as `du` counts) under root."""
    files = [path for path in root.rglob("*") if path.is_file()]
    stats = [path.stat() for path in files]
    return len(files), sum(s.st_size for s in stats), sum(s.st_blocks * 512 for s in stats)


def loader_speed(options: dict, epochs: int) -> float:
    """Images/s of the best epoch after the first of the datamodule's training loader, with `options`."""
    from classifier.data.datamodule import ImageFolderDataModule

    datamodule = ImageFolderDataModule(**options)
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    cpu, speeds = torch.device("cpu"), []
    for _ in range(epochs):
        started, images = time.perf_counter(), 0
        for batch in loader:  # as the trainer takes it: to the device (the cache's crops are cut there), normalised
            batch = datamodule.on_after_batch_transfer(datamodule.transfer_batch_to_device(batch, cpu, 0), 0)
            images += len(batch[0])
        speeds.append(images / (time.perf_counter() - started))
    return max(speeds[1:])


def throughput(data: Path, shards: Path, options: dict, args: argparse.Namespace) -> dict[str, float]:
    """Images/s of each data path's training loader over the same split, interleaved over the repeats so that a slow
    spell of the machine hits every path alike; each keeps its best."""
    common = {"data_dir": str(data), "batch_size": args.batch_size, "num_workers": args.workers, "seed": 42, **options}
    flags = {"folder": {"decode": "cpu"}, "shards": {"shards": str(shards)}, "cache=ram": {"cache": "ram"}}
    speeds = dict.fromkeys(PATHS, 0.0)
    for _ in range(args.repeats):
        for path in PATHS:
            speeds[path] = max(speeds[path], loader_speed({**common, **flags[path]}, args.epochs))
            logging.info("%s, %s: %.0f img/s", data.name, path, speeds[path])
    return speeds


def fit_and_test(root: Path, seed: int, source: tuple[str, ...], args: argparse.Namespace) -> dict[str, float]:
    """CONFIG fitted under `seed` from `source` (the folder's or the shards' flags), then tested: test accuracy, and
    the fit's training images/s (best epoch after the first) from its summary.json."""
    logs = root / f"seed_{seed}"
    started = time.perf_counter()
    classifier(
        "fit", "--config", CONFIG, *source, "--seed_everything", str(seed), "--trainer.max_epochs",
        str(args.fit_epochs), "--trainer.logger.init_args.save_dir", str(logs), "--data.num_workers", str(args.workers),
        *args.fit_flags,
    )  # fmt: skip
    fit_s = time.perf_counter() - started
    (best,) = logs.glob("*/version_*/checkpoints/best.ckpt")
    classifier("test", "--ckpt_path", str(best))
    summary = json.loads((best.parents[1] / "summary.json").read_text())
    per_epoch = summary["epoch_train_images_per_s"]
    accuracy = json.loads((best.parents[1] / "test" / "metrics.json").read_text())["test/acc"]
    return {"test_acc": accuracy, "fit_s": fit_s, "fit_img_s": max(per_epoch[1:] or per_epoch)}


def ratio(value: float, reference: float) -> float:
    return value / reference if reference else float("nan")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke test: 20 digits, 8 photos a class, 1 fit")
    parser.add_argument("--digits-per-class", type=int, help="a subset of the bundled digits (default: all 1,797)")
    parser.add_argument("--photos-per-class", type=int, default=100, help="demo-data photos per class (default 100)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1, help="loader workers of every path (default 1)")
    parser.add_argument("--epochs", type=int, default=3, help="loader epochs; the first is warm-up (default 3)")
    parser.add_argument("--repeats", type=int, default=2, help="rounds of the loader runs; each keeps its best")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2], help="fits' seeds (default 42 1 2)")
    parser.add_argument("--fit-epochs", type=int, default=5, help="epochs of each fit (default 5)")
    parser.add_argument("--out", type=Path, help="write the figures as JSON")
    args = parser.parse_args(argv)
    args.fit_flags = []
    if args.quick:
        args.digits_per_class, args.photos_per_class, args.epochs, args.repeats = 20, 8, 2, 1
        args.seeds, args.fit_epochs, args.workers, args.batch_size = args.seeds[:1], 1, 0, 8
        args.fit_flags = ["--model.backbone", "test_resnet"]
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(0)

    figures: dict = {"datasets": {}, "accuracy": []}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        digits = REPO / "data" / "digits"
        if args.digits_per_class:
            digits = subset(digits, root / "digits", args.digits_per_class)
        photos = root / "photos"
        classifier("demo-data", "photos", str(photos), "--per_class", str(args.photos_per_class))
        for name, data in (("digits", digits), ("photos", photos)):
            shards = root / f"{name}-shards"
            split = ("--config", CONFIG, "--data.data_dir", str(data))
            started = time.perf_counter()
            classifier("shard", *split, "--output", str(shards), "--num_workers", str(max(args.workers, 1)))
            shard_s = time.perf_counter() - started
            meta = json.loads((shards / "classifier_shards.json").read_text())
            files, file_bytes, file_blocks = disk_bytes(data)
            chunks, shard_bytes, shard_blocks = disk_bytes(shards)
            speeds = throughput(data, shards, DATASETS[name], args)
            figures["datasets"][name] = {
                "images": sum(meta["counts"].values()),
                "train_images": meta["counts"]["train"],
                "shard_s": shard_s,
                "img_s": speeds,
                "img_s_vs_folder": {path: ratio(speed, speeds["folder"]) for path, speed in speeds.items()},
                "folder": {"files": files, "bytes": file_bytes, "allocated": file_blocks},
                "shards": {"files": chunks, "bytes": shard_bytes, "allocated": shard_blocks},
                "bytes_vs_folder": ratio(shard_bytes, file_bytes),
                "allocated_vs_folder": ratio(shard_blocks, file_blocks),
            }
        shards = root / "digits-shards"
        for seed in args.seeds:
            row = {"seed": seed}
            sources = {"folder": ("--data.data_dir", str(digits)), "shards": ("--data.shards", str(shards))}
            for source, flags in sources.items():
                found = fit_and_test(root / source, seed, flags, args)
                row |= {f"{source}_{key}": value for key, value in found.items()}
                logging.info("seed %d, %s: test acc %.4f, %.0f img/s in fit", seed, source, found["test_acc"],
                             found["fit_img_s"])  # fmt: skip
            figures["accuracy"].append(row)
    figures["settings"] = {key: str(value) for key, value in vars(args).items() if key != "out"}
    figures["machine"] = f"{os.cpu_count()} CPU cores, torch {torch.get_num_threads()} threads"
    show(figures, args)
    if args.out:
        args.out.write_text(json.dumps(figures, indent=2) + "\n")


def show(figures: dict, args: argparse.Namespace) -> None:
    """The figures, each beside the folder's."""
    print(f"\nTraining loader, batch {args.batch_size}, {args.workers} workers, {figures['machine']}")
    print(f"  {'dataset':<8} {'path':<10} {'img/s':>8} {'/folder':>8}")
    for name, found in figures["datasets"].items():
        for path, speed in found["img_s"].items():
            print(f"  {name:<8} {path:<10} {speed:>8.0f} {found['img_s_vs_folder'][path]:>8.2f}")
    print("\nSize on disk (MB): the folder's files; the shards' chunks, index.json files and classifier_shards.json")
    print(f"  {'dataset':<8} {'images':>6} {'':<8} {'files':>6} {'bytes':>8} {'allocated':>10}")
    for name, found in figures["datasets"].items():
        for what in ("folder", "shards"):
            size = found[what]
            print(
                f"  {name:<8} {found['images']:>6} {what:<8} {size['files']:>6} {size['bytes'] / 1e6:>8.2f} "
                f"{size['allocated'] / 1e6:>10.2f}"
            )
        print(f"  {name:<8} {'':>6} {'/folder':<8} {'':>6} {found['bytes_vs_folder']:>8.2f} "
              f"{found['allocated_vs_folder']:>10.2f}")  # fmt: skip
    epochs = f"{args.fit_epochs} epoch{'s' if args.fit_epochs != 1 else ''}"
    print(f"\nDigits, {CONFIG}, {epochs}: test accuracy, and training img/s of the fit")
    print(f"  {'seed':>4} {'folder':>8} {'shards':>8} {'diff':>8} {'folder img/s':>13} {'shards img/s':>13}")
    for row in figures["accuracy"]:
        print(
            f"  {row['seed']:>4} {row['folder_test_acc']:>8.4f} {row['shards_test_acc']:>8.4f} "
            f"{row['shards_test_acc'] - row['folder_test_acc']:>+8.4f} {row['folder_fit_img_s']:>13.0f} "
            f"{row['shards_fit_img_s']:>13.0f}"
        )


if __name__ == "__main__":
    main()
