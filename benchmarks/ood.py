"""How well a digits model says "unknown": the bundled digits fitted, calibrated with a rejection threshold, then
tested with photo-like images of shapes (discs, squares, stripes) as the unknowns, as a user runs each command.

One fit of `make train`'s config, `configs/resnet18.yaml`, with RECIPE's two changes: no label smoothing (which
caps how far a known digit's logits can rise above an unknown image's) and random erasing (patches of noise in
training, so that clutter adds little to any class); `--as-shipped` fits the config as it is, for comparison.
Then for each score, energy (the default) and msp (the maximum softmax probability, the reference),
`classifier calibrate --ood_score S` (the threshold that keeps 95% of the validation digits) and `classifier test
--data.ood_dir SHAPES` with the 240 images of `classifier demo-data photos`. It prints, per score and as the
energy/msp ratio: OOD AUROC (target 0.95), FPR at 95% TPR, the share of the shapes marked unknown (target: most,
over half) and of the 270 held-out test digits (target: few, at most 10%).

    python -m benchmarks.ood                  # about 3 minutes on a 2-core CPU
    python -m benchmarks.ood --seed 1 --out ood.json
    python -m benchmarks.ood --as-shipped     # configs/resnet18.yaml unchanged
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
CONFIG = "configs/resnet18.yaml"
RECIPE = ("--model.label_smoothing", "0.0", "--data.random_erasing", "0.25")
PHOTOS_PER_CLASS = 80  # `demo-data photos`' default: 240 shapes
SCORES = ("energy", "msp")
TARGET_AUROC = 0.95
MOST, FEW = 0.5, 0.1  # the shares of shapes and of test digits marked unknown the targets ask for at least, at most


def classifier(*args: str) -> None:
    """`classifier ARGS` from the repository root, as a user runs it."""
    done = subprocess.run([sys.executable, "-m", "classifier", *args], cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"classifier {' '.join(args)} failed:\n{done.stderr[-3000:]}")


def fit(root: Path, seed: int, flags: tuple[str, ...]) -> tuple[Path, float]:
    """The digits fitted with CONFIG and `flags`: (best.ckpt, seconds)."""
    started = time.perf_counter()
    logs = ("--trainer.logger.init_args.save_dir", str(root / "lightning_logs"))
    classifier("fit", "--config", CONFIG, *flags, *logs, "--seed_everything", str(seed))
    fit_s = time.perf_counter() - started
    (best,) = (root / "lightning_logs").glob("*/version_*/checkpoints/best.ckpt")
    return best, fit_s


def unknowns(best: Path, shapes: Path, score: str) -> dict[str, float]:
    """`calibrate --ood_score score`, then `test --data.ood_dir shapes` of the calibrated checkpoint: its
    metrics.json."""
    calibrated = best.with_name(f"best-{score}.ckpt")
    classifier("calibrate", "--ckpt_path", str(best), "--ood_score", score, "--output", str(calibrated))
    classifier("test", "--ckpt_path", str(calibrated), "--data.ood_dir", str(shapes))
    return json.loads((best.parents[1] / "test" / "metrics.json").read_text())


def run(root: Path, seed: int, flags: tuple[str, ...] = RECIPE) -> dict:
    """Shapes of the generator's `seed`, one fit, and each score's figures."""
    shapes = root / "shapes"
    classifier("demo-data", "photos", str(shapes), "--seed", str(seed), "--per_class", str(PHOTOS_PER_CLASS))
    best, fit_s = fit(root, seed, flags)
    figures = {score: unknowns(best, shapes, score) for score in SCORES}
    return {"seed": seed, "fit_s": fit_s, "test_acc": figures["energy"]["test/acc"], "scores": figures}


ROWS = (  # (what is printed, metrics.json key, target, whether higher is better)
    ("OOD AUROC", "ood/auroc", TARGET_AUROC, True),
    ("FPR at 95% TPR", "ood/fpr_at_95_tpr", None, False),
    ("shapes marked unknown", "ood/unknown_share_ood", MOST, True),
    ("test digits marked unknown", "ood/unknown_share_test", FEW, False),
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="the fit's seed and the shape generator's (default 0)")
    parser.add_argument("--as-shipped", action="store_true", help=f"fit {CONFIG} without RECIPE's changes")
    parser.add_argument("--out", type=Path, help="also write the figures here, as JSON")
    args = parser.parse_args(argv)
    flags = () if args.as_shipped else RECIPE
    with tempfile.TemporaryDirectory() as tmp:
        found = run(Path(tmp), args.seed, flags)
    energy, msp = (found["scores"][score] for score in SCORES)
    fitted = f"{CONFIG} {' '.join(flags)}".strip()
    print(f"{fitted} (seed {args.seed}): fit {found['fit_s']:.0f} s, test acc {found['test_acc']:.4f}")
    print(f"{energy['ood/images_test']} test digits, {energy['ood/images_ood']} shapes from `demo-data photos`")
    print(f"  {'figure':<27} {'energy':>8} {'msp':>8} {'ratio':>7} {'target':>7}  met (energy)")
    for name, key, target, higher in ROWS:
        value, reference = energy[key], msp[key]
        met = "" if target is None else "yes" if (value >= target if higher else value <= target) else "NO"
        shown = "" if target is None else f"{'>=' if higher else '<='}{target:g}"
        print(f"  {name:<27} {value:>8.4f} {reference:>8.4f} {value / max(reference, 1e-12):>7.3f} {shown:>7}  {met}")
    if args.out:
        args.out.write_text(json.dumps(found, indent=2) + "\n")


if __name__ == "__main__":
    main()
