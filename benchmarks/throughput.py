"""Training throughput in one run: the GPU-bound ceiling, a plain PyTorch loop, and `classifier fit` per data path.

    python benchmarks/throughput.py --out throughput.json          # one GPU: 7,000 JPEGs ~460x375, ResNet-50
    python benchmarks/throughput.py --model resnet18               # the same for ResNet-18
    python benchmarks/throughput.py --device cpu --quick           # ~5 minutes on 2 CPU cores

Every figure is training images per second in steady state: the best epoch after the first (or the best window
of steps after the warm-up), so that a noisy machine's slow spells do not decide a comparison.
- ceiling: the model's training step on random tensors already on the device, so no loader at all;
- plain: torchvision ImageFolder + DataLoader (RandomResizedCrop, flip) + the same model, optimizer and precision;
- classifier: `classifier fit` on the same folder with each data path (`--data.decode cpu|gpu`, `--data.cache ram`),
  read from the run's summary.json, with its best validation macro-F1 to show the paths learn alike.
"""

from __future__ import annotations

import argparse
import colorsys
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

log = logging.getLogger("throughput")

DATA_PATHS = {  # name -> `classifier fit` flags
    "decode=cpu": ["--data.decode", "cpu"],
    "decode=gpu": ["--data.decode", "gpu"],
    "cache=ram": ["--data.cache", "ram"],
}
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def write_image(task: tuple[Path, int, int, int, int, int]) -> None:
    """One synthetic photo: a class hue under smooth random texture and sensor-like noise (~75 KB at 460x375)."""
    path, label, classes, width, height, seed = task
    rng = np.random.default_rng(seed)
    width, height = (int(side * rng.uniform(0.9, 1.1)) for side in (width, height))
    base = np.array(colorsys.hsv_to_rgb(label / classes, 0.6, 0.8)) * 255
    texture = rng.normal(0, 1, (height // 16 + 1, width // 16 + 1, 3))
    smooth = Image.fromarray(np.clip(128 + 40 * texture, 0, 255).astype(np.uint8)).resize(
        (width, height), Image.BICUBIC
    )
    pixels = np.asarray(smooth, dtype=np.float32) * 0.5 + base * 0.5 + rng.normal(0, 14, (height, width, 3))
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)


def make_folder(root: Path, num_images: int, classes: int, width: int, height: int) -> Path:
    """The synthetic JPEG class folders, written once and reused while the parameters stay the same."""
    folder = root / f"jpegs_{num_images}_{classes}_{width}x{height}"
    if (folder / "done").exists():
        return folder
    tasks = []
    for index in range(num_images):
        label = index % classes
        (folder / f"class_{label:02d}").mkdir(parents=True, exist_ok=True)
        tasks.append((folder / f"class_{label:02d}" / f"{index:06d}.jpg", label, classes, width, height, index))
    with ProcessPoolExecutor() as pool:
        list(pool.map(write_image, tasks, chunksize=64))
    (folder / "done").touch()
    sizes = [path.stat().st_size for path, *_ in tasks]
    log.info("Wrote %d JPEGs to %s, mean %.0f KB", num_images, folder, np.mean(sizes) / 1e3)
    return folder


def training_step_fn(args: argparse.Namespace, classes: int):
    """The model, its optimizer and one training step, as the plain loop and the ceiling run them."""
    device = torch.device(args.device)
    model = timm.create_model(args.model, num_classes=classes).to(device)
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    model = model.to(memory_format=memory_format).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(STD, device=device).view(1, 3, 1, 1) * 255
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()

    def step(images: torch.Tensor, targets: torch.Tensor) -> None:
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        images = ((images.float() - mean) / std).contiguous(memory_format=memory_format)
        with autocast:
            loss = torch.nn.functional.cross_entropy(model(images), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def ceiling(args: argparse.Namespace, classes: int) -> float:
    """img/s of the training step alone, on uint8 batches already on the device."""
    step = training_step_fn(args, classes)
    images = torch.randint(0, 256, (args.batch_size, 3, args.image_size, args.image_size), dtype=torch.uint8)
    images, targets = images.to(args.device), torch.randint(0, classes, (args.batch_size,), device=args.device)
    for _ in range(args.warmup_steps):
        step(images, targets)
    speeds = []
    for _ in range(3):
        synchronize(args.device)
        started = time.perf_counter()
        for _ in range(args.steps):
            step(images, targets)
        synchronize(args.device)
        speeds.append(args.steps * args.batch_size / (time.perf_counter() - started))
    return max(speeds)


def plain_loop(args: argparse.Namespace, folder: Path, classes: int) -> float:
    """img/s of a textbook PyTorch loop over the folder."""
    step = training_step_fn(args, classes)
    transform = transforms.Compose(
        [transforms.RandomResizedCrop(args.image_size), transforms.RandomHorizontalFlip(), transforms.PILToTensor()]
    )
    loader = DataLoader(
        datasets.ImageFolder(str(folder), transform),
        batch_size=args.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=args.workers,
        pin_memory=args.device == "cuda",
        persistent_workers=args.workers > 0,
    )
    speeds = []
    for _ in range(args.epochs):
        started = time.perf_counter()
        for batch, targets in loader:
            step(batch, targets)
        synchronize(args.device)
        speeds.append(len(loader) * args.batch_size / (time.perf_counter() - started))
    return max(speeds[1:])  # the first epoch also starts the workers


def classifier_fit(args: argparse.Namespace, folder: Path, flags: list[str], logs: Path) -> tuple[float, float]:
    """(steady img/s, best val macro-F1) of `classifier fit` on the folder with the given data-path flags."""
    name = f"run_{len(list(logs.glob('run_*')))}"
    command = [
        *[sys.executable, "-m", "classifier", "fit"],
        *["--data.data_dir", str(folder), "--data.val_fraction", "0.1", "--data.test_fraction", "0"],
        *["--data.image_size", str(args.image_size), "--data.batch_size", str(args.batch_size)],
        *["--data.num_workers", str(args.workers), "--data.color_jitter", "null", "--data.crop_pct", "0.875"],
        *["--model.backbone", args.model, "--trainer.max_epochs", str(args.epochs)],
        *["--trainer.accelerator", args.device, "--trainer.devices", "1", "--trainer.precision", args.precision],
        *["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"],
        *["--trainer.logger", "lightning.pytorch.loggers.TensorBoardLogger"],
        *["--trainer.logger.save_dir", str(logs), "--trainer.logger.name", name],
        *flags,
    ]
    subprocess.run(command, check=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    summary = json.loads(next((logs / name).glob("version_*/summary.json")).read_text())
    return max(summary["epoch_train_images_per_s"][1:]), summary["best_value"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="CPU-sized run: 1,000 160x120 images, 64 px, resnet18")
    parser.add_argument("--data-root", type=Path, default=Path(tempfile.gettempdir()) / "classifier-throughput")
    parser.add_argument("--num-images", type=int, default=7000)
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--size", default="460x375", help="mean WIDTHxHEIGHT of the JPEGs (each varies by 10%%)")
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=max(1, len(os.sched_getaffinity(0)) - 1))
    parser.add_argument("--epochs", type=int, default=4, help="the first is warm-up; the others are timed")
    parser.add_argument("--steps", type=int, default=30, help="steps in each of the ceiling's three timed windows")
    parser.add_argument("--warmup-steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=1, help="rounds of every measurement; each keeps its best")
    parser.add_argument("--paths", default=None, help="comma-separated data paths; default: all this device runs")
    parser.add_argument("--out", type=Path, help="write the figures as JSON")
    args = parser.parse_args(argv)
    paths = (
        args.paths.split(",") if args.paths else [p for p in DATA_PATHS if args.device == "cuda" or p != "decode=gpu"]
    )
    if unknown := set(paths) - set(DATA_PATHS):  # before any work or global state, so a caller can test it alone
        parser.error(f"--paths: unknown {', '.join(sorted(unknown))}; choose from {', '.join(DATA_PATHS)}")
    if args.quick:
        args.num_images, args.size, args.image_size, args.batch_size = 1000, "160x120", 64, 64
        args.model, args.steps, args.warmup_steps = "resnet18", 10, 2
    args.precision = "bf16-mixed" if args.device == "cuda" else "32-true"
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(0)
    width, height = (int(side) for side in args.size.split("x"))
    folder = make_folder(args.data_root, args.num_images, args.classes, width, height)

    results = {"ceiling_img_s": 0.0, "plain_img_s": 0.0, "classifier_img_s": {}, "classifier_val_f1_macro": {}}
    with tempfile.TemporaryDirectory() as logs:
        for _ in range(args.repeats):  # interleaved, so a slow spell of the machine hits every measurement alike
            results["ceiling_img_s"] = max(results["ceiling_img_s"], ceiling(args, args.classes))
            log.info("ceiling: %.0f img/s", results["ceiling_img_s"])
            results["plain_img_s"] = max(results["plain_img_s"], plain_loop(args, folder, args.classes))
            log.info("plain loop: %.0f img/s", results["plain_img_s"])
            for path in paths:
                speed, f1 = classifier_fit(args, folder, DATA_PATHS[path], Path(logs))
                results["classifier_img_s"][path] = max(results["classifier_img_s"].get(path, 0.0), speed)
                results["classifier_val_f1_macro"][path] = f1
                log.info("classifier %s: %.0f img/s, val macro-F1 %.3f", path, speed, f1)
    results["settings"] = {key: str(value) for key, value in vars(args).items() if key not in ("out", "data_root")}
    results["device_name"] = torch.cuda.get_device_name() if args.device == "cuda" else f"{os.cpu_count()} CPU cores"

    rows = [("ceiling", results["ceiling_img_s"]), ("plain PyTorch loop", results["plain_img_s"])]
    rows += [(f"classifier fit, {path}", speed) for path, speed in results["classifier_img_s"].items()]
    print(f"\n{args.model}, {args.image_size} px, batch {args.batch_size}, {args.precision}, {results['device_name']}")
    print(f"{'':32} {'img/s':>8} {'/ceiling':>9} {'/plain':>7}")
    for name, speed in rows:
        print(f"{name:32} {speed:8.0f} {speed / results['ceiling_img_s']:9.2f} {speed / results['plain_img_s']:7.2f}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
