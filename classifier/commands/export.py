"""`classifier export --ckpt_path X`: a checkpoint to ONNX, torch.export or TorchScript with its preprocessing, and
the parity check against PyTorch (the engine: `classifier.deploy.export`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from classifier.deploy.export import FILES, export_checkpoint
from classifier.deploy.parity import CHECK_IMAGES


def boolean(value: str) -> bool:
    """`true` or `false`, as the other `classifier` commands spell them."""
    if value.lower() not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"expected true or false, not {value!r}")
    return value.lower() == "true"


def export(argv: list[str]) -> Path:
    """Parse `classifier export`'s options and export; returns the folder written."""
    parser = argparse.ArgumentParser(
        prog="classifier export",
        description="Export a checkpoint with its preprocessing, and check that the export agrees with PyTorch.",
    )
    parser.add_argument("--ckpt_path", required=True, help="the checkpoint to export")
    parser.add_argument("--format", default="onnx", choices=list(FILES))
    parser.add_argument("--output", help="the folder to write to (default: export/ beside the checkpoint)")
    parser.add_argument("--dynamic_batch", type=boolean, default=True, help="any batch size (default true)")
    parser.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    parser.add_argument("--quantize", default="none", choices=["none", "int8"], help="int8: also model.int8.onnx")
    parser.add_argument(
        "--check",
        default="auto",
        help="auto: the checkpoint's frozen test split; DIR: the images in a folder (class subfolders give labels); "
        "random: random pixels; none: no parity check",
    )
    parser.add_argument(
        "--check_images",
        dest="check_images_max",
        type=int,
        default=CHECK_IMAGES,
        help=f"check parity on at most this many images, a stratified sample (default {CHECK_IMAGES})",
    )
    parser.add_argument(
        "--softmax",
        type=boolean,
        default=True,
        help="output probabilities (true: a softmax, or a multi-label model's sigmoid per label) or logits",
    )
    parser.add_argument("--max_accuracy_drop", type=float, default=1.0, help="int8's tolerance, in points")
    parser.add_argument("--data_dir", help="where the checkpoint's images are now, if they moved")
    return export_checkpoint(**vars(parser.parse_args(argv)))
