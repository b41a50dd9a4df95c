"""One trial of `classifier tune`: a `classifier fit` in this process, in its own run folder, with a callback that
reports its validation metric to Optuna and stops it when the study's pruner says so."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import optuna
import yaml
from jsonargparse import Namespace
from lightning.pytorch import Callback, LightningModule, Trainer

from classifier.cli.base import ClassifierCLI
from classifier.core.config import plain
from classifier.training.tracking import TENSORBOARD, file_loggers, tracking_uri

log = logging.getLogger(__name__)


class TrialPruning(Callback):
    """Reports the metric to the Optuna trial after each validation (the sanity check aside) and, when the study's
    pruner says so, stops the fit; the study then records the trial as pruned.

    At `on_validation_end`, after every `on_validation_epoch_end`: FitReport logs `val/f1/<class>` in its own, and
    Lightning's ModelCheckpoint and EarlyStopping read the epoch's metrics here too. Steps count validations, which
    are epochs unless --trainer.val_check_interval validates more often.
    """

    def __init__(self, trial: optuna.Trial, metric: str) -> None:
        self.trial = trial
        self.metric = metric
        self.values: list[float] = []
        self.pruned = False

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        if self.metric not in trainer.callback_metrics:
            logged = sorted(name for name in trainer.callback_metrics if name.startswith("val/"))
            raise ValueError(f"--metric {self.metric} was not logged; this run logs {', '.join(logged)}")
        self.values.append(float(trainer.callback_metrics[self.metric]))
        self.trial.report(self.values[-1], step=len(self.values) - 1)
        if self.trial.should_prune():
            self.pruned = trainer.should_stop = True
            log.info("Trial %d pruned after validation %d", self.trial.number, len(self.values) - 1)


class TrialCLI(ClassifierCLI):
    """`classifier fit`, with the trial's pruning callback."""

    def __init__(self, args: list[str], pruning: TrialPruning) -> None:
        self.pruning = pruning
        super().__init__(args=args)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        configured = self._get(self.config_init, "trainer", default={}).get("callbacks") or []
        kwargs["callbacks"] = [*kwargs.get("callbacks", configured), self.pruning]
        return super().instantiate_trainer(**kwargs)

    def after_fit(self) -> None:
        """fit's closing lines name the trial's checkpoint; the study logs the trial's value instead."""


def trial_value(trainer: Trainer, pruning: TrialPruning, metric: str, direction: optuna.study.StudyDirection) -> float:
    """The trial's score: its best checkpoint's when the checkpoint monitors the metric, else the best reported."""
    checkpoint = trainer.checkpoint_callback
    if checkpoint is not None and checkpoint.monitor == metric and checkpoint.best_model_score is not None:
        return float(checkpoint.best_model_score)
    if not pruning.values:
        raise ValueError(f"the trial never validated, so it has no {metric} (--trainer.limit_val_batches?)")
    return (max if direction == optuna.study.StudyDirection.MAXIMIZE else min)(pruning.values)


def check_one_process(trainer: Namespace) -> None:
    """Trials run in this process, one after another: a trainer on several devices would start processes that each
    run the whole study again."""
    devices, launched = trainer.devices, int(os.environ.get("WORLD_SIZE", "1"))
    if isinstance(devices, (list, tuple)) or "," in str(devices):  # device indices: [0] or "0,"
        one = len(devices if isinstance(devices, (list, tuple)) else str(devices).strip(",").split(",")) == 1
    else:  # a count
        one = devices in (1, "1", "auto")
    if launched > 1 or trainer.num_nodes != 1 or not one:
        raise ValueError(
            f"classifier tune trains each trial in this one process (a DDP trial would run the study in every rank): "
            f"--trainer.devices {devices} --trainer.num_nodes {trainer.num_nodes}{' under a launcher' * (launched > 1)}"
            " need --trainer.devices 1 (auto takes one); best.yaml keeps yours for the final fit"
        )


def logger_place(trainer: Namespace) -> tuple[str, str]:
    """(save_dir, name) of the config's first TensorBoard or CSV logger; Lightning's default logger's otherwise."""
    files = file_loggers(_loggers(trainer.logger))
    if files:
        args = files[0].get("init_args") or {}
        return str(args.get("save_dir") or "."), args.get("name") or "lightning_logs"
    return trainer.default_root_dir or ".", "lightning_logs"


def _loggers(logger: Any) -> list[dict[str, Any]]:
    """The config's loggers as plain dicts: none for `true`, `false` or null."""
    if not isinstance(logger, (Namespace, list, tuple)):
        return []
    return [plain(item) for item in (logger if isinstance(logger, (list, tuple)) else [logger])]


def trial_trainer(trainer: Namespace, run: Path) -> str:
    """A --config (YAML) that puts the trial's run folder at `run`: the config's first TensorBoard or CSV logger
    goes there, the others (such as MLflow's) stay; without one, a TensorBoard logger. `--trainer.devices auto`
    takes one device."""
    place = {"save_dir": str(run.parent.parent), "name": run.parent.name, "version": run.name}
    loggers = _loggers(trainer.logger)
    files = file_loggers(loggers)
    if files:
        files[0].setdefault("init_args", {}).update(place)
    else:
        loggers.insert(0, {"class_path": TENSORBOARD, "init_args": place})
    study, save_dir = run.parents[2].name, run.parents[3]
    for logger in loggers:
        if logger["class_path"].endswith("MLFlowLogger"):  # the study's experiment, in the store of the user's fits
            args = logger.setdefault("init_args", {})
            args["experiment_name"] = args.get("experiment_name") or f"{study}-tune"
            args["tracking_uri"] = tracking_uri(args.get("tracking_uri"), None, save_dir)[0]
    settings = {"logger": loggers[0] if len(loggers) == 1 else loggers}
    if trainer.devices == "auto":
        settings["devices"] = 1
    return yaml.safe_dump({"trainer": settings})
