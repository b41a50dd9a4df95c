"""lr_find's rules on the bundled digits config: the rate each suggests from one sweep, and the test accuracy that rate
trains to over several seeds, beside the config's own rate. Target: a rule's mean within 0.3 points of the config's.

`classifier lr_find --config configs/resnet18.yaml` sweeps once and writes its points (lr_find.csv); every rule reads
the same points (`classifier.training.lr_find.suggest`). Each rate then trains the config with each seed
(`benchmarks/bundled_digits.py`'s `measure`: only `seed_everything` changes, so the split stays the same), and its
best checkpoint is tested without TTA.

    python -m benchmarks.lr_find                       # 3 rules and the config's rate, 3 seeds: about 15 minutes
    python -m benchmarks.lr_find --rules valley --seeds 42
    python -m benchmarks.lr_find --seeds 3 --quick     # a smoke run: a short sweep, test_resnet, 2 training batches
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.bundled_digits import CONFIG, QUICK_FIT, classifier, measure, seeds_parser
from classifier.training.lr_find import suggest

RULES = ("valley", "minimum", "steepest")
TARGET_POINTS = 0.3


def sweep(root: Path, quick: bool) -> tuple[np.ndarray, np.ndarray]:
    """One `classifier lr_find` of the config: the rates and smoothed losses it wrote."""
    short = ["--num_training", "20", "--model.backbone", "test_resnet"] if quick else []
    classifier("lr_find", "--config", CONFIG, "--trainer.logger.save_dir", str(root), *short)
    (points,) = root.rglob("lr_find.csv")
    lrs, losses = np.loadtxt(points, delimiter=",", skiprows=1, unpack=True)
    return lrs, losses


def main(argv: list[str] | None = None) -> None:
    parser = seeds_parser(__doc__.splitlines()[0])
    parser.add_argument("--rules", nargs="+", choices=RULES, default=list(RULES))
    options = parser.parse_args(argv)
    fit_options = QUICK_FIT.copy() if options.quick else []
    with tempfile.TemporaryDirectory() as scratch:
        runs = options.runs or Path(scratch)
        lrs, losses = sweep(runs / "sweep", options.quick)
        rates = {"config": None} | {rule: (suggest(lrs, losses, rule) or (None,))[0] for rule in options.rules}
        rows = []
        for name, rate in rates.items():
            if name != "config" and rate is None:
                rows.append({"rate": name, "lr": None, "accuracies": [], "mean": None})
                continue
            lr = ["--model.optimizer.lr", f"{rate:.3g}"] if rate else []
            seeds = [measure(seed, runs / name, ["none"], fit_options + lr)["acc_none"] for seed in options.seeds]
            rows.append({"rate": name, "lr": rate, "accuracies": seeds, "mean": float(np.mean(seeds))})
    reference = rows[0]["mean"]
    if options.out:
        options.out.write_text(json.dumps(rows, indent=2) + "\n")
    print(f"rate | lr | test accuracy, seeds {' '.join(map(str, options.seeds))} | mean | points from the config's")
    for row in rows:
        if row["mean"] is None:
            print(f"{row['rate']} | none suggested | | |")
            continue
        lr = "config's" if row["lr"] is None else f"{row['lr']:.3g}"
        gap = 100 * (row["mean"] - reference)
        verdict = "" if row["lr"] is None else f" ({'within' if gap >= -TARGET_POINTS else 'outside'} the target)"
        accuracies = " ".join(f"{value:.4f}" for value in row["accuracies"])
        print(f"{row['rate']} | {lr} | {accuracies} | {row['mean']:.4f} | {gap:+.2f}{verdict}")


if __name__ == "__main__":
    main()
