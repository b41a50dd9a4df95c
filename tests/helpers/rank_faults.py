"""Faults injected into one DDP rank of a real `classifier fit` (a config's `trainer.callbacks`)."""

from __future__ import annotations

import os
import signal
import time

from lightning.pytorch import Callback


class RankFault(Callback):
    """At training step `step` of global rank `rank`, raise (`how="raise"`), SIGKILL the process (`how="kill"`) or
    stop answering for an hour (`how="hang"`: a stuck rank, or one still busy), after writing the time to `time_file`
    so that a test knows when the fault happened."""

    def __init__(self, rank: int = 1, step: int = 2, how: str = "raise", time_file: str | None = None) -> None:
        self.rank, self.step, self.how, self.time_file = rank, step, how, time_file

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_rank != self.rank or trainer.global_step != self.step:
            return
        if self.time_file:
            with open(self.time_file, "w") as file:
                file.write(str(time.time()))
        if self.how == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if self.how == "hang":
            time.sleep(3600)
        raise RuntimeError(f"injected fault on rank {self.rank} at step {self.step}")
