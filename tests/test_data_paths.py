"""The data paths of `--data.decode` and `--data.cache`: same samples, same augmentation statistics, same accuracy."""

from __future__ import annotations

import json
import logging
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from classifier import ImageFolderDataModule, cli_main
from classifier.core.imageio import list_images, load_rgb
from classifier.data.datasets import DeviceCropDataset, ImageDataset
from classifier.data.device_augment import CropBatch, collate_crops
from classifier.data.workers import default_num_workers
from tests.helpers import run_dir, save_image, tiny_config

SIZE = 32


def gradient(width: int, height: int, blue: int = 0) -> Image.Image:
    """Red encodes x and green encodes y, so a crop's position can be read back from its pixels."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[..., 0] = np.round(np.linspace(0, 255, width))[None]
    pixels[..., 1] = np.round(np.linspace(0, 255, height))[:, None]
    pixels[..., 2] = blue
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def gradients(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two classes of landscape and portrait gradient photos of odd sizes, as JPEG and PNG."""
    root = tmp_path_factory.mktemp("gradients")
    sizes = [(200, 150), (151, 203), (240, 97), (120, 121)]
    for label, blue in (("a", 0), ("b", 255)):
        for i, (width, height) in enumerate(sizes * 3):
            ext = "png" if i % 3 == 0 else "jpg"
            save_image(root / label / f"{i:02d}.{ext}", gradient(width, height, blue), quality=95)
    return root


def gpu_decode_batch(folder: Path) -> tuple[ImageFolderDataModule, CropBatch, list[Path]]:
    """One batch of `folder`'s images as the GPU-decode loader collates it, with centre-crop plans."""
    module = ImageFolderDataModule(image_size=SIZE, decode="gpu")
    paths = list_images(folder)
    planner, interpolation = module.planner(training=False), module.data_config["interpolation"]
    dataset = DeviceCropDataset(paths, [0] * len(paths), planner, interpolation, module.scale_size, gpu_decode=True)
    return module, collate_crops([dataset[i] for i in range(len(dataset))]), paths


def datamodule(data_dir: Path, **settings) -> ImageFolderDataModule:
    """A set-up datamodule, outside any trainer, as a notebook would use it."""
    settings = {"image_size": SIZE, "batch_size": 8, "num_workers": 0, "val_fraction": 0.25, "test_fraction": 0.0,
                "color_jitter": None, **settings}  # fmt: skip
    module = ImageFolderDataModule(str(data_dir), **settings)
    module.setup("fit")
    return module


def batches(module: ImageFolderDataModule, split: str) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(images on the 0-255 scale, targets, rows) of one pass, through the same hooks a trainer calls."""
    loader = {"train": module.train_dataloader, "val": module.val_dataloader}[split]()
    out = []
    for batch in loader:
        batch = module.transfer_batch_to_device(batch, torch.device("cpu"), 0)
        if isinstance(batch, CropBatch):
            out.append((batch.render(module.input_hw, jitter=False), batch.targets, batch.rows))
        else:
            out.append((batch[0].float(), batch[1], batch[2]))
    return out


def crop_statistics(images: torch.Tensor) -> dict[str, np.ndarray]:
    """Per image: the area share and aspect ratio of the region it shows, and whether it is mirrored.

    Read from the gradients: red across the left and right columns gives x, green down the top and bottom rows y.
    """
    red, green = images[:, 0].numpy() / 255, images[:, 1].numpy() / 255
    left, right = red[:, :, 0].mean(1), red[:, :, -1].mean(1)
    top, bottom = green[:, 0, :].mean(1), green[:, -1, :].mean(1)
    width, height = np.abs(right - left) * SIZE / (SIZE - 1), (bottom - top) * SIZE / (SIZE - 1)
    return {"area": width * height, "log_aspect": np.log(width / height), "flipped": right < left}


def test_device_crops_have_the_cpu_paths_scale_ratio_and_flip_statistics(tmp_path: Path) -> None:
    root = tmp_path / "squares"  # one size, so the aspect ratio read back is the crop's alone
    for i in range(16):
        save_image(root / "a" / f"{i}.png", gradient(160, 160))
    settings = {"hflip": 0.3, "crop_scale": (0.25, 1.0), "crop_ratio": (0.5, 2.0), "val_fraction": 0.0}
    stats = {}
    for path, extra in (("cpu", {"decode": "cpu"}), ("ram", {"cache": "ram"})):
        random.seed(0)  # the crop and flip draws (timm's and ours) use Python's RNG
        torch.manual_seed(0)
        module = datamodule(root, **settings, **extra)
        images = torch.cat([images for _ in range(40) for images, _, _ in batches(module, "train")])
        stats[path] = crop_statistics(images)
    cpu, ram = stats["cpu"], stats["ram"]
    assert len(cpu["area"]) == len(ram["area"]) == 640
    for name in ("area", "log_aspect"):
        for q in (0.1, 0.25, 0.5, 0.75, 0.9):
            assert np.quantile(ram[name], q) == pytest.approx(np.quantile(cpu[name], q), abs=0.06), (name, q)
    assert cpu["area"].min() > 0.2 and np.quantile(cpu["area"], 0.05) < 0.35  # the statistics see the scale range
    assert np.quantile(cpu["log_aspect"], 0.05) < -0.4 < 0.4 < np.quantile(cpu["log_aspect"], 0.95)
    assert ram["flipped"].mean() == pytest.approx(0.3, abs=0.05)
    assert cpu["flipped"].mean() == pytest.approx(0.3, abs=0.05)


@pytest.mark.parametrize("size", [SIZE, (24, 40), (40, 24)])  # square, wide and tall models
def test_ram_cache_gives_the_file_paths_samples(gradients: Path, size: int | tuple[int, int]) -> None:
    files = datamodule(gradients, decode="cpu", image_size=size)
    cached = datamodule(gradients, cache="ram", image_size=size)
    assert files.datasets["val"].paths == cached.datasets["val"].paths
    for (a, targets_a, rows_a), (b, targets_b, rows_b) in zip(
        batches(files, "val"), batches(cached, "val"), strict=True
    ):
        assert torch.equal(targets_a, targets_b) and torch.equal(rows_a, rows_b)
        torch.testing.assert_close(b, a, atol=0, rtol=0)  # the same decode, resize and centre crop
    seen = {}
    for name, module in (("files", files), ("cached", cached)):
        pairs = [pair for _, targets, rows in batches(module, "train") for pair in zip(rows, targets, strict=True)]
        seen[name] = sorted((int(row), int(target)) for row, target in pairs)
    assert seen["files"] == seen["cached"]  # the same shuffle, from the datamodule's seeded generator
    assert len(seen["files"]) == len(files.datasets["train"]) // 8 * 8  # full batches only


def test_gpu_decode_falls_back_to_the_cpu_for_png_cmyk_and_rotated_jpegs_in_the_same_batch(tmp_path: Path) -> None:
    root = tmp_path / "mixed"
    for i in range(3):
        save_image(root / "a" / f"plain{i}.jpg", gradient(180, 140), quality=95)
    save_image(root / "a" / "lossless.png", gradient(180, 140))
    save_image(root / "a" / "print.jpg", gradient(180, 140).convert("CMYK"), quality=95)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: upright, it is 140 x 180
    save_image(root / "a" / "phone.jpg", gradient(180, 140).rotate(90, expand=True), quality=95, exif=exif)
    module, raw, paths = gpu_decode_batch(root)
    assert len(raw.jpegs) == 3 and len(raw.canvas) == 3  # nvJPEG gets the plain JPEGs only
    images, _, rows = module.on_after_batch_transfer(module.transfer_batch_to_device(raw, torch.device("cpu"), 0), 0)
    mean, std = module._normalisation(torch.device("cpu"))
    transform = ImageFolderDataModule(image_size=SIZE, decode="cpu").transform(training=False)
    for image, row in zip(images * std + mean, rows.tolist(), strict=True):
        path = paths[row]
        expected = transform(load_rgb(path)).float()
        assert (image - expected).abs().mean() < 1, path.name  # the same picture, upright (mirrored: > 30)


def test_a_batch_the_jpeg_decoder_rejects_is_decoded_image_by_image(
    gradients: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    module, raw, _ = gpu_decode_batch(gradients / "a")
    expected = module.transfer_batch_to_device(raw, torch.device("cpu"), 0).render((SIZE, SIZE), jitter=False)

    def picky(data, **kwargs):  # like nvJPEG meeting a JPEG feature it lacks: whole batches fail
        if isinstance(data, list):
            raise RuntimeError("nvjpegDecodeBatched failed: unsupported JPEG")
        return torchvision.io.decode_jpeg(data, **kwargs)

    monkeypatch.setattr("classifier.data.device_augment.decode_jpeg", picky)
    with caplog.at_level(logging.WARNING):
        rendered = module.transfer_batch_to_device(raw, torch.device("cpu"), 0).render((SIZE, SIZE), jitter=False)
    assert "JPEG decoder rejected a batch (nvjpegDecodeBatched failed" in caplog.text
    torch.testing.assert_close(rendered, expected, atol=0, rtol=0)


def test_gpu_decode_without_cuda_names_the_option(small_digits: Path, tmp_path: Path) -> None:
    config = tiny_config(tmp_path, small_digits, data={"decode": "gpu"})
    with pytest.raises(ValueError, match="--data.decode gpu needs a CUDA device"):
        cli_main(["fit", "--config", str(config)])
    assert not list((tmp_path / "lightning_logs").rglob("*.ckpt"))


def test_auto_augment_refuses_the_device_path_by_name(gradients: Path) -> None:
    with pytest.raises(ValueError, match="--data.auto_augment rand-m9-mstd0.5 works on PIL images"):
        datamodule(gradients, cache="ram", auto_augment="rand-m9-mstd0.5")
    assert isinstance(datamodule(gradients, auto_augment="rand-m9-mstd0.5").datasets["train"], ImageDataset)
    evaluated = ImageFolderDataModule(str(gradients), image_size=SIZE, cache="ram", auto_augment="rand-m9-mstd0.5")
    evaluated.setup("validate")  # a checkpoint trained with a policy evaluates on any path: eval never augments
    assert len(evaluated.datasets["val"]) == len(evaluated.splits.subset("val")[0]) > 0


def test_big_jpegs_draft_for_training_and_decode_in_full_for_eval(tmp_path: Path) -> None:
    path = save_image(tmp_path / "a" / "big.jpg", gradient(1600, 1200), quality=90)
    assert load_rgb(path).size == (1600, 1200)
    assert load_rgb(path, min_size=300).size == (400, 300)  # 1/4 scale: 1/8 would leave 150 < 300
    module = datamodule(tmp_path, decode="cpu", val_fraction=0.0, crop_pct=0.5)  # eval resizes to 64
    assert module.scale_size == (64, 64) and module.datasets["val"].min_size is None  # eval: the full decode
    assert module.datasets["train"].min_size == module.train_decode_size
    image, _, _ = module.datasets["train"][0]
    assert image.shape == (3, SIZE, SIZE)


@pytest.mark.parametrize(
    ("crop_scale", "crop_ratio", "drafted", "cached"),
    [
        # the 8% crop at ratio 3/4 spans sqrt(0.08 * 3/4) = 0.245 of a side: 64 px need 262, so 1/4 scale, not 1/8
        ((0.08, 1.0), (3 / 4, 4 / 3), (400, 300), (262, 349)),
        ((0.02, 1.0), (3 / 4, 4 / 3), (800, 600), (523, 697)),  # 0.1225 of a side: 523 px, so 1/2 scale
        ((0.001, 1.0), (3 / 4, 4 / 3), (1600, 1200), (1200, 1600)),  # more than the file has: all of it
        ((1.0, 1.0), (1.0, 1.0), (200, 150), (73, 97)),  # whole-image crops: eval's resize, 64 / 0.875 = 73
    ],
)
def test_training_keeps_the_pixels_of_its_smallest_crop(
    crop_scale: tuple[float, float], crop_ratio: tuple[float, float], drafted: tuple, cached: tuple, tmp_path: Path
) -> None:
    big = save_image(tmp_path / "a" / "big.jpg", gradient(1600, 1200), quality=90)
    small = save_image(tmp_path / "a" / "small.jpg", gradient(60, 50), quality=90)
    settings = {"val_fraction": 0.0, "image_size": 64, "crop_pct": 0.875, "crop_scale": crop_scale}
    files = datamodule(tmp_path, decode="cpu", crop_ratio=crop_ratio, **settings)
    assert load_rgb(big, files.datasets["train"].min_size).size == drafted
    cache = datamodule(tmp_path, cache="ram", crop_ratio=crop_ratio, **settings).datasets["train"].cache
    assert cache[big].shape == (3, *cached)
    assert cache[small].shape == (3, 50, 60)  # never enlarged: the device crop resizes once


@pytest.mark.parametrize(("cores", "workers"), [(1, 1), (2, 1), (8, 7), (64, 16)])
def test_default_workers_leave_one_core_to_the_training_loop(
    cores: int, workers: int, gradients: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(100, 100 + cores)), raising=False)
    assert datamodule(gradients, num_workers=None).train_dataloader().num_workers == workers


@pytest.mark.parametrize(("cores", "workers"), [(16, 7), (4, 1), (64, 16)])
def test_default_workers_share_the_cores_between_ddp_processes(
    cores: int, workers: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    assert default_num_workers(processes_per_node=2) == workers


def test_cache_that_does_not_fit_falls_back_to_the_files(
    small_digits: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr("classifier.data.ram_cache.available_memory", lambda: 10_000)
    config = tiny_config(tmp_path, small_digits, data={"cache": "ram"}, trainer={"max_epochs": 1})
    with caplog.at_level(logging.WARNING):
        cli_main(["fit", "--config", str(config)])
    assert "--data.cache ram: the 140 train images need about" in caplog.text
    assert "reading them from disk instead" in caplog.text
    assert (run_dir(tmp_path, 0) / "checkpoints" / "best.ckpt").exists()


@pytest.mark.slow
def test_training_from_the_ram_cache_is_as_accurate_as_from_the_files(digits_dir: Path, tmp_path: Path) -> None:
    accuracy = {}
    for version, cache in enumerate(("none", "ram")):
        config = tiny_config(tmp_path, digits_dir, data={"cache": cache, "crop_scale": [0.6, 1.0], "batch_size": 64},
                             trainer={"max_epochs": 4})  # fmt: skip
        cli_main(["fit", "--config", str(config)])
        best = run_dir(tmp_path, version) / "checkpoints" / "best.ckpt"
        cli_main(["test", "--ckpt_path", str(best)])
        accuracy[cache] = json.loads((run_dir(tmp_path, version) / "test" / "metrics.json").read_text())["test/acc"]
    assert accuracy["none"] > 0.8 and accuracy["ram"] > 0.8  # chance is 0.1; 0.848 on one thread, 0.87 on two
    assert accuracy["ram"] == pytest.approx(accuracy["none"], abs=0.05)
