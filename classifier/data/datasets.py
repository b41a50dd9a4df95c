"""The datasets a loader reads: one sample per file, decoded in the workers or planned for a crop on the device."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from classifier.core.imageio import load_rgb
from classifier.data.device_augment import CropPlanner, collate_crops, cut
from classifier.data.images import is_jpeg_name, jpeg_size, presize
from classifier.data.samplers import Key, seeded, split_key


class FileDataset(Dataset):
    """One sample per file; `paths[row]` and `targets[row]` map each output row back to its file and label (a class
    index, or multi-label a 0/1 row, kept as a tensor so that batches stack it).

    Indexed by a row, or by (row, augmentation seed) from the training sampler.
    """

    def __init__(self, paths: list[Path], targets: list[int] | list[list[int]]) -> None:
        self.paths = paths
        self.targets = torch.tensor(targets) if targets and isinstance(targets[0], list) else targets

    def __len__(self) -> int:
        return len(self.paths)


class ImageDataset(FileDataset):
    """(uint8 CHW image, class index, row index) per file, through timm's transforms in the loader workers.

    With `min_size` (training), JPEGs decode at the smallest DCT scale that keeps `min_size` pixels on the shorter
    side; without (eval), in full, so that every eval path renders the same pixels.
    """

    def __init__(self, paths: list[Path], targets: list[int], transform: Callable, min_size: int | None) -> None:
        super().__init__(paths, targets)
        self.transform = transform
        self.min_size = min_size

    def __getitem__(self, key: Key) -> tuple[Tensor, int, int]:
        index, seed = split_key(key)
        image = load_rgb(self.paths[index], self.min_size)
        with seeded(seed):
            return self.transform(image), self.targets[index], index


class DeviceCropDataset(FileDataset):
    """(pixels or JPEG bytes, crop plan, class index, row index) per file, for batches rendered on the device.

    Pixels come from the RAM cache or a CPU decode (presized to a shorter side of `min_size`, never enlarged in
    training, then cut to the plan's box); with `gpu_decode`, JPEGs that nvJPEG reads as PIL would are passed on
    undecoded.
    """

    def __init__(
        self,
        paths: list[Path],
        targets: list[int],
        planner: CropPlanner,
        interpolation: str,
        min_size: int | tuple[int, int] | None,
        cache: dict[Path, Tensor] | None = None,
        gpu_decode: bool = False,
    ) -> None:
        super().__init__(paths, targets)
        self.planner = planner
        self.interpolation = interpolation
        self.min_size = min_size
        self.cache = cache
        self.gpu_decode = gpu_decode

    def __getitem__(self, key: Key) -> tuple[Tensor, Tensor, int, int]:
        index, seed = split_key(key)
        path, target = self.paths[index], self.targets[index]
        if self.cache is not None:
            image = self.cache[path]
        elif self.gpu_decode and is_jpeg_name(path) and (size := jpeg_size(data := path.read_bytes())):
            with seeded(seed):
                plan = self.planner(*size)
            return torch.frombuffer(bytearray(data), dtype=torch.uint8), plan, target, index
        else:  # other formats, and JPEGs nvJPEG would decode differently from PIL
            image = presize(path, self.min_size, self.interpolation, training=self.planner.training)
        with seeded(seed):
            plan = self.planner(image.shape[1], image.shape[2])
        crop, plan = cut(image, plan)
        return crop, plan, target, index


def loader(dataset: FileDataset, batch_size: int, workers: int, sampler: Sampler | None, training: bool) -> DataLoader:
    """A loader over `dataset` in `sampler`'s order, its JPEG bytes and crop plans collated for the device."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=training and len(dataset) > batch_size,  # no size-1 batch for BatchNorm
        num_workers=workers,
        collate_fn=collate_crops if isinstance(dataset, DeviceCropDataset) else None,
        persistent_workers=workers > 0,
        pin_memory=torch.cuda.is_available(),
        # only the workers' base seeds, which nothing draws from: drawing them from the module's generator
        # would shift it on every resume, since persistent workers draw them once per run
        generator=torch.Generator(),
    )
