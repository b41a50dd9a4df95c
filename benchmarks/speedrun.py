"""The speed run against the reference on the bundled digits: test accuracy and fit time, seed by seed, in one run.

Each seed fits `configs/recipes/speedrun_digits.yaml`, then `configs/resnet18.yaml` (only `seed_everything` changes,
so the split stays data.seed's), times each fit (the whole `classifier fit` process, imports included), and tests
each best checkpoint without TTA; beside them, the RBF SVM of `bundled_digits.py` on the same split. Prints one row
per seed, the mean, and the test errors of all seeds (the target: at most 7 of the 810 test digits over seeds 42, 1
and 2, a mean of 99.1%, in at most half the reference's time).

    python -m benchmarks.speedrun                    # seeds 42, 1 and 2: about 6 minutes on a 2-core CPU
    python -m benchmarks.speedrun --seeds 3 --quick  # a smoke run: test_resnet, 2 training batches
"""

from __future__ import annotations

import csv
import json
import tempfile
from pathlib import Path

from benchmarks.bundled_digits import CONFIG, QUICK_FIT, measure, seeds_parser

RECIPE = "configs/recipes/speedrun_digits.yaml"
NAMES = ["speedrun", "reference", "svm"]
COLUMNS = ["seed", "speedrun_acc", "speedrun_fit_s", "reference_acc", "reference_fit_s", "time_ratio", "svm_acc"]


def compare(seed: int, runs: Path, fit_options: list[str]) -> dict[str, float]:
    """One seed of the speed run and of the reference, one after the other, so both see the machine alike."""
    fast = measure(seed, runs / "speedrun", ["none"], fit_options, RECIPE)
    reference = measure(seed, runs / "reference", ["none"], fit_options, CONFIG)
    (splits,) = (runs / "speedrun" / f"seed_{seed}").glob("*/version_*/splits.csv")
    return {
        "seed": seed,
        "speedrun_acc": fast["acc_none"],
        "speedrun_fit_s": fast["fit_s"],
        "reference_acc": reference["acc_none"],
        "reference_fit_s": reference["fit_s"],
        "time_ratio": fast["fit_s"] / reference["fit_s"],
        "svm_acc": fast["svm_acc"],
        "test_images": sum(row["split"] == "test" for row in csv.DictReader(splits.read_text().splitlines())),
    }


def main(argv: list[str] | None = None) -> None:
    options = seeds_parser(__doc__.splitlines()[0]).parse_args(argv)
    fit_options = QUICK_FIT.copy() if options.quick else []
    with tempfile.TemporaryDirectory() as scratch:
        rows = [compare(seed, options.runs or Path(scratch), fit_options) for seed in options.seeds]
    mean = {column: sum(row[column] for row in rows) / len(rows) for column in COLUMNS[1:]}
    mean["time_ratio"] = mean["speedrun_fit_s"] / mean["reference_fit_s"]  # of the mean times, not mean of ratios
    if options.out:
        options.out.write_text(json.dumps({"rows": rows, "mean": mean}, indent=2) + "\n")
    print(" | ".join(COLUMNS))
    for row in [*rows, {**mean, "seed": "mean"}]:
        print(" | ".join(f"{row[c]:.4g}" if isinstance(row[c], float) else str(row[c]) for c in COLUMNS))
    errors = [f"{name} {round(sum((1 - row[f'{name}_acc']) * row['test_images'] for row in rows))}" for name in NAMES]
    print("test errors over all seeds: " + ", ".join(errors))


if __name__ == "__main__":
    main()
