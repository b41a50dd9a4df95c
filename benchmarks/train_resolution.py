"""Training crops from JPEG drafts against the full-resolution decode: fidelity and img/s, side by side.

    python benchmarks/train_resolution.py                   # 48 JPEGs of 4000x3000, a 224-px model
    python benchmarks/train_resolution.py --quick           # ~1 minute on 2 CPU cores

The CPU path decodes training JPEGs at a reduced DCT scale (a draft). Each random-resized crop is then rendered
from the draft, so a draft that is too small upsamples small crops: at crop_scale 0.08 and a draft of eval's
256 px, a 224-px crop comes from about 63 px. Every crop is rendered three ways, from the same relative box:
- full: the full decode, the reference;
- draft=scale_size: the draft the CPU path kept before (eval's resize, image_size / crop_pct);
- draft=train: the draft it keeps now (enough pixels for the smallest crop the settings allow).
Fidelity is the PSNR of each crop against the full decode's (dB, higher is closer; inf where identical): the mean
over all crops and over the small ones (at most a quarter of the image), and the share of crops that had to be
upsampled. Speed is decode plus crop per image, in one process.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from timm.data.transforms import RandomResizedCropAndInterpolation, str_to_interp_mode
from torchvision.transforms import functional as F

from classifier import ImageFolderDataModule
from classifier.data.images import load_rgb

log = logging.getLogger("train_resolution")


def write_photo(path: Path, width: int, height: int, seed: int) -> None:
    """A photo-like JPEG: texture at every scale from the whole frame down to single pixels."""
    rng = np.random.default_rng(seed)
    pixels = np.zeros((height, width, 3), np.float32)
    for cell in (512, 128, 32, 8, 2):  # octaves of smoothly upsampled noise, finer ones weaker
        noise = rng.normal(0, 1, (height // cell + 1, width // cell + 1, 3))
        layer = Image.fromarray(np.clip(128 + 60 * noise, 0, 255).astype(np.uint8)).resize((width, height))
        pixels += (np.asarray(layer, np.float32) - 128) * (0.5 + cell / 1024)
    Image.fromarray(np.clip(128 + pixels, 0, 255).astype(np.uint8)).save(path, quality=90)


def crop_boxes(count: int, scale: tuple[float, float], ratio: tuple[float, float], seed: int) -> list[tuple]:
    """Random-resized-crop boxes as fractions (top, left, height, width) of the image, drawn with timm's sampler."""
    torch.manual_seed(seed)
    random.seed(seed)  # timm draws the boxes with Python's random
    side = 10_000  # a square canvas fine enough that the fractions carry timm's distribution
    boxes = []
    for _ in range(count):
        top, left, height, width = RandomResizedCropAndInterpolation.get_params(
            torch.empty(0, side, side), scale, ratio
        )
        boxes.append((top / side, left / side, height / side, width / side))
    return boxes


def render(image: Image.Image, boxes: list[tuple], size: int, interpolation: str) -> list[np.ndarray]:
    """Each box of `image` resized to size x size, as the training transform renders a crop."""
    width, height = image.size
    mode = str_to_interp_mode(interpolation)
    crops = []
    for top, left, h, w in boxes:
        box = round(top * height), round(left * width), round(h * height), round(w * width)
        crops.append(np.asarray(F.resized_crop(image, *box, [size, size], mode), np.float32))
    return crops


def psnr(crop: np.ndarray, reference: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB; inf for identical crops."""
    mse = float(np.mean((crop - reference) ** 2))
    return 10 * np.log10(255**2 / mse) if mse else float("inf")


def measure(paths: list[Path], boxes: list[tuple], min_size: int | None, args: argparse.Namespace) -> tuple:
    """(img/s of decode + crops, the crops, the share of crops whose source region is narrower than the output)."""
    started = time.perf_counter()
    crops, upsampled = [], []
    for path in paths:
        image = load_rgb(path, min_size)
        crops.append(render(image, boxes, args.image_size, args.interpolation))
        upsampled += [min(h * image.height, w * image.width) < args.image_size for _, _, h, w in boxes]
    seconds = time.perf_counter() - started
    return len(paths) / seconds, crops, float(np.mean(upsampled))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="12 JPEGs of 3200x2400")
    parser.add_argument("--num-images", type=int, default=48)
    parser.add_argument("--size", default="4000x3000", help="WIDTHxHEIGHT of the JPEGs")
    parser.add_argument("--model", default="resnet50", help="the timm model whose data config applies")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--crop-scale", type=float, nargs=2, default=(0.08, 1.0))
    parser.add_argument("--crop-ratio", type=float, nargs=2, default=(3 / 4, 4 / 3))
    parser.add_argument("--crops", type=int, default=16, help="random-resized crops per image")
    parser.add_argument("--repeats", type=int, default=2, help="timed passes per decode; each keeps its best")
    parser.add_argument("--data-root", type=Path, default=Path(tempfile.gettempdir()) / "classifier-resolution")
    parser.add_argument("--out", type=Path, help="write the figures as JSON")
    args = parser.parse_args(argv)
    if args.quick:
        args.num_images, args.size = 12, "3200x2400"
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    width, height = (int(side) for side in args.size.split("x"))

    folder = args.data_root / f"photos_{args.num_images}_{width}x{height}"
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{index:04d}.jpg" for index in range(args.num_images)]
    for index, path in enumerate(paths):
        if not path.exists():
            write_photo(path, width, height, seed=index)
    data = ImageFolderDataModule(
        str(folder), backbone=args.model, image_size=args.image_size,
        crop_scale=tuple(args.crop_scale), crop_ratio=tuple(args.crop_ratio),
    )  # fmt: skip
    args.interpolation = data.data_config["interpolation"]
    boxes = crop_boxes(args.crops, tuple(args.crop_scale), tuple(args.crop_ratio), seed=0)
    decodes = {"full": None, "draft=scale_size": min(data.scale_size), "draft=train": data.train_decode_size}

    results = {}
    for name, min_size in decodes.items():
        speed = 0.0
        for _ in range(args.repeats):
            run_speed, crops, upsampled = measure(paths, boxes, min_size, args)
            speed = max(speed, run_speed)
        results[name] = {"min_size": min_size, "img_s": speed, "crops": crops, "upsampled": upsampled}
        log.info("%s (shorter side >= %s): %.1f img/s", name, min_size or "all", speed)
    reference = results["full"]["crops"]
    small = [h * w <= 0.25 for _, _, h, w in boxes]  # crops of at most a quarter of the image
    for figures in results.values():
        per_image = zip(figures.pop("crops"), reference, strict=True)
        scores = np.array([[psnr(c, r) for c, r in zip(crops, refs, strict=True)] for crops, refs in per_image])
        figures["psnr_db"], figures["psnr_small_db"] = float(scores.mean()), float(scores[:, small].mean())

    print(f"\n{args.model}, {args.image_size} px, crop_scale {args.crop_scale}, {args.num_images} JPEGs of {args.size}")
    print(f"{'decode':18} {'shorter side':>12} {'img/s':>7} {'/full':>6} {'PSNR dB':>8} {'small':>6} {'upsampled':>9}")
    full_speed = results["full"]["img_s"]
    for name, figures in results.items():
        speed, side = figures["img_s"], str(figures["min_size"] or "all")
        scores = f"{figures['psnr_db']:8.1f} {figures['psnr_small_db']:6.1f} {figures['upsampled']:9.0%}"
        print(f"{name:18} {side:>12} {speed:7.1f} {speed / full_speed:6.2f} {scores}")
    if args.out:
        args.out.write_text(json.dumps({"settings": {k: str(v) for k, v in vars(args).items()}, **results}, indent=2))


if __name__ == "__main__":
    main()
