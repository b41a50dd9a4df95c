"""The trainer the CLI builds: Lightning's, with checkpoints written whole or not at all, SLURM's requeue saving the
run's own `last.ckpt`, and `lr_find` as a method, so that LightningCLI offers it as a subcommand."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch import LightningDataModule, Trainer
from lightning.pytorch.plugins.io import TorchCheckpointIO

from classifier.model.checkpoints import save_checkpoint
from classifier.model.module import ImageClassifier
from classifier.training.faults import RunCheckpointConnector
from classifier.training.lr_find import Rule, lr_find


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, with the temporary file beside the checkpoint, a check of the free space
    before anything is written, and an fsync before the rename, so that `last.ckpt` and `best.ckpt` are always
    whole: the old one until the new one is complete."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):  # remote stores: Lightning's way
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_checkpoint(checkpoint, path)


class ClassifierTrainer(Trainer):
    """Lightning's Trainer, whose checkpoints a kill or a full disk never leaves half written, plus `lr_find`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if type(self.strategy.checkpoint_io) is TorchCheckpointIO:  # Lightning's default; a plugin of the user's stays
            self.strategy.checkpoint_io = AtomicCheckpointIO()
        self._checkpoint_connector = RunCheckpointConnector(self)

    def lr_find(
        self,
        model: ImageClassifier,
        datamodule: LightningDataModule | None = None,
        min_lr: float = 1e-6,
        max_lr: float = 1.0,
        num_training: int = 100,
        early_stop_threshold: float | None = 4.0,
        rule: Rule = "valley",
    ) -> float | None:
        """Find a learning rate: train briefly while raising it exponentially, and suggest where loss falls fastest.

        Args:
            min_lr: The sweep's first learning rate.
            max_lr: The sweep's last learning rate.
            num_training: Training steps in the sweep.
            early_stop_threshold: Stop once the loss exceeds this multiple of the best loss; None never stops.
            rule: How the curve gives the rate: valley (about 2/3 down the longest fall, fastai's default), minimum
                (a tenth of the rate of the lowest loss) or steepest (the steepest fall per decade of rate).
        """
        return lr_find(self, model, datamodule, min_lr, max_lr, num_training, early_stop_threshold, rule)
