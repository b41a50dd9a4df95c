"""The one description of a model's eval preprocessing (`preprocess.json`), and its PIL + numpy implementation.

`classifier export` writes it beside the model and into the ONNX metadata; the torch-free
`classifier.deploy.onnx_predictor` and serving read it back. `resize_and_crop` renders the same pixels as
`classifier.model.net.eval_transform` (timm's eval transform through torchvision), with Pillow alone.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from classifier.core.atomic import write_text
from classifier.core.geometry import RESIZE_MODES, centre_offsets, pad_fill, resize_mode, resized_size, scale_size

PREPROCESS_FILE = "preprocess.json"
PARITY_FILE = "parity.json"  # beside an export: how it compared with its checkpoint
METADATA_KEY = "classifier.deploy.preprocess"  # the ONNX metadata_props key holding the same JSON
CHANNEL_ORDER = "RGB"
TASKS = ("multiclass", "multilabel")  # classifier.model.net's, which this torch-free module cannot import
OOD_SCORES = ("energy", "msp")  # classifier.model.ood's, likewise
HASH_CHUNK = 1 << 20
PIL_INTERPOLATION = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
    "lanczos": Image.Resampling.LANCZOS,
}


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
    task, a multi-label model's `thresholds`, the `rejection` that marks images unknown by the `ood_score` output),
    where it came from, how it was exported (`export`: format, exporter, opset, output...)."""
    preprocessing = net_config["preprocessing"]
    return {
        "input_size": list(preprocessing["input_size"]),
        "resize_size": list(scale_size(preprocessing)),
        "interpolation": preprocessing["interpolation"],
        "crop_pct": preprocessing["crop_pct"],
        "crop_mode": preprocessing.get("crop_mode", "center"),
        "resize_mode": resize_mode(preprocessing.get("crop_mode")),
        "mean": list(preprocessing["mean"]),
        "std": list(preprocessing["std"]),
        "channel_order": CHANNEL_ORDER,
        "layout": "NCHW",
        "dtype": "uint8",
        "class_names": list(net_config["class_names"]),
        "task": net_config.get("task", "multiclass"),
        "thresholds": thresholds,
        "temperature": net_config.get("temperature", 1.0),
        "rejection": net_config.get("rejection"),
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
    if mode not in RESIZE_MODES.values():
        raise ValueError(f"{source}: crop_mode {mode!r} is none of timm's {', '.join(RESIZE_MODES.values())}")
    task, thresholds = description.get("task") or "multiclass", description.get("thresholds")
    if task not in TASKS:
        raise ValueError(f"{source}: task {task!r} is none of {', '.join(TASKS)}")
    if task == TASKS[1] and (not isinstance(thresholds, list) or len(thresholds) != len(description["class_names"])):
        raise ValueError(f"{source}: a multi-label model needs one threshold per class; re-export it")
    rejection = description.get("rejection")
    if rejection is not None and (
        not isinstance(rejection, dict)
        or rejection.get("score") not in OOD_SCORES
        or not isinstance(rejection.get("threshold"), (int, float))
    ):
        raise ValueError(f"{source}: rejection {rejection!r} needs a score ({' or '.join(OOD_SCORES)}) and a threshold")
    return description


def resize_and_crop(image: Image.Image, preprocessing: dict) -> Image.Image:
    """The eval resize and crop (or pad) of `classifier.model.net.eval_transform`, pixel for pixel, on an RGB PIL
    image, in each resize mode (`classifier.core.geometry`)."""
    _, height, width = preprocessing["input_size"]
    size = resized_size(image.height, image.width, preprocessing)
    if size != (image.height, image.width):  # torchvision leaves an image of the right size alone
        image = image.resize((size[1], size[0]), PIL_INTERPOLATION[preprocessing["interpolation"]])
    letterbox = (preprocessing.get("crop_mode") or "center") == "border"
    return _center_crop(image, height, width, pad_fill(preprocessing) if letterbox else (0, 0, 0))


def _center_crop(image: Image.Image, height: int, width: int, fill: tuple[int, int, int]) -> Image.Image:
    """torchvision's `center_crop` (timm's `center_crop_or_pad`): padding with `fill` where the image is smaller,
    then the rounded centre window."""
    pad_left, pad_top, left, top = centre_offsets(image.height, image.width, height, width)
    if height > image.height or width > image.width:
        padded = Image.new(image.mode, (max(width, image.width), max(height, image.height)), fill)
        padded.paste(image, (pad_left, pad_top))
        image = padded
    return image.crop((left, top, left + width, top + height))


def to_chw_uint8(image: Image.Image) -> np.ndarray:
    """An RGB PIL image as the uint8 CHW array the exported model takes."""
    return np.ascontiguousarray(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1))
