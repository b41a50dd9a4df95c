"""The one description of a model's eval preprocessing (`preprocess.json`), and its PIL + numpy implementation.

`classifier export` writes it beside the model and into the ONNX metadata; the torch-free
`classifier.deploy.onnx_predictor` and serving read it back. `resize_and_crop` renders the same pixels as
`classifier.model.net.eval_transform` (timm's eval transform through torchvision), with Pillow alone.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from classifier.core.atomic import write_text

PREPROCESS_FILE = "preprocess.json"
PARITY_FILE = "parity.json"  # beside an export: how it compared with its checkpoint
METADATA_KEY = "classifier.deploy.preprocess"  # the ONNX metadata_props key holding the same JSON
CHANNEL_ORDER = "RGB"
TASKS = ("multiclass", "multilabel")  # classifier.model.net's, which this torch-free module cannot import
CROP_MODES = ("center", "squash")  # the eval crops `resize_and_crop` renders; timm's "border" pads, and is refused
HASH_CHUNK = 1 << 20
PIL_INTERPOLATION = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
    "lanczos": Image.Resampling.LANCZOS,
}


def resize_size(preprocessing: dict) -> list[int]:
    """(height, width) that eval resizes to before its crop: timm's `floor(input size / crop_pct)`."""
    _, height, width = preprocessing["input_size"]
    crop_pct = preprocessing.get("crop_pct") or 0.875
    return [math.floor(height / crop_pct), math.floor(width / crop_pct)]


def file_sha256(path: Path) -> str:
    """A model or checkpoint file's SHA-256, so that an export or a server names exactly the weights it holds."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def describe(
    net_config: dict,
    checkpoint_sha256: str,
    test_metrics: dict | None,
    thresholds: list[float] | None = None,
    **export: Any,
) -> dict[str, Any]:
    """preprocess.json: how to feed the model (from a checkpoint's `net` description), how to read its outputs (the
    task, and a multi-label model's `thresholds`), where it came from, how it was exported (`export`: format,
    exporter, opset, output...)."""
    preprocessing = net_config["preprocessing"]
    return {
        "input_size": list(preprocessing["input_size"]),
        "resize_size": resize_size(preprocessing),
        "interpolation": preprocessing["interpolation"],
        "crop_pct": preprocessing["crop_pct"],
        "crop_mode": preprocessing.get("crop_mode", "center"),
        "mean": list(preprocessing["mean"]),
        "std": list(preprocessing["std"]),
        "channel_order": CHANNEL_ORDER,
        "layout": "NCHW",
        "dtype": "uint8",
        "class_names": list(net_config["class_names"]),
        "task": net_config.get("task", "multiclass"),
        "thresholds": thresholds,
        "temperature": net_config.get("temperature", 1.0),
        "checkpoint_sha256": checkpoint_sha256,
        "test_metrics": test_metrics,
        **export,
    }


def write_preprocess(folder: Path, description: dict) -> Path:
    """`folder/preprocess.json`."""
    path = folder / PREPROCESS_FILE
    write_text(path, json.dumps(description, indent=2) + "\n")
    return path


def read_preprocess(path: Path) -> dict:
    """A preprocess.json, checked for the keys that resizing, cropping and naming classes need."""
    try:
        description = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not a readable {PREPROCESS_FILE}: {error}") from error
    return checked(description, str(path))


def checked(description: dict, source: str) -> dict:
    """`description` if it holds every key of the preprocessing; a ValueError naming `source` otherwise."""
    needed = ("input_size", "interpolation", "crop_pct", "mean", "std", "class_names")
    missing = [key for key in needed if key not in description]
    if missing:
        raise ValueError(f"{source} lacks the preprocessing keys {', '.join(missing)}: was it written by classifier?")
    mode = description.get("crop_mode") or "center"
    if mode not in CROP_MODES:
        raise ValueError(
            f"{source}: crop_mode {mode!r} has no torch-free implementation ({' and '.join(CROP_MODES)} do); "
            "serve the checkpoint itself, through PyTorch"
        )
    task, thresholds = description.get("task") or "multiclass", description.get("thresholds")
    if task not in TASKS:
        raise ValueError(f"{source}: task {task!r} is none of {', '.join(TASKS)}")
    if task == TASKS[1] and (not isinstance(thresholds, list) or len(thresholds) != len(description["class_names"])):
        raise ValueError(f"{source}: a multi-label model needs one threshold per class; re-export it")
    return description


def resize_and_crop(image: Image.Image, preprocessing: dict) -> Image.Image:
    """The eval resize and crop of `classifier.model.net.eval_transform`, pixel for pixel, on an RGB PIL image."""
    _, height, width = preprocessing["input_size"]
    scale = resize_size(preprocessing)
    mode = preprocessing.get("crop_mode") or "center"
    if mode == "squash":
        size = scale
    elif mode == "center" and scale[0] == scale[1]:
        size = _shorter_side(image.height, image.width, scale[0])
    elif mode == "center":
        ratio = min(image.height / scale[0], image.width / scale[1])  # timm's ResizeKeepRatio
        size = [round(image.height / ratio), round(image.width / ratio)]
    else:
        raise ValueError(f"crop_mode {mode!r} has no torch-free implementation ({' and '.join(CROP_MODES)} do)")
    if size != [image.height, image.width]:  # torchvision leaves an image of the right size alone
        image = image.resize((size[1], size[0]), PIL_INTERPOLATION[preprocessing["interpolation"]])
    return _center_crop(image, height, width)


def _shorter_side(height: int, width: int, size: int) -> list[int]:
    """torchvision's `Resize(size)` output (height, width): the shorter side to `size`, the longer truncated."""
    short, long = (width, height) if width <= height else (height, width)
    longer = int(size * long / short)
    return [longer, size] if width <= height else [size, longer]


def _center_crop(image: Image.Image, height: int, width: int) -> Image.Image:
    """torchvision's `center_crop`: zero padding where the image is smaller, then the rounded centre window."""
    if height > image.height or width > image.width:
        left = (width - image.width) // 2 if width > image.width else 0
        top = (height - image.height) // 2 if height > image.height else 0
        right = (width - image.width + 1) // 2 if width > image.width else 0
        bottom = (height - image.height + 1) // 2 if height > image.height else 0
        padded = Image.new(image.mode, (image.width + left + right, image.height + top + bottom))
        padded.paste(image, (left, top))
        image = padded
    top = int(round((image.height - height) / 2.0))
    left = int(round((image.width - width) / 2.0))
    return image.crop((left, top, left + width, top + height))


def to_chw_uint8(image: Image.Image) -> np.ndarray:
    """An RGB PIL image as the uint8 CHW array the exported model takes."""
    return np.ascontiguousarray(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1))
