"""Streaming one split of the LitData shards `classifier shard` wrote: its dataset, decoded and transformed in the
loader workers, and its loader.

LitData (`StreamingDataset`, `StreamingDataLoader`) does the streaming: from a folder, or from s3://, gs:// or
azure:// through its own clients, each rank and worker reading its own chunks. Two things are ours:

- Augmentation seeds. Each training sample's transform is seeded from (the shuffle seed, the epoch, its row), so a
  sample is augmented the same way whichever worker decodes it and whenever the run was resumed.
- The resume position. Lightning's fetcher asks the loader for one batch ahead, so the loader's own count runs one
  batch past the trainer's; `position` rebuilds the loader's state at the batch the trainer reached, and the
  datamodule keeps it in its `state_dict` (LitData's loader state is not restored by the Trainer, litdata #775).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from litdata import StreamingDataLoader, StreamingDataset
from litdata.utilities.env import _DistributedEnv
from torch import Tensor

from classifier.core.imageio import load_rgb
from classifier.data.samplers import SEED_BOUND, seeded
from classifier.data.shard_meta import ShardMeta, litdata_location

log = logging.getLogger(__name__)


def sample_seed(shuffle_seed: int, epoch: int, row: int) -> int:
    """The augmentation seed of one sample in one epoch: the same in any worker, process or resumed run."""
    return int(np.random.SeedSequence([shuffle_seed, epoch, row]).generate_state(2, np.uint64)[0]) % SEED_BOUND


class ShardDataset(StreamingDataset):
    """(uint8 CHW image, target, row) per sample of one split's shards: the original file's bytes decoded as the
    folder path decodes them, then `transform`. Training shuffles (LitData's: the chunks, then all the samples of
    each, seeded with `seed`) and drops the samples that would leave ranks unequal; eval keeps every sample once, in
    order."""

    def __init__(
        self,
        location: str,
        transform: Callable,
        min_size: int | None,
        training: bool,
        seed: int = 0,
        cache_dir: str | None = None,
        ranks: tuple[int, int, int] | None = None,
        storage_options: dict | None = None,
    ) -> None:
        super().__init__(
            litdata_location(location),
            cache_dir=cache_dir,
            storage_options=storage_options,
            shuffle=training,
            item_shuffle_window=0 if training else None,  # each chunk wholly permuted, not in windows of 256
            drop_last=training,  # eval: every image once, however many ranks
            seed=seed,
        )
        if ranks is not None:  # (world size, rank, nodes) from the trainer: LitData guesses the nodes from the GPUs
            self.distributed_env = _DistributedEnv(*ranks)
        self.image_transform = transform
        self.min_size = min_size
        self.training = training

    def __getitem__(self, index: Any) -> tuple[Tensor, Any, int]:
        sample = super().__getitem__(index)
        row = int(sample["row"])
        image = load_rgb(io.BytesIO(sample["image"]), self.min_size)
        with seeded(sample_seed(self.seed, self.current_epoch, row) if self.training else None):
            pixels = self.image_transform(image)
        target = sample["target"]
        if isinstance(target, np.ndarray):  # multi-label: a 0/1 row, as the folder path gives it
            target = torch.from_numpy(target.astype(np.int64))
        return pixels, target, row

    def loader(self, batch_size: int, workers: int) -> StreamedLoader:
        """LitData's loader over this split: each rank and worker streams its own chunks."""
        return StreamedLoader(self, batch_size, workers, self.training)


class StreamedLoader:
    """A `StreamingDataLoader`, iterated by the trainer like any loader but hidden from Lightning's saving of
    stateful loaders: that would save LitData's count, one prefetched batch ahead; the datamodule saves `position`.
    """

    def __init__(self, dataset: ShardDataset, batch_size: int, workers: int, training: bool) -> None:
        self.loader = StreamingDataLoader(
            dataset,
            batch_size=batch_size,
            num_workers=workers,
            drop_last=training,  # each worker's last partial batch: ranks keep equal batch counts
            pin_memory=torch.cuda.is_available(),
        )
        self.yielded = 0  # batches the latest iterator gave

    def __iter__(self) -> Iterator[Any]:
        # an iterator that trained on batches ends an epoch: the next starts afresh, where LitData would replay a
        # resumed position again when the trainer ended that epoch by its count rather than by exhausting it
        if self.yielded:
            self.loader.restore = False
        self.yielded = 0
        for batch in self.loader:
            self.yielded += 1
            yield batch

    def __len__(self) -> int:
        return len(self.loader)

    def position(self, batches: int, world_size: int) -> dict[str, Any]:
        """LitData's loader state after `batches` batches of the current epoch on this rank, and the world size it
        was saved under."""
        loader, samples = self.loader, batches * self.loader.batch_size
        state = loader.state_dict()
        state["dataset"] = loader.dataset.state_dict(samples, loader.num_workers, loader.batch_size)
        state["num_samples_yielded"] = samples
        state["latest_worker_idx"] = (batches - 1) % max(loader.num_workers, 1)  # workers take turns by batch
        return {"loader": state, "world_size": world_size}

    def resume(self, position: dict[str, Any]) -> None:
        """Continue the epoch `position` was saved inside. With another number of loader workers LitData deals the
        rest of the epoch out again (each remaining sample once, in another order): said, not refused, since the
        worker count is the machine's."""
        saved, now = position["loader"]["dataset"]["num_workers"], max(self.loader.num_workers, 1)
        if saved != now:
            log.warning(
                "The checkpoint's epoch was streamed by %d loader workers and goes on with %d: LitData deals out the "
                "rest of it again, so this run will not match an uninterrupted one exactly (resume with "
                "--data.num_workers %d for that)",
                saved,
                now,
                saved,
            )
        self.loader.load_state_dict(position["loader"])


def read_rows(
    meta: ShardMeta,
    name: str,
    rows: list[int],
    transform: Callable,
    cache_dir: str | None,
    storage_options: dict | None = None,
) -> list[Tensor]:
    """The eval pixels of `rows` of split `name`, in that order, read in one pass over its shards, which ends once
    every row wanted was read (val and test stream in row order, so at the last)."""
    wanted, found = set(rows), {}
    location = meta.split_location(name)
    for pixels, _, row in ShardDataset(location, transform, None, False, 0, cache_dir, None, storage_options):
        if row in wanted:
            found[row] = pixels
            if len(found) == len(wanted):
                break
    return [found[row] for row in rows]
