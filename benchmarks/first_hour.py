"""The first hour's accuracy targets, as a new user runs them: the figures `tests/test_first_hour*.py` no longer
time, each printed beside its target.

1. The README's main job on the bundled digits: `classifier lr_find --config configs/resnet18.yaml`, then `fit` with
   the rate it suggests and nothing else changed, then `test`. Target: at most 3 of the 270 test digits wrong (an RBF
   SVM on the same split gets 2-3, `benchmarks/bundled_digits.py`) and ECE under 0.15.
2. The photo config: `classifier demo-data photos DIR` (240 photos, 300-640 px), `fit --config configs/photos_cpu.yaml`,
   `test`. Target: test accuracy 0.9 (measured 1.0, 1.0 and 0.97 for generator seeds 0, 1, 2).

    python -m benchmarks.first_hour                 # both, about 10 minutes on a 2-core CPU
    python -m benchmarks.first_hour --only digits
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DIGITS_TEST_ACC = 267 / 270
DIGITS_TEST_ECE = 0.15
PHOTOS_TEST_ACC = 0.9


def classifier(*args: str) -> list[str]:
    """`classifier ARGS` from the repository root, as the README runs it; the lines it printed."""
    done = subprocess.run([sys.executable, "-m", "classifier", *args], cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"classifier {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return (done.stdout + done.stderr).splitlines()


def digits(root: Path) -> dict[str, float]:
    """lr_find, fit with its rate, test: the bundled config's test accuracy and ECE, and the fit's seconds."""
    logs = ["--trainer.logger.save_dir", str(root)]
    lr_find = classifier("lr_find", "--config", "configs/resnet18.yaml", *logs)
    (flag,) = [line.removeprefix("Use it with: ") for line in lr_find if line.startswith("Use it with: ")]
    started = time.perf_counter()
    classifier("fit", "--config", "configs/resnet18.yaml", *flag.split(), *logs)
    fit_s = time.perf_counter() - started
    (best,) = root.glob("resnet18/version_*/checkpoints/best.ckpt")
    classifier("test", "--ckpt_path", str(best))
    metrics = json.loads((best.parents[1] / "test" / "metrics.json").read_text())
    return {"acc": metrics["test/acc"], "ece": metrics["test/ece"], "fit_s": fit_s, "lr": float(flag.split()[-1])}


def photos(root: Path, seed: int) -> dict[str, float]:
    """The photo set of `seed`, fit with configs/photos_cpu.yaml and tested: its test accuracy and fit seconds."""
    folder = root / "my_photos"
    classifier("demo-data", "photos", str(folder), "--seed", str(seed))
    logs = ["--trainer.logger.init_args.save_dir", str(root / "lightning_logs")]
    started = time.perf_counter()
    classifier("fit", "--config", "configs/photos_cpu.yaml", "--data.data_dir", str(folder), *logs)
    fit_s = time.perf_counter() - started
    (best,) = (root / "lightning_logs").glob("photos_cpu/version_*/checkpoints/best.ckpt")
    classifier("test", "--ckpt_path", str(best))
    metrics = json.loads((best.parents[1] / "test" / "metrics.json").read_text())
    return {"acc": metrics["test/acc"], "fit_s": fit_s}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("digits", "photos"), help="run one of the two")
    parser.add_argument("--photo-seed", type=int, default=0, help="the photo generator's seed (default 0)")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.only in (None, "digits"):
            found = digits(Path(tmp) / "digits")
            rows.append(("digits: lr_find's rate, test acc", found["acc"], DIGITS_TEST_ACC, found["fit_s"]))
            rows.append(("digits: test ECE (lower is better)", found["ece"], DIGITS_TEST_ECE, found["fit_s"]))
        if args.only in (None, "photos"):
            found = photos(Path(tmp) / "photos", args.photo_seed)
            rows.append(
                (f"photos_cpu (seed {args.photo_seed}): test acc", found["acc"], PHOTOS_TEST_ACC, found["fit_s"])
            )
    print(f"{'figure':<40} {'measured':>9} {'target':>8} {'ratio':>7} {'fit s':>7}  met")
    for name, value, target, fit_s in rows:
        met = value <= target if "lower" in name else value >= target
        print(f"{name:<40} {value:>9.4f} {target:>8.4f} {value / target:>7.3f} {fit_s:>7.1f}  {'yes' if met else 'NO'}")


if __name__ == "__main__":
    main()
