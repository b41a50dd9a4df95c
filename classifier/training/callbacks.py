"""Callbacks the CLI always adds to training: exact resume, and the fit's curves, summary and TensorBoard views."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, early_stopping
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor
from torchmetrics.classification import MulticlassConfusionMatrix, MulticlassF1Score, MultilabelAveragePrecision
from torchmetrics.wrappers import ClasswiseWrapper

from classifier.core.atomic import write_json
from classifier.core.figures import save_figure
from classifier.evaluation.reports import confusion_matrix_figure, training_curves_figure

log = logging.getLogger(__name__)


class RNGStateCheckpoint(Callback):
    """Saves and restores the torch, CUDA, numpy and Python RNGs; Lightning does not, so resumes would diverge.

    The CUDA state is each rank's own device's, keyed by global rank, so a resume on fewer or other GPUs works.
    """

    def __init__(self) -> None:
        self._rank = 0
        self._device = torch.device("cpu")

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._rank, self._device = trainer.global_rank, trainer.strategy.root_device

    def state_dict(self) -> dict[str, Any]:
        name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
        state = {
            "torch": torch.get_rng_state(),
            "python": random.getstate(),
            # as a tensor: numpy arrays would make the checkpoint fail torch.load(weights_only=True)
            "numpy": (name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached_gaussian),
        }
        if self._device.type == "cuda":
            state["cuda"] = cuda_rng_states(torch.cuda.get_rng_state(self._device), gather_objects)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        torch.set_rng_state(state_dict["torch"])
        random.setstate(state_dict["python"])
        name, keys, position, has_gauss, cached_gaussian = state_dict["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian))
        if "cuda" in state_dict and self._device.type == "cuda":
            restore_cuda_rng_state(state_dict["cuda"], self._rank, self._device.index or 0, torch.cuda.set_rng_state)


def gather_objects(value: Any) -> list[Any]:
    """Every rank's `value`, in rank order; `[value]` outside a process group. A collective: all ranks call it."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [value]
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, value)
    return gathered


def cuda_rng_states(local_state: Tensor, gather: Callable[[Any], list[Any]]) -> dict[int, Tensor]:
    """Each rank's CUDA RNG state (of the one device it trains on), keyed by global rank."""
    return dict(enumerate(gather(local_state)))


def restore_cuda_rng_state(
    saved: dict[int, Tensor] | list[Tensor], rank: int, device_index: int, set_state: Callable[[Tensor, int], None]
) -> None:
    """Give this rank's device the state its rank saved.

    A checkpoint from before states were keyed by rank holds one state per device of the saving machine (the
    list `torch.cuda.get_rng_state_all` returns): this device's entry, if there is one. A rank or device without
    a saved state keeps its seeded one, with a warning, rather than failing as `set_rng_state_all` does on a
    machine with fewer GPUs than the list.
    """
    if isinstance(saved, dict):
        state, source = saved.get(rank), f"rank {rank}"
    else:
        state, source = (saved[device_index] if device_index < len(saved) else None), f"GPU {device_index}"
    if state is None:
        log.warning(
            "The checkpoint holds no CUDA RNG state for %s (it was saved by %d); CUDA random draws will differ "
            "from an uninterrupted run.", source, len(saved),
        )  # fmt: skip
        return
    set_state(state, device_index)


class FitReport(Callback):
    """Per validation epoch: the confusion matrix image and per-class F1 (multi-label: per-label average precision)
    in TensorBoard. At the end of fit: `training_curves.png` and `summary.json` in the run folder."""

    def __init__(self) -> None:
        self.history: list[dict[str, float]] = []  # one row of epoch-level train/ and val/ scalars per epoch
        self.seconds = 0.0  # fit time, validation included, over all sessions of a resumed run
        self.train_images = 0
        self.best: dict[str, float] | None = None  # the epoch and validation metrics (per class too) best.ckpt holds
        self._best_value: float | None = None  # the checkpoint's best score when `best` was taken
        self._validation: dict[str, float] | None = None  # the latest validation's, until the checkpoint judges it
        self._checkpoint: ModelCheckpoint | None = None
        self._confusion: MulticlassConfusionMatrix | None = None
        self._per_class: ClasswiseWrapper | None = None  # logs val/f1/<class> (multi-label: val/ap/<label>)
        self._started = self._validation_started = self._validation_seconds = 0.0
        self._session_images = 0
        self._epochs: list[tuple[float, int]] = []  # this session's (training seconds, images) per epoch
        self._epoch_started = 0.0
        self._epoch_images = 0

    def state_dict(self) -> dict[str, Any]:
        self._settle_best()  # best.ckpt is being written: it holds the validation just judged
        return {"history": self.history, "seconds": self.seconds, "train_images": self.train_images,
                "best": self.best, "best_value": self._best_value}  # fmt: skip

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = state_dict["history"]
        self.seconds = state_dict["seconds"]
        self.train_images = state_dict["train_images"]
        self.best, self._best_value = state_dict.get("best"), state_dict.get("best_value")

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._checkpoint = trainer.checkpoint_callback
        self._started = time.perf_counter()
        self._validation_seconds = 0.0
        self._session_images = 0
        classes = pl_module.class_names
        if pl_module.multilabel:
            self._confusion = None
            ap = MultilabelAveragePrecision(len(classes), average=None, validate_args=False)
            self._per_class = ClasswiseWrapper(ap, labels=list(classes), prefix="val/ap/").to(pl_module.device)
            return
        self._confusion = MulticlassConfusionMatrix(len(classes)).to(pl_module.device)
        f1 = MulticlassF1Score(len(classes), average=None, validate_args=False)
        self._per_class = ClasswiseWrapper(f1, labels=list(classes), prefix="val/f1/").to(pl_module.device)

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._epoch_started, self._epoch_images = time.perf_counter(), 0

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """The epoch's training and validation metrics are final here, before last.ckpt saves this history."""
        self._settle_best()
        self._record(trainer, trainer.current_epoch)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._session_images += len(batch[1])
        self._epoch_images += len(batch[1])
        if batch_idx + 1 == trainer.num_training_batches:  # the epoch's training ends here: no validation, no saving
            if pl_module.device.type == "cuda":
                torch.cuda.synchronize(pl_module.device)  # once an epoch, so the time covers the queued work
            self._epochs.append((time.perf_counter() - self._epoch_started, self._epoch_images))

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._validation_started = time.perf_counter()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            if self._confusion is None:  # multi-label: the scores themselves
                self._per_class.update(outputs, batch[1])
                return
            predicted = outputs.argmax(dim=-1)
            self._confusion.update(predicted, batch[1])
            self._per_class.update(predicted, batch[1])

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn != "fit" or trainer.sanity_checking:
            return
        pl_module.log_dict(self._per_class.compute(), sync_dist=False)  # already synced
        self._per_class.reset()
        if self._confusion is None:
            return
        matrix = self._confusion.compute().cpu().numpy()  # synced across ranks
        self._confusion.reset()
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                if isinstance(logger, TensorBoardLogger):
                    figure = confusion_matrix_figure(matrix, pl_module.class_names, normalize=True)
                    logger.experiment.add_figure("val/confusion_matrix", figure, trainer.current_epoch, close=False)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Runs before the checkpoint callback's (Lightning calls checkpoints last), which judges this validation."""
        if trainer.state.fn == "fit":  # the sanity check too: it is no training time either
            self._validation_seconds += time.perf_counter() - self._validation_started
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            metrics = trainer.callback_metrics.items()
            scalars = {name: float(value) for name, value in metrics if name.startswith("val/") and value.numel() == 1}
            self._validation = {"epoch": trainer.current_epoch, **scalars}

    def _settle_best(self) -> None:
        """Once the checkpoint callback has judged the latest validation: if best.ckpt changed, it holds that one
        (whichever metric it monitors, per class included, and at any `val_check_interval`)."""
        score = self._checkpoint.best_model_score if self._checkpoint is not None else None
        if score is None or self._validation is None:
            return
        if self._best_value is None or float(score) != self._best_value:
            self.best, self._best_value = self._validation, float(score)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._settle_best()
        elapsed = time.perf_counter() - self._started
        training_seconds = elapsed - self._validation_seconds
        self.seconds += elapsed
        self._count_every_rank(trainer)
        self.train_images += self._session_images
        log_dir = trainer.log_dir
        if log_dir is None or not trainer.is_global_zero:
            return
        run_dir = Path(log_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        save_figure(training_curves_figure(self.history), run_dir / "training_curves.png")
        checkpoint = trainer.checkpoint_callback
        summary = {
            "best_epoch": self.best_epoch,
            "monitor": checkpoint.monitor if checkpoint else None,
            "best_value": float(checkpoint.best_model_score)
            if checkpoint and checkpoint.best_model_score is not None
            else None,
            "best_checkpoint": checkpoint.best_model_path if checkpoint else None,
            "epochs": len(self.history),
            "wall_time_s": round(self.seconds, 3),
            "train_images": self.train_images,  # every rank's, over every session of a resumed run
            "train_images_per_s": round(self._session_images / max(training_seconds, 1e-9), 1),
            "steady_train_images_per_s": steady_throughput(self._epochs),
            "epoch_train_images_per_s": [round(images / max(seconds, 1e-9), 1) for seconds, images in self._epochs],
            "parameters": sum(p.numel() for p in pl_module.parameters()),
            "trainable_parameters": sum(p.numel() for p in pl_module.parameters() if p.requires_grad),
        }
        write_json(run_dir / "summary.json", summary)

    def _count_every_rank(self, trainer: Trainer) -> None:
        """The images of every rank, not this one's: a collective under DDP (each rank counted its own batches)."""
        if trainer.world_size == 1:
            return
        counts = torch.tensor([self._session_images, *(images for _, images in self._epochs)], dtype=torch.long)
        counts = trainer.strategy.reduce(counts.to(trainer.strategy.root_device), reduce_op="sum").cpu().tolist()
        self._session_images = counts[0]
        self._epochs = [(seconds, images) for (seconds, _), images in zip(self._epochs, counts[1:], strict=True)]

    def _record(self, trainer: Trainer, epoch: int) -> None:
        if epoch < 0 or any(row["epoch"] == epoch for row in self.history):
            return
        row = {
            name: float(value)
            for name, value in trainer.callback_metrics.items()
            if name.startswith(("train/", "val/")) and name.count("/") == 1 and value.numel() == 1
        }
        if row:
            self.history.append({"epoch": epoch, **row})

    @property
    def best_epoch(self) -> int | None:
        """The epoch of the validation best.ckpt holds; None before any."""
        return None if self.best is None else int(self.best["epoch"])


class EarlyStopping(early_stopping.EarlyStopping):
    """Lightning's early stopping, which says in one line when it stops a run and why; `patience: null` turns it off.

    Named as Lightning's, so that its state in checkpoints keeps Lightning's key.
    """

    def __init__(self, monitor: str, patience: int | None = 3, **kwargs: Any) -> None:
        """
        Args:
            monitor: The metric to watch (the CLI links it to --checkpoint.monitor).
            patience: Validations without improvement before training stops; null never stops.
        """
        super().__init__(monitor, patience=patience or 0, **kwargs)
        self.patience = patience
        self.best_epoch: int | None = None

    def _run_early_stopping_check(self, trainer: Trainer) -> None:
        if self.patience is None:
            return
        if not any(name.startswith("val/") for name in trainer.callback_metrics):  # e.g. max_steps ended the epoch
            return  # before its validation: nothing to judge yet (a misspelt monitor still fails after one)
        best, stopping = self.best_score, trainer.should_stop
        super()._run_early_stopping_check(trainer)
        if self.best_score is not best:  # improved, in this epoch
            self.best_epoch = trainer.current_epoch
        if not trainer.should_stop or stopping or not trainer.is_global_zero:
            return
        if self.stopping_reason == early_stopping.EarlyStoppingReason.PATIENCE_EXHAUSTED:
            reason = (
                f"{self.monitor} did not improve on its best, {float(self.best_score):.6g} at epoch {self.best_epoch}, "
                f"in {self.wait_count} validation{'s' * (self.wait_count != 1)} (--early_stopping.patience "
                f"{self.patience}; null turns it off)"
            )
        else:
            reason = (self.stopping_reason_message or "").removesuffix(" Signaling Trainer to stop.")
        log.info("Early stopping after epoch %d: %s", trainer.current_epoch, reason)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "best_epoch": self.best_epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Lightning's, but the patience stays this run's: a resumed run may change it, or turn it off."""
        patience = self.patience
        super().load_state_dict(state_dict)
        self.patience, self.best_epoch = patience, state_dict.get("best_epoch")


def steady_throughput(epochs: list[tuple[float, int]]) -> float | None:
    """Training images/s after the first epoch, which also pays for worker start-up, caching and compiling."""
    steady = epochs[1:]
    seconds = sum(seconds for seconds, _ in steady)
    return round(sum(images for _, images in steady) / seconds, 1) if steady and seconds > 0 else None
