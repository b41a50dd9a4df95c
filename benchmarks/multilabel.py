"""The multi-label recipe's figures: `configs/recipes/multilabel_scenes.yaml` from scratch on generated scenes, as a
user runs it, then `test` at the thresholds tuned on validation beside `test` at 0.5 for every label.

Two runs: the recipe as shipped on 300 scenes (its test mAP is the figure docs/recipes.md gives), and the recipe
cut to 10 epochs on 1,000 scenes, a model that still errs, whose 150 validation scenes have something to tune.
Each prints test mAP (threshold-free), and macro F1, micro F1 and subset accuracy at the tuned thresholds beside
the same at 0.5, as a ratio: the tuned thresholds must beat 0.5 on macro F1.

    python -m benchmarks.multilabel                  # both, about 8 minutes on a 2-core CPU
    python -m benchmarks.multilabel --seed 1
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
RECIPE = "configs/recipes/multilabel_scenes.yaml"


def classifier(*args: str) -> None:
    """`classifier ARGS` from the repository root, as a user runs it."""
    done = subprocess.run([sys.executable, "-m", "classifier", *args], cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"classifier {' '.join(args)} failed:\n{done.stderr[-3000:]}")


def test_metrics(best: Path, *flags: str) -> dict[str, float]:
    """`classifier test` of `best` with `flags`: its metrics.json."""
    classifier("test", "--ckpt_path", str(best), *flags)
    return json.loads((best.parents[1] / "test" / "metrics.json").read_text())


RUNS = (("recipe as shipped, 300 scenes", 300, None), ("10 epochs, 1,000 scenes", 1000, 10))


def run(root: Path, count: int, epochs: int | None, seed: int) -> tuple[float, dict, dict]:
    """Scenes of `seed`, the recipe fitted on them (`epochs`, else its own), and tested: (fit seconds, test metrics
    at the tuned thresholds, at 0.5)."""
    classifier("demo-data", "scenes", str(root / "scenes"), "--count", str(count), "--seed", str(seed))
    started = time.perf_counter()
    classifier(
        "fit", "--config", RECIPE, "--data.manifest", str(root / "scenes" / "labels.csv"),
        "--trainer.logger.init_args.save_dir", str(root / "lightning_logs"),
        "--trainer.enable_progress_bar", "false", *(["--trainer.max_epochs", str(epochs)] if epochs else []),
    )  # fmt: skip
    fit_s = time.perf_counter() - started
    (best,) = (root / "lightning_logs").glob("multilabel_scenes/version_*/checkpoints/best.ckpt")
    at_half = test_metrics(best, "--model.thresholds", "0.5")
    return fit_s, test_metrics(best), at_half


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="the scene generator's seed (default 0)")
    args = parser.parse_args(argv)
    for name, count, epochs in RUNS:
        with tempfile.TemporaryDirectory() as tmp:
            fit_s, tuned, at_half = run(Path(tmp), count, epochs, args.seed)
        print(f"{name} (seed {args.seed}): fit {fit_s:.0f} s; test mAP {tuned['test/map']:.4f}")
        print(f"  {'test figure':<12} {'tuned':>8} {'at 0.5':>8} {'ratio':>7}")
        for metric in ("f1_macro", "f1_micro", "subset_acc"):
            value, reference = tuned[f"test/{metric}"], at_half[f"test/{metric}"]
            print(f"  {metric:<12} {value:>8.4f} {reference:>8.4f} {value / max(reference, 1e-12):>7.3f}")
        beats = tuned["test/f1_macro"] > at_half["test/f1_macro"]
        print(f"  tuned thresholds beat 0.5 on test macro F1: {'yes' if beats else 'NO'}")


if __name__ == "__main__":
    main()
