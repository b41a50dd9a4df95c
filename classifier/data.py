"""The LightningDataModule: image folders in, uint8 batches out, normalised on the device."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from timm.data import create_transform
from timm.data.random_erasing import RandomErasing
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler
from torchvision.transforms import TrivialAugmentWide

from classifier.backbones import backbone_data_config
from classifier.images import find_unreadable, list_images, load_rgb
from classifier.splits import Splits, build_splits

log = logging.getLogger(__name__)

Batch = tuple[Tensor, Tensor, Tensor]


class ImageDataset(Dataset):
    """(uint8 CHW image, class index, row index) per file; the row index maps outputs back to paths."""

    def __init__(self, paths: list[Path], targets: list[int], transform: Callable) -> None:
        self.paths = paths
        self.targets = targets
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Tensor, int, int]:
        return self.transform(load_rgb(self.paths[index])), self.targets[index], index


def predict_paths(source: Path) -> list[Path]:
    """The images named by --data.predict_dir: a folder's (recursively), one file, or a .txt list's."""
    if source.is_dir():
        return list_images(source)
    if not source.is_file():
        raise FileNotFoundError(f"--data.predict_dir {source} does not exist")
    if source.suffix.lower() != ".txt":
        return [source]
    lines = (line.strip() for line in source.read_text().splitlines())
    return [source.parent / line for line in lines if line and not line.startswith("#")]


def listing(unreadable: dict[Path, str]) -> str:
    """One indented `path: reason` line per unreadable file."""
    return "\n".join(f"  {path}: {reason}" for path, reason in unreadable.items())


def default_num_workers() -> int:
    """One loader process per available core, up to 8."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(8, cores)


class ImageFolderDataModule(LightningDataModule):
    """Splits, transforms and loaders for a folder of class subfolders (or train/ val/ test/ of them)."""

    def __init__(
        self,
        data_dir: str = "data/digits",
        predict_dir: str | None = None,
        backbone: str = "resnet18",
        image_size: int | None = None,
        crop_pct: float | None = None,
        batch_size: int = 64,
        num_workers: int | None = None,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        seed: int = 42,
        num_folds: int | None = None,
        fold: int = 0,
        classes: list[str] | None = None,
        skip_bad_images: bool = False,
        hflip: float = 0.5,
        crop_scale: tuple[float, float] = (0.08, 1.0),
        crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
        color_jitter: float | None = 0.4,
        auto_augment: str | None = None,
        random_erasing: float = 0.0,
        sampler: Literal["random", "balanced"] = "random",
    ) -> None:
        """
        Args:
            data_dir: Class subfolders, or train/ [val/] [test/] folders of class subfolders.
            predict_dir: What `predict` classifies: a folder (searched recursively), one image, or a .txt file
                listing image paths (relative ones are taken from the list's folder). No labels needed.
            backbone: timm model name whose data config (size, mean/std, crop) the transforms follow.
            image_size: Overrides the backbone's input size.
            crop_pct: Overrides the backbone's eval centre-crop fraction.
            batch_size: Images per batch on each device.
            num_workers: Loader processes; None takes one per core, up to 8.
            val_fraction: Share of train/ held out for validation when there is no val/ folder.
            test_fraction: Share of train/ held out for testing when there is no test/ folder.
            seed: Seed of the hold-outs, the folds and the shuffling.
            num_folds: Stratified k-fold over all but the test split; None for a single split.
            fold: Which fold validates, in [0, num_folds).
            classes: Class names in index order; restored from checkpoints so indices never shift.
            skip_bad_images: Skip unreadable files with a warning instead of stopping.
            hflip: Probability of a horizontal flip in training.
            crop_scale: Area range of the random-resized crop in training.
            crop_ratio: Aspect-ratio range of the random-resized crop in training.
            color_jitter: Strength of brightness/contrast/saturation jitter in training; None for none.
            auto_augment: A timm policy (`rand-m9-mstd0.5`, `augmix-m5-w4-d2`, `original`) or `trivialaugment`.
            random_erasing: Probability of erasing a random rectangle of each training image, on the device.
            sampler: `random` shuffles; `balanced` draws every class equally often (with replacement).
        """
        super().__init__()
        self.save_hyperparameters()
        self.generator = torch.Generator().manual_seed(seed)
        self.datasets: dict[str, ImageDataset] = {}
        self.unreadable: dict[Path, str] = {}  # predict's files that cannot be decoded, with the reason
        self._normalisation_on: dict[torch.device, tuple[Tensor, Tensor]] = {}

    @cached_property
    def splits(self) -> Splits:
        """Every image of `data_dir` with its split, read once."""
        hp = self.hparams
        splits = build_splits(
            Path(hp.data_dir), hp.classes, hp.val_fraction, hp.test_fraction, hp.seed, hp.num_folds, hp.fold
        )
        self.hparams.classes = splits.classes  # so checkpoints carry the class order
        return splits

    @property
    def class_names(self) -> list[str]:
        """Class names in index order; from the checkpoint when given, else from the train folders."""
        return list(self.hparams.classes or self.splits.classes)

    @property
    def class_counts(self) -> list[int]:
        """Train-split images per class, for class-weighted losses."""
        return self.splits.class_counts("train")

    @cached_property
    def data_config(self) -> dict[str, Any]:
        """The backbone's timm data config with this module's overrides applied."""
        config = backbone_data_config(self.hparams.backbone)
        if self.hparams.image_size:
            config["input_size"] = (3, self.hparams.image_size, self.hparams.image_size)
        if self.hparams.crop_pct:
            config["crop_pct"] = self.hparams.crop_pct
        return config

    def transform(self, training: bool) -> Callable:
        """timm's train or eval pipeline, ending in a uint8 tensor (normalisation happens on the device)."""
        config = {key: self.data_config[key] for key in ("input_size", "interpolation", "crop_pct", "crop_mode")}
        if not training:
            return create_transform(**config, normalize=False)
        hp = self.hparams
        trivial = hp.auto_augment == "trivialaugment"
        pipeline = create_transform(
            **config,
            is_training=True,
            normalize=False,
            hflip=hp.hflip,
            scale=tuple(hp.crop_scale),
            ratio=tuple(hp.crop_ratio),
            color_jitter=hp.color_jitter,
            auto_augment=None if trivial else hp.auto_augment,
        )
        if trivial:  # timm has no TrivialAugment; torchvision's works on the same PIL images
            pipeline.transforms.insert(-1, TrivialAugmentWide())
        return pipeline

    def setup(self, stage: str) -> None:
        """Build the datasets the stage needs, after checking that every one of their files decodes."""
        if stage == "predict":
            if not self.hparams.predict_dir:
                raise ValueError("predict needs --data.predict_dir: a folder of images, an image, or a .txt list")
            paths = predict_paths(Path(self.hparams.predict_dir))
            if not paths:
                raise ValueError(f"--data.predict_dir {self.hparams.predict_dir} holds no images")
            self.unreadable = find_unreadable(paths, num_threads=2 * default_num_workers())
            readable = [path for path in paths if path not in self.unreadable]
            if not readable:  # an unreadable file is one error row; with no readable ones there is nothing to do
                raise ValueError(
                    f"none of the {len(paths)} images of --data.predict_dir can be read:\n{listing(self.unreadable)}"
                )
            self.datasets["predict"] = ImageDataset(readable, [-1] * len(readable), self.transform(training=False))
            return
        needed = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}[stage]
        for name in needed:
            paths, targets = self.splits.subset(name)
            if not paths and (stage != "fit" or name == "train"):  # fit may go without val
                raise ValueError(f"{self.hparams.data_dir} has no {name} split: add a {name}/ folder or a fraction")
            keep = set(self._readable(paths))
            kept = [(p, t) for p, t in zip(paths, targets, strict=True) if p in keep]
            self.datasets[name] = ImageDataset(
                [p for p, _ in kept], [t for _, t in kept], self.transform(training=name == "train")
            )
        self._write_splits_csv()

    def _readable(self, paths: list[Path]) -> list[Path]:
        """`paths` without unreadable files, or an error listing each of them with its reason."""
        bad = find_unreadable(paths, num_threads=2 * default_num_workers())
        if not bad:
            return paths
        if not self.hparams.skip_bad_images:
            raise ValueError(
                f"{len(bad)} of {len(paths)} images cannot be read:\n{listing(bad)}\n"
                "Fix or remove them, or pass --data.skip_bad_images true to leave them out."
            )
        log.warning("Skipping %d unreadable images of %d:\n%s", len(bad), len(paths), listing(bad))
        return [path for path in paths if path not in bad]

    def _write_splits_csv(self) -> None:
        trainer = self.trainer
        if trainer is None:
            return
        log_dir = trainer.log_dir  # a collective under DDP: every rank asks; None under fast_dev_run
        if log_dir is not None and trainer.is_global_zero:
            Path(log_dir).mkdir(parents=True, exist_ok=True)
            self.splits.write_csv(Path(log_dir) / "splits.csv")

    def _loader(self, name: str) -> DataLoader:
        dataset = self.datasets[name]
        workers = self.hparams.num_workers if self.hparams.num_workers is not None else default_num_workers()
        training = name == "train"
        sampler = None
        trainer = self.trainer
        if training and self.hparams.sampler == "balanced":
            # Lightning wraps it in a DistributedSamplerWrapper under DDP, so each rank gets its share of the draws
            counts = torch.bincount(torch.tensor(dataset.targets), minlength=len(self.class_names)).float()
            weights = (1.0 / counts)[dataset.targets]
            sampler = WeightedRandomSampler(weights, len(dataset), replacement=True, generator=self.generator)
        elif not training and trainer is not None and trainer.world_size > 1:
            # each image evaluated exactly once, so synced metrics equal single-process ones
            sampler = UnrepeatedDistributedSampler(
                dataset, num_replicas=trainer.world_size, rank=trainer.global_rank, shuffle=False
            )
        return DataLoader(
            dataset,
            batch_size=self.hparams.batch_size,
            shuffle=training and sampler is None,
            sampler=sampler,
            drop_last=training and len(dataset) > self.hparams.batch_size,  # no size-1 batch for BatchNorm
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(),
            # shuffling and worker seeds come from this module's generator, which checkpoints save and restore
            generator=self.generator if training else torch.Generator(),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict")

    def paths(self, stage: str) -> list[Path]:
        """Files of a stage's dataset, in row-index order."""
        return self.datasets[stage].paths

    def on_after_batch_transfer(self, batch: Batch, dataloader_idx: int) -> Batch:
        """uint8 -> normalised float on the device; the seam for later GPU-side augmentation."""
        images, targets, rows = batch
        mean, std = self._normalisation(images.device)
        images = (images.float() - mean) / std
        if self.hparams.random_erasing and self.trainer is not None and self.trainer.training:
            # timm's random erasing, on the normalised batch, filling with per-pixel noise
            images = RandomErasing(self.hparams.random_erasing, mode="pixel", device=images.device)(images)
        return images, targets, rows

    def _normalisation(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """Mean and std on the 0-255 scale, copied to `device` once rather than every batch."""
        if device not in self._normalisation_on:
            mean = torch.tensor(self.data_config["mean"]).view(1, -1, 1, 1) * 255
            std = torch.tensor(self.data_config["std"]).view(1, -1, 1, 1) * 255
            self._normalisation_on[device] = mean.to(device), std.to(device)
        return self._normalisation_on[device]

    def state_dict(self) -> dict[str, Any]:
        """The shuffling generator's state, so a resumed run draws the same batches."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.generator.set_state(state_dict["generator"])
