"""The multi-label recipe's figures: `configs/recipes/multilabel_scenes.yaml` from scratch on generated scenes, as a
user runs it, then `test` at the thresholds tuned on validation beside `test` at 0.5 for every label.

Prints test mAP (threshold-free), and test macro F1 and subset accuracy at the tuned thresholds next to the same at
0.5, as a ratio: the tuned thresholds must beat 0.5 on macro F1. Docs: docs/recipes.md.

    python -m benchmarks.multilabel                  # 300 scenes, seed 0: about 3 minutes on a 2-core CPU
    python -m benchmarks.multilabel --seed 1 --count 600
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=300, help="scenes to generate (default 300)")
    parser.add_argument("--seed", type=int, default=0, help="the scene generator's seed (default 0)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        classifier("demo-data", "scenes", str(root / "scenes"), "--count", str(args.count), "--seed", str(args.seed))
        started = time.perf_counter()
        classifier(
            "fit", "--config", RECIPE, "--data.manifest", str(root / "scenes" / "labels.csv"),
            "--trainer.logger.init_args.save_dir", str(root / "lightning_logs"),
            "--trainer.enable_progress_bar", "false",
        )  # fmt: skip
        fit_s = time.perf_counter() - started
        (best,) = (root / "lightning_logs").glob("multilabel_scenes/version_*/checkpoints/best.ckpt")
        at_half = test_metrics(best, "--model.thresholds", "0.5")
        tuned = test_metrics(best)
    print(f"multi-label scenes ({args.count}, seed {args.seed}): fit {fit_s:.0f} s; test mAP {tuned['test/map']:.4f}")
    print(f"{'test figure':<24} {'tuned':>8} {'at 0.5':>8} {'ratio':>7}")
    for name in ("f1_macro", "f1_micro", "subset_acc"):
        value, reference = tuned[f"test/{name}"], at_half[f"test/{name}"]
        print(f"{name:<24} {value:>8.4f} {reference:>8.4f} {value / max(reference, 1e-12):>7.3f}")
    beats = tuned["test/f1_macro"] > at_half["test/f1_macro"]
    print(f"tuned thresholds beat 0.5 on test macro F1: {'yes' if beats else 'NO'}")


if __name__ == "__main__":
    main()
