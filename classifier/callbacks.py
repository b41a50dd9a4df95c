"""Callbacks the CLI always adds: exact resume, and the files that validate/test/predict leave behind."""

from __future__ import annotations

import csv
import json
import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor

log = logging.getLogger(__name__)


class RNGStateCheckpoint(Callback):
    """Saves and restores the torch, CUDA, numpy and Python RNGs; Lightning does not, so resumes would diverge."""

    def state_dict(self) -> dict[str, Any]:
        name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
        state = {
            "torch": torch.get_rng_state(),
            "python": random.getstate(),
            # as a tensor: numpy arrays would make the checkpoint fail torch.load(weights_only=True)
            "numpy": (name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached_gaussian),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        torch.set_rng_state(state_dict["torch"])
        random.setstate(state_dict["python"])
        name, keys, position, has_gauss, cached_gaussian = state_dict["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian))
        if "cuda" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda"])


class PredictionWriter(Callback):
    """Writes `predictions.csv` for validate, test and predict, and `metrics.json` for validate and test."""

    def __init__(self, output: str | None = None) -> None:
        """
        Args:
            output: Where predictions.csv goes; by default into the run folder.
        """
        self.output = output
        self._outputs: list[tuple[Tensor, Tensor, Tensor]] = []

    def _collect(self, trainer: Trainer, logits: Tensor, batch: Any) -> None:
        if trainer.sanity_checking:
            return
        _, targets, rows = batch
        self._outputs.append((rows.cpu(), targets.cpu(), logits.float().softmax(dim=-1).cpu()))

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if trainer.state.fn == "validate":
            self._collect(trainer, outputs, batch)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._collect(trainer, outputs, batch)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._collect(trainer, outputs, batch)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn == "validate":
            self._write(trainer, pl_module, "val")

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._write(trainer, pl_module, "test")

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._write(trainer, pl_module, "predict")

    def _write(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        rows, targets, probs = _gather(self._outputs)
        self._outputs = []
        run_dir = Path(trainer.log_dir or trainer.default_root_dir)  # a collective under DDP: every rank asks
        if not trainer.is_global_zero:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        output = Path(self.output) if self.output else run_dir / "predictions.csv"
        paths = [trainer.datamodule.paths(stage)[row] for row in rows.tolist()]
        write_predictions(output, paths, targets if stage != "predict" else None, probs, pl_module.class_names)
        log.info("Predictions for %d images: %s", len(paths), output)
        if stage != "predict":
            metrics = {k: float(v) for k, v in sorted(trainer.callback_metrics.items()) if k.startswith(f"{stage}/")}
            (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
            log.info("Metrics: %s", run_dir / "metrics.json")


def write_predictions(
    output: Path, paths: list[Path], targets: Tensor | None, probs: Tensor, classes: list[str]
) -> None:
    """`path,[target,]prediction,confidence` per image, with class names rather than indices."""
    confidence, predicted = probs.max(dim=-1)
    output.parent.mkdir(parents=True, exist_ok=True)
    with open(output, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["path"] + (["target"] if targets is not None else []) + ["prediction", "confidence"])
        for i, path in enumerate(paths):
            target = [classes[targets[i]]] if targets is not None else []
            writer.writerow([str(path), *target, classes[predicted[i]], f"{confidence[i]:.6f}"])


def _gather(outputs: list[tuple[Tensor, Tensor, Tensor]]) -> tuple[Tensor, Tensor, Tensor]:
    """Every rank's (rows, targets, probabilities), concatenated and ordered by row."""
    local = [torch.cat(parts) for parts in zip(*outputs, strict=True)] if outputs else None
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        everyone: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(everyone, local)
        parts = [part for part in everyone if part is not None]
        local = [torch.cat(column) for column in zip(*parts, strict=True)] if parts else None
    if local is None:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), torch.zeros(0, 0)
    order = local[0].argsort()
    return local[0][order], local[1][order], local[2][order]
