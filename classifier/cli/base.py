"""The LightningCLI of `classifier fit|validate|test|predict|lr_find`, and the base of the commands that parse fit's
options (`cv`, `check-data`, `tune`): checkpoint-restored settings below the user's flags, `--ckpt_path last`, and
one-line parse errors."""

from __future__ import annotations

import difflib
import logging
import sys
from argparse import ArgumentError
from pathlib import Path
from typing import Any, NoReturn

import yaml
from jsonargparse import Namespace
from jsonargparse._common import debug_mode_active
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar, RichProgressBar
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI

from classifier.cli.resume import (
    EVALUATIONS,
    LIGHTNING_CHECKPOINT_NAMES,
    LINKS,
    check_resumable,
    checkpoint_settings,
    find_last_checkpoint,
)
from classifier.cli.run_folders import chooses_the_run_folder, place_logger
from classifier.core.console import debugging, parse_error_line
from classifier.core.errors import USAGE_ERROR
from classifier.data.datamodule import ImageFolderDataModule
from classifier.evaluation.predictions import PredictionWriter
from classifier.model.metrics import metric_mode
from classifier.model.module import ImageClassifier
from classifier.training.callbacks import EarlyStopping, FitReport, RNGStateCheckpoint
from classifier.training.faults import DivergenceGuard, LastCheckpoint
from classifier.training.hparams import ConfigLogger
from classifier.training.tracking import MLFlowLogger, run_folder_logger_first
from classifier.training.trainer import ClassifierTrainer

log = logging.getLogger(__name__)

# the trainer's methods each subcommand runs, with the arguments the parser leaves out: Lightning's four and lr_find
SUBCOMMANDS = {
    **LightningCLI.subcommands(),
    "lr_find": LightningCLI.subcommands()["fit"] - {"train_dataloaders", "val_dataloaders"},
}


class ClassifierArgumentParser(LightningArgumentParser):
    """Puts a parse error first, with the closest option names, instead of after a hundred lines of usage."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error or debug_mode_active():
            super().error(message, ex)
        if debugging():  # the command shows its traceback, and exits with USAGE_ERROR
            raise ArgumentError(None, message) from ex
        parser = getattr(ex, "subcommand_parser", None) or self
        options = [option for action in parser._actions for option in action.option_strings]
        line = f"error: {parse_error_line(message)}"
        for typo in (word.partition("=")[0].rstrip(":") for word in message.split() if word.startswith("--")):
            if typo not in options and (close := difflib.get_close_matches(typo, options, n=3, cutoff=0.75)):
                line += f" ({typo}: did you mean {' or '.join(close)}?)"
            elif typo in options and message.endswith("expected one argument"):
                line += f" (a value that starts with '-' goes as {typo}=VALUE)"
        sys.stderr.write(f"{line}\n`{parser.prog.replace(' [options]', '')} --help` lists every option.\n")
        self.exit(USAGE_ERROR)


SINGLE_LABEL_MONITOR = "val/f1_macro"  # the checkpoint's default monitor; val/map for multi-label data


class ClassifierCLI(LightningCLI):
    """LightningCLI for ImageClassifier on ImageFolderDataModule."""

    def __init__(self, args: ArgsType = None, run: bool = True) -> None:
        argv = sys.argv[1:] if args is None else args
        # the parser of the subcommand asked for alone: building all five costs about a second per command
        self.requested = argv[0] if isinstance(argv, list) and argv[:1] and argv[0] in SUBCOMMANDS else None
        super().__init__(
            ImageClassifier,
            ImageFolderDataModule,
            trainer_defaults={"callbacks": [RNGStateCheckpoint(), FitReport(), DivergenceGuard(), LastCheckpoint()]},
            save_config_callback=ConfigLogger,  # config.yaml, and the config as the loggers' hyperparameters
            save_config_kwargs={"overwrite": True},  # a resumed run writes into its old folder
            seed_everything_default=0,  # reproducible unless a config says otherwise; evaluation is seeded too
            auto_configure_optimizers=False,  # the model takes OptimizerCallable/LRSchedulerCallable itself
            trainer_class=ClassifierTrainer,
            parser_class=ClassifierArgumentParser,
            parser_kwargs={
                "prog": "classifier",
                "description": "Train, evaluate and use image classifiers: `classifier --help` lists every command.",
            },
            args=args,
            run=run,
        )

    def subcommands(self) -> dict[str, set[str]]:
        """The one on the command line, else all: Lightning's four and `lr_find`."""
        return {self.requested: SUBCOMMANDS[self.requested]} if self.requested else SUBCOMMANDS

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": SINGLE_LABEL_MONITOR,
                "checkpoint.mode": "max",
                "checkpoint.filename": "best",
            }
        )
        parser.add_lightning_class_args(EarlyStopping, "early_stopping")  # ours: says when it stops a run
        parser.set_defaults({"early_stopping.patience": 10})
        parser.link_arguments("checkpoint.monitor", "early_stopping.monitor")
        parser.link_arguments("checkpoint.mode", "early_stopping.mode")
        parser.add_lightning_class_args(PredictionWriter, "predictions")
        for source, target, apply_on in LINKS:
            parser.link_arguments(source, target, apply_on=apply_on)

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        """Parse; then, given a checkpoint, parse again on top of its model and data settings."""
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        trainer = (self.config[subcommand] if subcommand else self.config).trainer
        trainer.logger = run_folder_logger_first(trainer.get("logger"), trainer.get("default_root_dir"))
        if subcommand is None or isinstance(args, (dict, Namespace)):
            return
        config = self.config[subcommand]
        ckpt_path = config.get("ckpt_path")
        if subcommand in EVALUATIONS and (not ckpt_path or ckpt_path in LIGHTNING_CHECKPOINT_NAMES):
            self._subcommand_parsers[subcommand].error(
                f"classifier {subcommand} needs --ckpt_path FILE, the checkpoint to evaluate (such as "
                "lightning_logs/<name>/version_N/checkpoints/best.ckpt): a model that was never trained only guesses"
            )
        if subcommand == "fit" and ckpt_path == "last":
            ckpt_path = config.ckpt_path = find_last_checkpoint(config)
        argv = list(sys.argv[1:] if args is None else args)
        logger_given = any(chooses_the_run_folder(token) for token in argv)
        if not ckpt_path or ckpt_path in LIGHTNING_CHECKPOINT_NAMES:
            place_logger(config, subcommand, None, logger_given)
            return
        if not Path(ckpt_path).is_file():
            raise FileNotFoundError(f"--ckpt_path {ckpt_path} does not exist")
        at = argv.index(subcommand) + 1
        argv[at:at] = [f"--{key}={yaml.safe_dump(value)}" for key, value in checkpoint_settings(ckpt_path).items()]
        self.config = parser.parse_args(argv)
        config = self.config[subcommand]
        config.trainer.logger = run_folder_logger_first(config.trainer.get("logger"), config.trainer.default_root_dir)
        config.ckpt_path = str(ckpt_path)
        check_resumable(config, subcommand, Path(ckpt_path))
        if config.weights_only is None:  # Lightning's default would load any pickle, and say so
            config.weights_only = True
        place_logger(config, subcommand, Path(ckpt_path), logger_given)

    def before_instantiate_classes(self) -> None:
        """`--checkpoint.every_n_train_steps` and `train_time_interval` write `last.ckpt` inside epochs, to resume
        long epochs from; `best.ckpt` is still chosen at validations, the only time its monitor changes. Multi-label
        data is monitored by val/map where single-label's default, val/f1_macro, is set."""
        config = self.config.get(self.subcommand) or {}
        best = config.get("checkpoint")
        data = config.get("data") or {}
        if best and best.monitor == SINGLE_LABEL_MONITOR and (data.get("label_delimiter") or data.get("label_columns")):
            best.monitor = config.early_stopping.monitor = "val/map"
            log.info("multi-label data: checkpoints and early stopping monitor val/map (--checkpoint.monitor)")
        if best and (mode := metric_mode(best.monitor)) not in (None, best.mode):
            log.info("--checkpoint.monitor %s is better %s: checkpoints and early stopping keep its %s (mode %s, "
                     "not %s)", best.monitor, *(("lower", "lowest") if mode == "min" else ("higher", "highest")),
                     mode, best.mode)  # fmt: skip
            best.mode = config.early_stopping.mode = mode
        if not best or (best.every_n_train_steps is None and best.train_time_interval is None):
            return
        intervals = {"every_n_train_steps": best.every_n_train_steps, "train_time_interval": best.train_time_interval}
        best.every_n_train_steps = best.train_time_interval = None
        callbacks = self.trainer_defaults["callbacks"]
        callbacks[:] = [LastCheckpoint(**intervals) if isinstance(c, LastCheckpoint) else c for c in callbacks]

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """Lightning's trainer, with a progress bar that reads the logged loss back from the device every 10 steps
        rather than every step (its default), unless the config brings its own bar or turns bars off."""
        config = self._get(self.config_init, "trainer", default={})
        callbacks = list(kwargs.get("callbacks", config.get("callbacks") or []))
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
            kwargs["callbacks"] = [*callbacks, RichProgressBar(refresh_rate=10)]
        trainer = super().instantiate_trainer(**kwargs)
        for logger in trainer.loggers:
            if isinstance(logger, MLFlowLogger):  # named after the first logger's run folder; its store checked now
                logger.follow(trainer)
        return trainer

    def _parse_ckpt_path(self) -> None:
        """Done in `parse_arguments`, for the datamodule too and below command-line flags."""

    def before_fit(self) -> None:
        """Resume, validate, test and predict with the split and the preprocessing recorded in --ckpt_path, not
        those of the folder and the installed timm as they are now.

        Lightning calls the datamodule's setup before it restores the datamodule's state from the checkpoint, and
        `trainer.ckpt_path` is still unset then, so the datamodule is told which file to read them from.
        """
        ckpt_path = self.config_init[self.subcommand].get("ckpt_path")
        if ckpt_path and Path(ckpt_path).is_file():
            self.datamodule.use_checkpoint(Path(ckpt_path))

    before_validate = before_test = before_predict = before_fit

    def after_fit(self) -> None:
        checkpoint = self.trainer.checkpoint_callback
        if self.trainer.is_global_zero and checkpoint is not None and checkpoint.best_model_path:
            score = checkpoint.best_model_score
            log.info(
                "Best checkpoint (%s = %.4f): %s\nEvaluate it with: classifier test --ckpt_path %s",
                checkpoint.monitor,
                float(score) if score is not None else float("nan"),
                checkpoint.best_model_path,
                checkpoint.best_model_path,
            )


class ParsedCLI(ClassifierCLI):
    """fit's options parsed, and only the datamodule built: the data as fit would see it, for `check-data` (the
    model would need the class list, which a split that cannot be made does not give), `cv` and `tune`."""

    def instantiate_classes(self) -> None:
        self.datamodule = ImageFolderDataModule(**self.config.data.as_dict())
