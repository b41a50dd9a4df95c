"""The README's figures for the bundled digits: `classifier fit` + `test` over several seeds, against an RBF SVM.

Each seed trains `configs/resnet18.yaml` (only `seed_everything` changes, so the split stays the same), times the
fit, and tests the best checkpoint with each `--model.tta`. The reference is scikit-learn's `SVC()` (RBF kernel,
default settings) on the same train and test images as raw 8x8 pixels. Prints one row per seed, then min–max.

    python benchmarks/bundled_digits.py --seeds 42 1 2          # about 3 minutes a seed on a 2-core CPU
    python benchmarks/bundled_digits.py --seeds 42 1 2 --tta none --lr 0.00525
    python benchmarks/bundled_digits.py --seeds 3 --quick       # a smoke run: test_resnet, 2 training batches
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.svm import SVC

REPO = Path(__file__).resolve().parents[1]
CONFIG = "configs/resnet18.yaml"
# --quick's fit: a tiny model, 2 training batches and 1 validation batch; test and the SVM still see the whole split
QUICK_FIT = ["--model.backbone", "test_resnet", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
             "--trainer.limit_val_batches", "1"]  # fmt: skip


def classifier(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "classifier", *args], cwd=REPO, check=True, capture_output=True)


def svm_accuracy(splits_csv: Path, data_dir: Path) -> float:
    """An RBF SVM on the run's own train split, scored on its test split."""
    with open(splits_csv, newline="") as file:
        rows = list(csv.DictReader(file))
    features = {split: [] for split in ("train", "test")}
    labels = {split: [] for split in ("train", "test")}
    for row in rows:
        if row["split"] in features:
            features[row["split"]].append(np.asarray(Image.open(data_dir / row["path"]).convert("L"), float).ravel())
            labels[row["split"]].append(row["label"])
    svm = SVC().fit(np.array(features["train"]) / 255, labels["train"])
    return float(svm.score(np.array(features["test"]) / 255, labels["test"]))


def measure(seed: int, runs: Path, ttas: list[str], fit_options: list[str], config: str = CONFIG) -> dict[str, float]:
    """Fit `config` with one seed, then test its best checkpoint with each TTA policy."""
    run_root = runs / f"seed_{seed}"
    started = time.perf_counter()
    classifier("fit", "--config", config, "--seed_everything", str(seed), "--trainer.logger.save_dir", str(run_root),
               *fit_options)  # fmt: skip
    row = {"seed": seed, "fit_s": time.perf_counter() - started}
    (run,) = run_root.glob("*/version_*")
    row["val_f1"] = json.loads((run / "summary.json").read_text())["best_value"]
    for tta in ttas:
        policy = "null" if tta == "none" else tta
        classifier("test", "--ckpt_path", str(run / "checkpoints" / "best.ckpt"), "--model.tta", policy)
        newest = max(run_root.rglob("metrics.json"), key=lambda path: path.stat().st_mtime)
        metrics = json.loads(newest.read_text())
        row[f"acc_{tta}"], row[f"ece_{tta}"] = metrics["test/acc"], metrics["test/ece"]
    row["svm_acc"] = svm_accuracy(run / "splits.csv", REPO / "data" / "digits")
    return row


def seeds_parser(description: str) -> argparse.ArgumentParser:
    """The options of every benchmark that trains the digits over seeds: the seeds, where the runs go, the JSON
    output, and a smoke run."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2])
    parser.add_argument("--runs", type=Path, help="keep the runs here (default: a temporary folder)")
    parser.add_argument("--out", type=Path, help="also write the rows as JSON")
    parser.add_argument("--quick", action="store_true", help="a smoke run: test_resnet, 2 training batches, 1 epoch")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = seeds_parser(__doc__.splitlines()[0])
    parser.add_argument("--tta", nargs="+", default=["none", "crops", "flip", "flip_crops"])
    parser.add_argument("--lr", type=float, help="train at this rate instead of the config's")
    parser.add_argument("--max-epochs", type=int, help="train this many epochs instead of the config's")
    options = parser.parse_args(argv)
    fit_options = QUICK_FIT.copy() if options.quick else []
    fit_options += ["--model.optimizer.lr", str(options.lr)] if options.lr else []
    fit_options += ["--trainer.max_epochs", str(options.max_epochs)] if options.max_epochs else []
    with tempfile.TemporaryDirectory() as scratch:
        rows = [measure(seed, options.runs or Path(scratch), options.tta, fit_options) for seed in options.seeds]
    if options.out:
        options.out.write_text(json.dumps(rows, indent=2) + "\n")
    columns = list(rows[0])
    print(" | ".join(columns))
    for row in rows:
        print(" | ".join(f"{row[c]:.4g}" if isinstance(row[c], float) else str(row[c]) for c in columns))
    ranges = [f"{min(row[c] for row in rows):.4g}–{max(row[c] for row in rows):.4g}" for c in columns[1:]]
    print(" | ".join(["min–max", *ranges]))


if __name__ == "__main__":
    main()
