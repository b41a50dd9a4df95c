"""Where a batch becomes pixels: in the loader workers, or on the device (GPU decoding, the RAM cache), and the
normalisation every batch gets there. A mixin of the datamodule, which supplies `hparams`, `data_config` and
`trainer`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from timm.data.random_erasing import RandomErasing
from torch import Tensor

from classifier.core.geometry import scale_size
from classifier.data.device_augment import CropBatch, CropPlanner
from classifier.data.ram_cache import cached_split
from classifier.data.transforms import crop_decode_size
from classifier.data.workers import available_cores
from classifier.model.net import normalisation

Batch = tuple[Tensor, Tensor, Tensor]


class DeviceRendering:
    """The datamodule's device side: which path renders its batches, the sizes they are decoded at, and the hooks
    that move them to the device and normalise them there."""

    hparams: Any
    data_config: dict[str, Any]
    trainer: Any
    _normalisation_on: dict[torch.device, tuple[Tensor, Tensor]]

    @property
    def gpu_decode(self) -> bool:
        """Whether JPEGs are decoded on the device: `--data.decode gpu`, or `auto` on a CUDA device unless an
        auto_augment policy needs PIL images or the resize mode renders on the CPU."""
        decode = self.hparams.decode
        on_cuda = self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"
        if decode == "gpu" and self.trainer is not None and not on_cuda:
            raise ValueError("--data.decode gpu needs a CUDA device; use --data.decode auto or cpu")
        auto = on_cuda and not self.hparams.auto_augment and self.device_renders_mode and not self.hparams.shards
        return decode == "gpu" or (decode == "auto" and auto)

    @property
    def device_rendered(self) -> bool:
        """Whether batches are cropped, flipped and jittered on the device rather than in the loader workers."""
        return self.gpu_decode or self.hparams.cache == "ram"

    @property
    def input_hw(self) -> tuple[int, int]:
        """(height, width) of the images the model sees."""
        _, height, width = self.data_config["input_size"]
        return height, width

    @property
    def scale_size(self) -> tuple[int, int]:
        """(height, width) eval resizes to before its centre crop (timm's), which eval's RAM cache keeps."""
        return scale_size(self.data_config)

    @property
    def train_decode_size(self) -> int | None:
        """The shorter side training images keep: enough for the smallest crop the settings allow; None for all."""
        hp = self.hparams
        aspect = self.input_hw[1] / self.input_hw[0] if self.data_config["crop_mode"] == "center" else 1.0
        return crop_decode_size(max(self.input_hw), min(self.scale_size), hp.crop_scale, hp.crop_ratio, aspect)

    def decode_size(self, training: bool) -> int | tuple[int, int] | None:
        """Training keeps enough pixels for its smallest crop (a shorter side); eval those of its resize."""
        return self.train_decode_size if training else self.scale_size

    @property
    def device_renders_mode(self) -> bool:
        """Whether the device paths (RAM cache, GPU decode) render this resize mode: `crop` only."""
        return self.data_config.get("crop_mode", "center") == "center"

    def planner(self, training: bool) -> CropPlanner:
        """Per-sample crop, flip and jitter plans with this module's settings, for the device-rendered path."""
        hp = self.hparams
        return CropPlanner(
            self.input_hw,
            self.scale_size,
            training,
            hp.crop_scale,
            hp.crop_ratio,
            hp.hflip,
            hp.color_jitter,
        )

    def _cache(self, name: str, paths: list[Path]) -> dict[Path, Tensor] | None:
        """The split's checked images presized in RAM; None without `--data.cache ram`, for the single-pass test
        split, and when they would not fit."""
        if self.hparams.cache != "ram" or name not in ("train", "val") or not paths:
            return None
        copies = self.trainer.num_devices if self.trainer is not None else 1
        size, interpolation = self.decode_size(name == "train"), self.data_config["interpolation"]
        return cached_split(paths, size, interpolation, name == "train", copies, name, 2 * available_cores())

    def transfer_batch_to_device(self, batch: Batch | CropBatch, device: torch.device, dataloader_idx: int) -> Any:
        """A CropBatch moves itself, decoding its JPEGs on the device."""
        if isinstance(batch, CropBatch):
            return batch.to(device)
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def on_after_batch_transfer(self, batch: Batch | CropBatch, dataloader_idx: int) -> Batch:
        """uint8 -> normalised float on the device, rendering device-side crops first; then random erasing."""
        if isinstance(batch, CropBatch):
            jitter = bool(self.hparams.color_jitter) and self.trainer is not None and self.trainer.training
            images, targets, rows = batch.render(self.input_hw, jitter), batch.targets, batch.rows
        else:
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
            self._normalisation_on[device] = normalisation(self.data_config, device)
        return self._normalisation_on[device]
