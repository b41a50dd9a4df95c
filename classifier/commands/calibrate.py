"""`classifier calibrate --ckpt_path X`: fit a temperature on the checkpoint's frozen validation split and write a
checkpoint that carries it (the engine: `classifier.evaluation.calibration`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from classifier.evaluation.calibration import calibrate_checkpoint


def calibrate(argv: list[str]) -> Path:
    """Parse `classifier calibrate`'s options, fit the temperature, write the checkpoint and report; returns it."""
    parser = argparse.ArgumentParser(
        prog="classifier calibrate",
        description="Fit a temperature on a checkpoint's frozen validation split (LBFGS on the NLL of its logits; "
        "multi-label: their binary cross-entropy, with each label's threshold moved so that no decision changes) "
        "and write a checkpoint that carries it, with ECE, NLL and accuracy (multi-label: BCE, per-label ECE and "
        "Brier score) before and after on validation and test.",
    )
    parser.add_argument("--ckpt_path", type=Path, required=True, help="the checkpoint to calibrate (from fit)")
    parser.add_argument("--output", type=Path, help="where to write it (default: <stem>-calibrated.ckpt beside it)")
    parser.add_argument("--data.data_dir", dest="data_dir", help="where the images are now, if they moved")
    parser.add_argument("--data.num_workers", dest="num_workers", type=int, help="loader processes (default: cores)")
    parser.add_argument("--device", default="cpu", help="where the logits are computed: cpu, cuda, cuda:1, mps...")
    options = parser.parse_args(argv)
    output = options.output or options.ckpt_path.with_name(f"{options.ckpt_path.stem}-calibrated.ckpt")
    return calibrate_checkpoint(options.ckpt_path, output, options.data_dir, options.num_workers, options.device)
