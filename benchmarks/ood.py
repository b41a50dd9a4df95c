"""How well a digits model says "unknown": the bundled digits fitted, calibrated with a rejection threshold, then
tested with photo-like images of shapes (discs, squares, stripes) as the unknowns, as a user runs each command.

One fit per seed of `make train`'s config, `configs/resnet18.yaml`, with RECIPE's two changes: no label smoothing
(which caps how far a known digit's logits can rise above an unknown image's) and random erasing (patches of noise
in training, so that clutter adds little to any class); `--as-shipped` fits the config as it is, for comparison.
Then for each score, energy (the default) and msp (the maximum softmax probability, the reference),
`classifier calibrate --ood_score S` (the threshold that keeps 95% of the validation digits) and `classifier test
--data.ood_dir SHAPES` with the 240 images of `classifier demo-data photos`. It prints, per score and as the
energy/msp ratio: OOD AUROC (target 0.95), FPR at 95% TPR, the share of the shapes marked unknown (target: most,
over half) and of the 270 held-out test digits (target: few, at most 10%); over several seeds, each figure's range
and on how many seeds each score meets its target.

    python -m benchmarks.ood                             # one fit (seed 0): about 2 minutes on a 2-core CPU
    python -m benchmarks.ood --seeds 0 1 2 3 4 42 --out ood.json     # docs/evaluation.md's table: about 11 minutes
    python -m benchmarks.ood --as-shipped                # configs/resnet18.yaml unchanged
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
RECIPE = ("--model.label_smoothing", "0.0", "--data.random_erasing", "0.5")
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
    """The digits fitted with CONFIG and `flags` under `seed`: (best.ckpt, seconds)."""
    started = time.perf_counter()
    logs = ("--trainer.logger.init_args.save_dir", str(root / f"seed_{seed}"))
    classifier("fit", "--config", CONFIG, *flags, *logs, "--seed_everything", str(seed))
    fit_s = time.perf_counter() - started
    (best,) = (root / f"seed_{seed}").glob("*/version_*/checkpoints/best.ckpt")
    return best, fit_s


def unknowns(best: Path, shapes: Path, score: str) -> dict[str, float]:
    """`calibrate --ood_score score`, then `test --data.ood_dir shapes` of the calibrated checkpoint: its
    metrics.json."""
    calibrated = best.with_name(f"best-{score}.ckpt")
    classifier("calibrate", "--ckpt_path", str(best), "--ood_score", score, "--output", str(calibrated))
    classifier("test", "--ckpt_path", str(calibrated), "--data.ood_dir", str(shapes))
    return json.loads((best.parents[1] / "test" / "metrics.json").read_text())


def run(root: Path, shapes: Path, seed: int, flags: tuple[str, ...]) -> dict:
    """One fit and each score's figures."""
    best, fit_s = fit(root, seed, flags)
    figures = {score: unknowns(best, shapes, score) for score in SCORES}
    return {"seed": seed, "fit_s": fit_s, "test_acc": figures["energy"]["test/acc"], "scores": figures}


ROWS = (  # (what is printed, metrics.json key, target, whether higher is better)
    ("OOD AUROC", "ood/auroc", TARGET_AUROC, True),
    ("FPR at 95% TPR", "ood/fpr_at_95_tpr", None, False),
    ("shapes marked unknown", "ood/unknown_share_ood", MOST, True),
    ("test digits marked unknown", "ood/unknown_share_test", FEW, False),
)


def met(value: float, target: float | None, higher: bool) -> str:
    return "" if target is None else "yes" if (value >= target if higher else value <= target) else "NO"


def show(found: dict) -> None:
    """One seed's figures, energy beside msp."""
    energy, msp = (found["scores"][score] for score in SCORES)
    print(f"seed {found['seed']}: fit {found['fit_s']:.0f} s, test acc {found['test_acc']:.4f}")
    print(f"  {'figure':<27} {'energy':>8} {'msp':>8} {'ratio':>7} {'target':>7}  met (energy)")
    for name, key, target, higher in ROWS:
        value, reference = energy[key], msp[key]
        shown = "" if target is None else f"{'>=' if higher else '<='}{target:g}"
        ratio = f"{value / reference:.3f}" if reference else "-"
        print(f"  {name:<27} {value:>8.4f} {reference:>8.4f} {ratio:>7} {shown:>7}  {met(value, target, higher)}")


def show_range(runs: list[dict]) -> None:
    """Each figure's range over the seeds, and on how many seeds each score meets its target."""
    print(f"over {len(runs)} seeds: {'energy':>15} {'msp':>15}  target met (energy, msp)")
    for name, key, target, higher in ROWS:
        cells, counts = [], []
        for score in SCORES:
            values = [found["scores"][score][key] for found in runs]
            cells.append(f"{min(values):.4f}-{max(values):.4f}")
            counts.append(str(sum(met(value, target, higher) == "yes" for value in values)))
        print(f"  {name:<27} {cells[0]:>15} {cells[1]:>15}  {'' if target is None else ', '.join(counts)}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds, one fit each (default 0)")
    parser.add_argument("--photo-seed", type=int, default=0, help="the shape generator's seed (default 0)")
    parser.add_argument("--as-shipped", action="store_true", help=f"fit {CONFIG} without RECIPE's changes")
    parser.add_argument("--out", type=Path, help="also write the figures here, as JSON")
    args = parser.parse_args(argv)
    flags = () if args.as_shipped else RECIPE
    print(f"classifier fit --config {CONFIG} {' '.join(flags)}".rstrip())
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        shapes = Path(tmp) / "shapes"
        classifier(
            "demo-data", "photos", str(shapes), "--seed", str(args.photo_seed), "--per_class", str(PHOTOS_PER_CLASS)
        )
        for seed in args.seeds:
            runs.append(run(Path(tmp), shapes, seed, flags))
            show(runs[-1])
            sys.stdout.flush()  # each seed as it ends, into a log too
    energy = runs[0]["scores"]["energy"]
    print(f"{energy['ood/images_test']} test digits; {energy['ood/images_ood']} shapes from `demo-data photos`")
    if len(runs) > 1:
        show_range(runs)
    if args.out:
        args.out.write_text(json.dumps({"flags": list(flags), "runs": runs}, indent=2) + "\n")


if __name__ == "__main__":
    main()
