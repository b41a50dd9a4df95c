"""A run's hyperparameters where runs are compared: the CLI's whole config, flattened, as the MLflow run's params when
fit starts, and in TensorBoard's HPARAMS tab with the best epoch's validation metrics when it ends."""

from __future__ import annotations

from typing import Any

from jsonargparse import Namespace
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import MLFlowLogger, TensorBoardLogger

from classifier.core.config import flatten
from classifier.training import tracking
from classifier.training.callbacks import FitReport

# per-session settings, not the run's: the config files' paths and the checkpoint a session resumes from
SESSION_KEYS = ("config", "ckpt_path")
HP_PREFIX = "hp/best_"


class ConfigLogger(SaveConfigCallback):
    """Lightning's config.yaml writer, which also hands the config to the loggers: MLflow's params at the start of
    fit; at its end TensorBoard's HPARAMS (without Lightning's placeholder `hp_metric = -1`) and MLflow's metrics
    `hp/best_<val metric>`, the validation metrics of the epoch that best.ckpt holds, and `hp/best_epoch`."""

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger._default_hp_metric = False  # Lightning's placeholder: the end of fit logs the real metrics
        super().setup(trainer, pl_module, stage)

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":  # an evaluation adds its metrics to the run of its checkpoint, whose config this is not
            return
        for logger in trainer.loggers:
            if isinstance(logger, tracking.MLFlowLogger):
                logger.log_config(flat_config(self.config))

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        metrics = best_metrics(trainer)
        if not trainer.is_global_zero or not metrics:
            return
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.log_hyperparams(flat_config(self.config), metrics)
            elif isinstance(logger, MLFlowLogger):
                logger.log_metrics(metrics, step=trainer.global_step)


def flat_config(config: Namespace) -> dict[str, Any]:
    """`{"model.backbone": "resnet18", ...}`: every setting of the run, lists of classes (callbacks, loggers) by index
    (`trainer.callbacks.0.class_path`), without the per-session SESSION_KEYS."""
    flat = flatten({key: value for key, value in config.as_dict().items() if key not in SESSION_KEYS})
    return {key: value for key, value in flat.items() if "__path__" not in key}


def best_metrics(trainer: Trainer) -> dict[str, float]:
    """`hp/best_val_<name>`: the validation metrics best.ckpt holds (per class only the monitor), with
    `hp/best_epoch`; {} without."""
    report = next((callback for callback in trainer.callbacks if isinstance(callback, FitReport)), None)
    if report is None or report.best is None:
        return {}
    monitor = trainer.checkpoint_callback.monitor if trainer.checkpoint_callback else None
    # the best row holds its epoch and the validation's metrics, per class too
    values = {f"{HP_PREFIX}{name.replace('/', '_')}": value for name, value in report.best.items()
              if name.count("/") == 1 or name == monitor}  # fmt: skip
    return {f"{HP_PREFIX}epoch": report.best_epoch, **values}
