"""`classifier calibrate --ckpt_path X`: fit a temperature, then a rejection threshold, on the checkpoint's frozen
validation split and write a checkpoint that carries them (the engine: `classifier.evaluation.calibration`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from classifier.evaluation.calibration import calibrate_checkpoint


def boolean(value: str) -> bool:
    """`true` or `false`, as `classifier export` spells them (which imports onnx, an extra this command needs not)."""
    if value.lower() not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"expected true or false, not {value!r}")
    return value.lower() == "true"


def calibrate(argv: list[str]) -> Path:
    """Parse `classifier calibrate`'s options, fit the temperature and threshold, write the checkpoint and report;
    returns it."""
    parser = argparse.ArgumentParser(
        prog="classifier calibrate",
        description="Fit a temperature on a checkpoint's frozen validation split (LBFGS on the NLL of its logits; "
        "multi-label: their binary cross-entropy, with each label's threshold moved so that no decision changes) "
        "and write a checkpoint that carries it, with ECE, NLL and accuracy (multi-label: BCE, per-label ECE and "
        "Brier score) before and after on validation and test. Then the rejection threshold: the score (of the "
        "calibrated logits) that keeps --keep of the validation images; predict, Predictor, OnnxPredictor and serve "
        "mark images below it unknown.",
    )
    parser.add_argument("--ckpt_path", type=Path, required=True, help="the checkpoint to calibrate (from fit)")
    parser.add_argument("--output", type=Path, help="where to write it (default: <stem>-calibrated.ckpt beside it)")
    parser.add_argument("--data.data_dir", dest="data_dir", help="where the images are now, if they moved")
    parser.add_argument("--data.num_workers", dest="num_workers", type=int, help="loader processes (default: cores)")
    parser.add_argument("--device", default="cpu", help="where the logits are computed: cpu, cuda, cuda:1, mps...")
    parser.add_argument("--reject", type=boolean, default=True, help="fit a rejection threshold (default true)")
    parser.add_argument("--keep", type=float, default=0.95, help="the share of validation images it keeps known")
    parser.add_argument(
        "--ood_score", default="energy", help="energy (logsumexp of the logits; the default) or msp (top probability)"
    )
    options = parser.parse_args(argv)
    output = options.output or options.ckpt_path.with_name(f"{options.ckpt_path.stem}-calibrated.ckpt")
    return calibrate_checkpoint(
        options.ckpt_path,
        output,
        options.data_dir,
        options.num_workers,
        options.device,
        options.reject,
        options.keep,
        options.ood_score,
    )
