"""Micro-batching: concurrent requests' images are stacked into one batch of up to `max_batch_size`, gathered for at
most `batch_timeout_ms`, and run in a worker thread so the event loop keeps accepting and reading requests. Each
image gets its row of the model's output: of its probabilities, or of each of the arrays the model returns (its
probabilities and its scores)."""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)
Output = np.ndarray | tuple[np.ndarray, ...]  # a batch's (N, C) probabilities, or those and other (N, ...) arrays


def one_row_per_image(arrays: tuple, images: int) -> bool:
    """Whether a model's output holds (N, C) probabilities first, and a row for each of the N images in every array."""
    shaped = all(getattr(array, "ndim", 0) >= 1 and len(array) == images for array in arrays)
    return shaped and arrays[0].ndim == 2


class QueueFull(Exception):
    """More images are waiting than the batcher holds: the client should retry later."""


class BatcherStopped(Exception):
    """The inference loop has ended: nothing queued will be computed, and the server is no longer healthy."""


@dataclass(eq=False)
class _Item:
    image: np.ndarray
    future: asyncio.Future = field(repr=False)


class MicroBatcher:
    """Images in, probabilities (or a tuple of rows) out, one call per image; a cancelled call (a client gone) gives
    its slot back."""

    def __init__(
        self,
        predict_batch: Callable[[np.ndarray], Output],
        max_batch_size: int = 16,
        batch_timeout_ms: float = 5.0,
        max_queue: int = 1024,
        on_batch: Callable[[int, float], None] = lambda size, seconds: None,
        on_queue: Callable[[int], None] = lambda depth: None,
    ) -> None:
        self.predict_batch = predict_batch
        self.max_batch_size = max_batch_size
        self.batch_timeout_s = batch_timeout_ms / 1000
        self.max_queue = max_queue
        self.on_batch, self.on_queue = on_batch, on_queue
        self._pending: collections.deque[_Item] = collections.deque()
        self._arrived = asyncio.Event()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="inference")
        self._task: asyncio.Task | None = None
        self._batch: list[_Item] = []  # the batch being computed
        self.failure: BaseException | None = None  # why the loop ended, when it ended by itself

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="micro-batcher")
        self._task.add_done_callback(self._ended)

    async def stop(self) -> None:
        """Called once no request is in flight (uvicorn drains them first); fails any that still wait. A batch still
        running in the inference thread is left to it: waiting for it here would block the event loop, and with it
        the shutdown, for as long as a hung model runs."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for item in self._pending:
            item.future.cancel()
        self._pending.clear()
        self._executor.shutdown(wait=False, cancel_futures=True)

    @property
    def alive(self) -> bool:
        """False once the inference loop has ended by itself: /health and /ready say so."""
        return self.failure is None

    @property
    def depth(self) -> int:
        return len(self._pending)

    def _ended(self, task: asyncio.Task) -> None:
        """The loop ended without being stopped: record why, and answer every waiting request with the error."""
        if task.cancelled():
            return
        self.failure = task.exception() or BatcherStopped("the inference loop returned")
        log.critical("The inference loop ended: %r; /health and /ready now fail", self.failure)
        for item in [*self._batch, *self._pending]:
            if not item.future.done():
                item.future.set_exception(BatcherStopped(f"the inference loop ended: {self.failure!r}"))
        self._pending.clear()

    async def predict(self, image: np.ndarray) -> np.ndarray | tuple[np.ndarray, ...]:
        """The probabilities (or the row of each array the model returns) of one preprocessed uint8 CHW image,
        computed in the next batch."""
        if self.failure is not None:
            raise BatcherStopped(f"the inference loop ended: {self.failure!r}")
        if len(self._pending) >= self.max_queue:
            raise QueueFull(f"{len(self._pending)} images are waiting; try again shortly")
        item = _Item(image, asyncio.get_running_loop().create_future())
        self._pending.append(item)
        self._arrived.set()
        self.on_queue(len(self._pending))
        try:
            return await item.future
        finally:
            if item.future.cancelled() and item in self._pending:  # gone before its batch formed
                self._pending.remove(item)
                self.on_queue(len(self._pending))

    async def _run(self) -> None:
        while True:
            batch = self._batch = []
            try:  # the whole body: a request's error must never end the loop that every request waits on
                await self._gather_batch()
                batch = self._batch = [
                    self._pending.popleft() for _ in range(min(self.max_batch_size, len(self._pending)))
                ]
                self.on_queue(len(self._pending))
                if batch:  # else every waiting client went away
                    await self._compute(batch)
            except asyncio.CancelledError:  # stopped, perhaps mid-batch
                for item in batch:
                    item.future.cancel()
                raise
            except Exception as error:  # noqa: BLE001 - the batch's requests get the error; the server goes on
                log.exception("A batch of %d images failed", len(batch))
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(error)

    async def _compute(self, batch: list[_Item]) -> None:
        """One batch through the model, each row to its request; a result of the wrong shape fails the batch."""
        started = time.perf_counter()
        output = await asyncio.get_running_loop().run_in_executor(
            self._executor, self.predict_batch, np.stack([item.image for item in batch])
        )
        arrays = output if isinstance(output, tuple) else (output,)
        if not one_row_per_image(arrays, len(batch)):
            shapes = ", ".join(str(getattr(array, "shape", type(array).__name__)) for array in arrays)
            raise ValueError(f"the model returned {shapes} for a batch of {len(batch)} images")
        for item, row in zip(batch, zip(*arrays, strict=True), strict=True):
            if not item.future.done():
                item.future.set_result(row if isinstance(output, tuple) else row[0])
        self.on_batch(len(batch), time.perf_counter() - started)

    async def _gather_batch(self) -> None:
        """Wait for a first image, then for more until the batch is full or the timeout has passed."""
        while not self._pending:
            self._arrived.clear()
            await self._arrived.wait()
        deadline = asyncio.get_running_loop().time() + self.batch_timeout_s
        while len(self._pending) < self.max_batch_size:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except asyncio.TimeoutError:
                return
