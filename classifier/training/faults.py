"""What a training run does when it is stopped or goes wrong: `last.ckpt` inside epochs and on SIGTERM or SLURM's
requeue signal, and a stop, before any checkpoint takes them, when the weights stop being finite."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.connectors.checkpoint_connector import _CheckpointConnector
from lightning.pytorch.utilities.exceptions import SIGTERMException

from classifier.core.atomic import PARTIAL_SUFFIX
from classifier.core.errors import PeerRankFailed, TrainingDiverged

log = logging.getLogger(__name__)

LAST = "last"


# what gloo and NCCL say when a peer's process is gone
LOST_PEER = re.compile(r"Connection (?:reset|closed) by peer|NCCL communicator was aborted|remote process exited")


def lost_peer(error: RuntimeError) -> PeerRankFailed | None:
    """`error` as a PeerRankFailed, when it is a collective's report that another rank is gone."""
    found = LOST_PEER.search(str(error))
    if found is None:
        return None
    return PeerRankFailed(
        f"another DDP rank failed or was killed, so this one stopped ({found[0]}). Its own error, if it printed one, "
        "is above, each line prefixed [rankN]:; a rank killed without one was often out of memory (see dmesg). "
        "Once fixed, resume with --ckpt_path last"
    )


class LastCheckpoint(ModelCheckpoint):
    """`last.ckpt`, to resume from: rewritten after every epoch, every `every_n_train_steps` optimizer steps or
    `train_time_interval` inside epochs when given (the datamodule then resumes inside the epoch), and when SIGTERM
    stops the run.

    Lightning 2.6's `save_last=True` rewrites last.ckpt only in epochs that also save a top-k checkpoint.
    """

    def __init__(self, every_n_train_steps: int | None = None, train_time_interval: Any = None) -> None:
        super().__init__(
            filename=LAST,
            monitor=None,
            save_top_k=1,
            enable_version_counter=False,
            every_n_train_steps=every_n_train_steps,
            train_time_interval=train_time_interval,
            # at the epoch's end, after fit's report has recorded it, however often validation runs
            save_on_train_epoch_end=True,
        )
        self._every_n_epochs = 1  # at every epoch's end too, not only at the intervals

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx) -> None:
        if batch_idx + 1 < trainer.num_training_batches:  # the epoch's last batch: its end saves, after validation
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Remove what writers killed mid-write left: temporary files, never a torn checkpoint."""
        if trainer.is_global_zero and self.dirpath and Path(self.dirpath).is_dir():
            for partial in Path(self.dirpath).glob(f".*{PARTIAL_SUFFIX}"):
                log.info("Removing %s, left by a write that was cut short", partial)
                partial.unlink(missing_ok=True)

    @property
    def path(self) -> Path | None:
        """Where last.ckpt goes; known once the trainer has set the run up."""
        return Path(self.dirpath) / f"{LAST}{self.FILE_EXTENSION}" if self.dirpath else None

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        """SIGTERM (a scheduler's preemption, `kill`): save where training stands, then let the run end."""
        if not isinstance(exception, SIGTERMException) or trainer.state.fn != "fit" or self.path is None:
            return
        trainer.save_checkpoint(self.path)
        if trainer.is_global_zero:
            log.warning(
                "Stopped by SIGTERM at epoch %d, step %d: saved %s. Resume with the same command and --ckpt_path last "
                "(it continues inside the epoch).",
                trainer.current_epoch,
                trainer.global_step,
                self.path,
            )


class DivergenceGuard(Callback):
    """Stops a run whose loss became NaN or infinite within the epoch, before validation and before any checkpoint
    could save its weights, so `best.ckpt` and `last.ckpt` keep the last finite ones.

    Each step's check stays on the device (reading it back every step would stall a GPU's queue); it is read
    once per epoch and before every checkpoint save.
    """

    def __init__(self) -> None:
        self._bad: torch.Tensor | None = None  # (global step, batch of the epoch, loss) of the first bad step, or -1s

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._bad = None

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if not isinstance(loss, torch.Tensor):
            return
        loss = loss.detach().float()
        if self._bad is None:
            self._bad = torch.full((3,), -1.0, device=loss.device)
        here = torch.stack([torch.full_like(loss, trainer.global_step), torch.full_like(loss, batch_idx), loss])
        first = torch.logical_and(~torch.isfinite(loss), self._bad[0] < 0)
        self._bad = torch.where(first, here, self._bad)

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._check(trainer)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._check(trainer)

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        self._check(trainer)

    def _check(self, trainer: Trainer) -> None:
        if self._bad is None:
            return
        bad = trainer.strategy.reduce_boolean_decision(bool(self._bad[0] >= 0), all=False)
        if not bad:
            return
        step, batch, loss = self._bad.tolist()
        kept = [str(callback.best_model_path or callback.last_model_path) for callback in trainer.checkpoint_callbacks]
        kept = [path for path in kept if path]
        raise TrainingDiverged(
            f"training diverged: the loss was {loss} at epoch {trainer.current_epoch}, batch {int(batch)} "
            f"(global step {int(step)}). The run stopped before any checkpoint took these weights"
            + (f"; {' and '.join(kept)} hold the last finite ones" if kept else "")
            + ". Lower the learning rate (--model.optimizer.init_args.lr), clip gradients "
            "(--trainer.gradient_clip_val 1.0), or find the operation with --trainer.detect_anomaly true"
        )


class RunCheckpointConnector(_CheckpointConnector):
    """Lightning's, except that SLURM's requeue signal (under `SLURMEnvironment(auto_requeue=True)`) saves the
    run's `last.ckpt`, which the requeued job's `--ckpt_path last` finds, rather than `hpc_ckpt_N.ckpt` in the
    working directory, which belongs to no run."""

    def hpc_save_path(self, folderpath: str | Path) -> str:  # Lightning's is a staticmethod
        last = next((c for c in self.trainer.checkpoint_callbacks if isinstance(c, LastCheckpoint)), None)
        if last is None or last.path is None:
            return _CheckpointConnector.hpc_save_path(folderpath)
        return os.fspath(last.path)
