"""Training samplers whose every draw comes from the datamodule's checkpointed generator, augmentations included.

Loader workers seed their RNGs once, when they start; persistent workers keep that state across epochs, so a
resumed run would augment differently. Here the main process pairs each index with a seed, and the dataset
seeds Python's, numpy's and torch's RNGs from it before transforming the sample: where it runs no longer matters.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch.utils.data import RandomSampler, Sampler, WeightedRandomSampler, get_worker_info

SEED_BOUND = 2**62
Key = int | tuple[int, int]  # a row index, or (row index, augmentation seed) from a SeededSampler


class SeededSampler(Sampler[tuple[int, int]]):
    """`sampler`'s indices, each with an augmentation seed, all drawn from `generator` when an epoch starts."""

    def __init__(self, sampler: Sampler[int], generator: torch.Generator) -> None:
        self.sampler = sampler
        self.generator = generator

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices = list(self.sampler)
        seeds = torch.randint(SEED_BOUND, (len(indices),), generator=self.generator).tolist()
        return iter(zip(indices, seeds, strict=True))

    def __len__(self) -> int:
        return len(self.sampler)


def training_sampler(targets: list[int], num_classes: int, balanced: bool, generator: torch.Generator) -> SeededSampler:
    """Shuffled indices, or class-balanced ones (every class equally often, with replacement), with their seeds.

    Under DDP, Lightning wraps it in a DistributedSamplerWrapper: every rank draws the same epoch, takes its share.
    """
    if balanced:
        counts = torch.bincount(torch.tensor(targets), minlength=num_classes).float()
        weights = (1.0 / counts)[targets]
        sampler = WeightedRandomSampler(weights, len(targets), replacement=True, generator=generator)
    else:
        sampler = RandomSampler(range(len(targets)), generator=generator)
    return SeededSampler(sampler, generator)


def split_key(key: Key) -> tuple[int, int | None]:
    """(row index, augmentation seed or None) from what a sampler yielded."""
    return key if isinstance(key, tuple) else (key, None)


@contextmanager
def seeded(seed: int | None) -> Iterator[None]:
    """Python's, numpy's and torch's CPU RNGs seeded for one sample. In the main process (`num_workers: 0`)
    they are put back afterwards, so the training loop's own draws stay as they were. None leaves them alone."""
    if seed is None:
        yield
        return
    in_main_process = get_worker_info() is None
    if in_main_process:  # saving numpy's state costs about 0.1 ms: not worth it where nothing else draws
        python, numpy, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.default_generator.manual_seed(seed)  # not torch.manual_seed, which would reseed CUDA too
    try:
        yield
    finally:
        if in_main_process:
            random.setstate(python)
            np.random.set_state(numpy)
            torch.set_rng_state(torch_state)
