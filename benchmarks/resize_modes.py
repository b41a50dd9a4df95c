"""What each `--data.resize_mode` costs or saves on wide images, as a user runs it.

The data: the bundled digits (real 8x8 scans), each scaled to 24 px and placed at a random place along a 24 x 72
strip of noise: a square centre crop keeps the strip's middle third, where half of the digits are not centred and
nearly all are cut. `configs/resnet18.yaml`
is fitted on them for a few epochs at a square 32 px with each mode, and at 32 x 96 (the strips' own aspect) with
letterbox, then tested. The square `crop` (today's default) is the reference each other run's test accuracy is
divided by: squash and letterbox see every digit, crop only the middle third of the strips.

    python -m benchmarks.resize_modes                # four fits, about 10 minutes on a 2-core CPU
    python -m benchmarks.resize_modes --epochs 3
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
RUNS = (("32 crop (reference)", "32", "crop"), ("32 squash", "32", "squash"), ("32 letterbox", "32", "letterbox"),
        ("32x96 letterbox", "[32, 96]", "letterbox"))  # fmt: skip
DIGIT, HEIGHT, WIDTH = 24, 24, 72


def classifier(*args: str) -> None:
    """`classifier ARGS` from the repository root, as a user runs it."""
    done = subprocess.run([sys.executable, "-m", "classifier", *args], cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"classifier {' '.join(args)} failed:\n{done.stderr[-3000:]}")


def write_strips(digits: Path, root: Path, seed: int) -> Path:
    """Each digit of `digits` scaled to 24 px at a random place along a 24 x 72 strip of noise, under root/<class>/."""
    rng = np.random.default_rng(seed)
    for path in sorted(digits.rglob("*.png")):
        strip = rng.integers(0, 48, (HEIGHT, WIDTH), dtype=np.uint8)
        digit = np.asarray(Image.open(path).convert("L").resize((DIGIT, DIGIT), Image.Resampling.NEAREST))
        left = int(rng.integers(0, WIDTH - DIGIT + 1))
        strip[:, left : left + DIGIT] = np.maximum(strip[:, left : left + DIGIT], digit)
        (root / path.parent.name).mkdir(parents=True, exist_ok=True)
        Image.fromarray(strip).save(root / path.parent.name / path.name)
    return root


def fit_and_test(data: Path, logs: Path, size: str, mode: str, epochs: int) -> tuple[float, float]:
    """`configs/resnet18.yaml` fitted on `data` at `size` with `mode`, then tested: (fit seconds, test accuracy)."""
    started = time.perf_counter()
    classifier(
        "fit", "--config", "configs/resnet18.yaml", "--data.data_dir", str(data), "--data.image_size", size,
        "--data.resize_mode", mode, "--trainer.max_epochs", str(epochs), "--trainer.logger.init_args.save_dir",
        str(logs), "--data.hflip", "0",
    )  # fmt: skip
    fit_s = time.perf_counter() - started
    (best,) = logs.glob("resnet18/version_*/checkpoints/best.ckpt")
    classifier("test", "--ckpt_path", str(best))
    return fit_s, json.loads((best.parents[1] / "test" / "metrics.json").read_text())["test/acc"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5, help="epochs of each fit (default 5)")
    parser.add_argument("--seed", type=int, default=0, help="where the digits sit on their strips (default 0)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        data = write_strips(REPO / "data" / "digits", Path(tmp) / "strips", args.seed)
        runs = enumerate(RUNS)
        results = [
            (name, *fit_and_test(data, Path(tmp) / f"run{i}", size, mode, args.epochs))
            for i, (name, size, mode) in runs
        ]
    reference = results[0][2]
    print(f"Digits on 24 x 72 strips, resnet18, {args.epochs} epochs (strip seed {args.seed})")
    print(f"  {'run':<22} {'fit s':>6} {'test acc':>9} {'ratio':>6}")
    for name, fit_s, accuracy in results:
        print(f"  {name:<22} {fit_s:>6.0f} {accuracy:>9.4f} {accuracy / max(reference, 1e-12):>6.3f}")


if __name__ == "__main__":
    main()
