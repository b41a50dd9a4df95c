"""Training samplers whose every draw comes from the datamodule's checkpointed generator, augmentations included.

Loader workers seed their RNGs once, when they start; persistent workers keep that state across epochs, so a
resumed run would augment differently. Here the main process pairs each index with a seed, and the dataset
seeds Python's, numpy's and torch's RNGs from it before transforming the sample: where it runs no longer matters.

A checkpoint saved inside an epoch records where that epoch began (`EpochStart`), so that a resumed run draws the
same epoch again and continues it where the checkpoint was saved.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import RandomSampler, Sampler, WeightedRandomSampler, get_worker_info

SEED_BOUND = 2**62
Key = int | tuple[int, int]  # a row index, or (row index, augmentation seed) from a SeededSampler


@dataclass
class EpochStart:
    """The generator's state before the current epoch's draws, and how many of that epoch's samples a run resumed
    inside it has already trained on."""

    state: Tensor | None = None
    done: int = 0


class SeededSampler(Sampler[tuple[int, int]]):
    """`sampler`'s indices, each with an augmentation seed, all drawn from `generator` when an epoch starts.

    Resumed inside an epoch, the epoch begins where training stopped: the samples trained on before move to the
    end, past the batches the trainer still counts for this epoch, so that every rank's loader keeps its length
    and each remaining sample is trained on once. Under DDP the samples done are counted over all ranks, which
    take every world_size-th sample of this one sequence.
    """

    def __init__(self, sampler: Sampler[int], generator: torch.Generator, start: EpochStart | None = None) -> None:
        self.sampler = sampler
        self.generator = generator
        self.start = start or EpochStart()

    def __iter__(self) -> Iterator[tuple[int, int]]:
        self.start.state = self.generator.get_state()
        indices = list(self.sampler)
        seeds = torch.randint(SEED_BOUND, (len(indices),), generator=self.generator).tolist()
        keys = list(zip(indices, seeds, strict=True))
        done, self.start.done = self.start.done, 0
        return iter(keys[done:] + keys[:done])

    def __len__(self) -> int:
        return len(self.sampler)


def training_sampler(
    targets: list[int], num_classes: int, balanced: bool, generator: torch.Generator, start: EpochStart | None = None
) -> SeededSampler:
    """Shuffled indices, or class-balanced ones (every class equally often, with replacement), with their seeds.

    Under DDP, Lightning wraps it in a DistributedSamplerWrapper: every rank draws the same epoch, takes its share.
    """
    if balanced:
        counts = torch.bincount(torch.tensor(targets), minlength=num_classes).float()
        weights = (1.0 / counts)[targets]
        sampler = WeightedRandomSampler(weights, len(targets), replacement=True, generator=generator)
    else:
        sampler = RandomSampler(range(len(targets)), generator=generator)
    return SeededSampler(sampler, generator, start)


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
