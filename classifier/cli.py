"""`classifier fit|validate|test|predict|lr_find`: LightningCLI, checkpoint-restored settings, `--ckpt_path last`,
and where each run's folder goes."""

from __future__ import annotations

import difflib
import logging
import os
import signal
import sys
from argparse import ArgumentError
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

import yaml
from jsonargparse import Namespace
from jsonargparse._common import debug_mode_active
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar, RichProgressBar
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from classifier.atomic import DiskFullError
from classifier.calibrate import calibrate
from classifier.callbacks import EarlyStopping, FitReport, RNGStateCheckpoint
from classifier.check_data import DataCheckFailed, check_data
from classifier.checkpoints import MACHINE_SETTINGS, read_checkpoint
from classifier.console import (
    DEBUG_ENV,
    USAGE_ERROR,
    ExitCodes,
    configure_logging,
    debugging,
    exit_codes,
    parse_error_line,
    quiet_third_party,
    without_debug_flags,
)
from classifier.cv import cross_validate
from classifier.data import ImageFolderDataModule
from classifier.evaluation import PredictionWriter
from classifier.faults import DivergenceGuard, LastCheckpoint, PeerRankFailed, TrainingDiverged, TrialsFailed, lost_peer
from classifier.hparams import ConfigLogger
from classifier.module import ImageClassifier
from classifier.runs import list_runs
from classifier.tracking import FILE_LOGGERS, TENSORBOARD, MLFlowLogger, evaluation_trackers, run_folder_logger_first
from classifier.trainer import ClassifierTrainer

log = logging.getLogger(__name__)

# (source, target, when): the model and the data agree on these, so no config repeats them
LINKS = (
    ("model.backbone", "data.backbone", "parse"),
    ("data.image_size", "model.image_size", "parse"),
    ("data.class_names", "model.class_names", "instantiate"),
    ("data.preprocessing", "model.preprocessing", "instantiate"),
)
# settings of evaluation, which a run may change between sessions; every other model and data setting (the batch
# size too: it sets the steps per epoch and the schedule) defines the run that `--ckpt_path last` finds
EVAL_SETTINGS = frozenset({"model.tta"})
EVALUATIONS = ("validate", "test", "predict")
# what a checkpoint's weights were built for: with another value they cannot load, or would mean another model
NETWORK_SETTINGS = ("model.backbone", "data.image_size", "data.classes", "model.head_hidden_dims")
# Lightning's names for a checkpoint its own trainer made or finds: none exists in a fresh evaluation process
LIGHTNING_CHECKPOINT_NAMES = ("best", "last", "hpc", "registry")
# what a user can fix: the command prints their message on one line, and the traceback with --debug
# the modules of each optional extra: a command that misses one says which extra to install
EXTRAS = {
    "export": ("onnx", "onnxruntime", "onnxscript"),
    "explain": ("pytorch_grad_cam",),
    "tune": ("optuna",),
    "mlflow": ("mlflow",),
}


class MissingExtra(ModuleNotFoundError):
    """An optional dependency is not installed."""


USER_ERRORS = (OSError, ValueError, MisconfigurationException, ArgumentError, MissingExtra)
# the exit status of each kind of error, first match first; any error not listed is a bug and keeps its traceback
# (Python's status 1). An error without a message ends the command silently: SIGTERM's run has said what it saved.
EXIT_CODES: ExitCodes = (
    (SIGTERMException, 128 + signal.SIGTERM),  # preempted: last.ckpt saved, `--ckpt_path last` resumes
    # faults of the run or of the data (check-data --strict), not mistakes in what the user gave the command
    ((DiskFullError, TrainingDiverged, PeerRankFailed, DataCheckFailed, TrialsFailed), 1),
    (USER_ERRORS, USAGE_ERROR),  # a mistake in the options, the config or the input files, as the parser's own
)
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
                "description": "Train, evaluate and use image classifiers. Also: `classifier cv --config X "
                "--data.num_folds K` cross-validates (see `classifier cv --help`); `classifier check-data --config "
                "X` audits the data before a run (see `classifier check-data --help`); `classifier runs [DIR]` lists "
                "the training runs under DIR (default lightning_logs); `classifier calibrate --ckpt_path X` fits a "
                "temperature that calibrates X's probabilities; `classifier export --ckpt_path X` exports a "
                "checkpoint (see `classifier export --help`); `classifier serve --model X` serves a checkpoint or an "
                "ONNX file over HTTP (see `classifier serve --help`); `classifier explain --ckpt_path X` draws where X "
                "looks (class activation maps), or with --embeddings maps its penultimate features (see `classifier "
                "explain --help`); `classifier tune --config X --search S --trials N` searches fit's options with "
                "Optuna (see `classifier tune --help`). A second `--config configs/loggers/mlflow.yaml` also tracks a "
                "run in MLflow. Add --debug anywhere for every warning and the traceback of an error.",
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
                "checkpoint.monitor": "val/f1_macro",
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
        long epochs from; `best.ckpt` is still chosen at validations, the only time its monitor changes."""
        config = self.config.get(self.subcommand) or {}
        best = config.get("checkpoint")
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


def checkpoint_settings(ckpt_path: str | Path) -> dict[str, dict[str, Any]]:
    """The model and data arguments a checkpoint was trained with, less those that links derive and those of the
    machine it ran on (a checkpoint trained with `--data.decode gpu` tests on a CPU)."""
    checkpoint = read_checkpoint(ckpt_path)
    derived = {target for _, target, _ in LINKS}
    settings = {}
    for group, key in (("model", "hyper_parameters"), ("data", "datamodule_hyper_parameters")):
        hparams = checkpoint.get(key) or {}
        settings[group] = {
            name: value
            for name, value in hparams.items()
            if not name.startswith("_") and f"{group}.{name}" not in derived | MACHINE_SETTINGS
        }
    return {group: values for group, values in settings.items() if values}


def _logger_root(trainer: Namespace) -> Path | None:
    """The folder holding the logger's version_N run folders (of the first logger, in a list)."""
    logger = _run_folder_logger(trainer.get("logger"))
    if logger in (None, True):
        return Path(trainer.get("default_root_dir") or ".") / "lightning_logs"
    if isinstance(logger, Namespace) and "save_dir" in logger.get("init_args", {}):
        return Path(logger.init_args.save_dir) / (logger.init_args.get("name") or "")
    return None


def _run_folder_logger(logger: Any) -> Any:
    """The logger whose folder is the run folder: the first of a list (False for an empty one)."""
    return (logger[0] if logger else False) if isinstance(logger, list) else logger


def _plain(value: Any) -> Any:
    """Parsed and checkpointed values in one form: dicts for namespaces, lists for tuples."""
    if isinstance(value, Namespace):
        value = value.as_dict()
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def run_differences(config: Namespace, ckpt_path: Path) -> dict[str, tuple[Any, Any]]:
    """`{setting: (this config's value, the checkpoint's)}` for each run-defining setting where they differ."""
    differences = {}
    for group, saved in checkpoint_settings(ckpt_path).items():
        for name, theirs in saved.items():
            key = f"{group}.{name}"
            if key in EVAL_SETTINGS or name not in config[group]:
                continue
            mine = config[group][name]
            if key == "data.classes" and mine is None:  # fit fills it in from the folders
                continue
            if _plain(mine) != _plain(theirs):
                differences[key] = (mine, theirs)
    return differences


class ParsedCLI(ClassifierCLI):
    """fit's options parsed, and only the datamodule built: the data as fit would see it, for `check-data` (the
    model would need the class list, which a split that cannot be made does not give), `cv` and `tune`."""

    def instantiate_classes(self) -> None:
        self.datamodule = ImageFolderDataModule(**self.config.data.as_dict())


def check_resumable(config: Namespace, subcommand: str, ckpt_path: Path) -> None:
    """Refuse, before any training, settings given on top of a checkpoint that its weights cannot take; say which
    other settings a resumed fit changes."""
    differences = run_differences(config, ckpt_path)
    shown = {key: f"{key} {theirs!r} there, {mine!r} here" for key, (mine, theirs) in differences.items()}
    refused = [shown[key] for key in NETWORK_SETTINGS if key in differences]
    if refused:
        raise ValueError(
            f"--ckpt_path {ckpt_path} was trained with other settings: {'; '.join(refused)}. Its weights fit only "
            f"its own: drop these options (the checkpoint brings its settings), or train a new run without "
            "--ckpt_path"
        )
    if subcommand == "fit" and differences:
        log.warning("Resuming %s with changed settings: %s", ckpt_path, "; ".join(shown.values()))


def find_last_checkpoint(config: Namespace) -> Path | None:
    """The newest `last.ckpt` of this config's runs: those with its model and data settings, fold included.

    Without one, a run of another fold of the same cross-validation means a fresh start; other runs, an error.
    """
    root = _logger_root(config.trainer)
    if root is None:
        raise ValueError("--ckpt_path last needs a TensorBoard or CSV logger, to find the runs of this config")
    found = sorted(root.glob("version_*/checkpoints/last.ckpt"), key=lambda path: path.stat().st_mtime, reverse=True)
    if not found:
        log.warning("--ckpt_path last: no earlier run with a last.ckpt; training from scratch.")
        return None
    differences = {path: run_differences(config, path) for path in found}
    matching = [path for path in found if not differences[path]]
    if matching:
        return matching[0]
    if any(set(differing) == {"data.fold"} for differing in differences.values()):
        log.warning("--ckpt_path last: other folds have runs, fold %s none; training from scratch.", config.data.fold)
        return None
    newest = found[0]
    listed = ", ".join(
        f"{key} ({mine!r} here, {theirs!r} there)" for key, (mine, theirs) in differences[newest].items()
    )
    raise ValueError(
        f"--ckpt_path last: none of the {len(found)} runs under {root} has this config's settings; the newest, "
        f"{newest}, differs in {listed}. To continue it with these settings, pass --ckpt_path {newest}; to start a "
        "new run, give this config its own logger name or save_dir."
    )


def chooses_the_run_folder(token: str) -> bool:
    """Whether a command-line token names a logger, or its folder: the run's placement is then the user's (an
    option of the configured loggers, such as MLflow's `--trainer.logger.tracking_uri`, is not)."""
    name = token.partition("=")[0]
    if name in ("--trainer.logger", "--trainer.logger+"):
        return True
    return name.startswith("--trainer.logger.") and name.rpartition(".")[2] in ("save_dir", "name", "version")


def place_logger(config: Namespace, subcommand: str, ckpt_path: Path | None, logger_given: bool) -> None:
    """Resume into the checkpoint's run folder; file validate, test and predict under the run of the checkpoint they
    evaluate, and lr_find under `lr_find/`, so that every `version_N` is a training run.

    A logger named on the command line (`--trainer.logger...`) wins; so does one that is not TensorBoard's or CSV's.
    A resumed fit continues the MLflow run its folder recorded (`tracking.RUN_FILE`); an evaluation adds to it, and
    without one, or for lr_find, logs to no MLflow run.
    """
    run = ckpt_path.resolve().parent.parent if ckpt_path and ckpt_path.resolve().parent.name == "checkpoints" else None
    loggers = config.trainer.get("logger")
    if subcommand == "fit":
        if run is None:
            return
        logger = _run_folder_logger(loggers)
        if logger in (None, True):
            logger = config.trainer.logger = Namespace(class_path=TENSORBOARD, init_args=Namespace())
            logger.init_args.save_dir, logger.init_args.name = str(run.parent.parent), run.parent.name
        root = _logger_root(config.trainer)
        if root is not None and root.resolve() == run.parent:
            logger.init_args.version = run.name  # where a recorded MLflow run continues too
        return
    logger = _run_folder_logger(loggers)
    ours = logger in (None, True) or (isinstance(logger, Namespace) and logger.class_path.endswith(FILE_LOGGERS))
    if logger_given or not ours:
        return
    if isinstance(loggers, list):
        config.trainer.logger = evaluation_trackers(loggers, None if subcommand == "lr_find" else run)
    root = _logger_root(config.trainer)
    if subcommand == "lr_find":
        folder = new_timestamped_dir(root / "lr_find")
    elif ckpt_path is None:  # nothing to file it under
        return
    else:  # a checkpoint outside a run folder (copied elsewhere) gets one folder per file name
        evaluated = run if run is not None else root / "evaluations" / ckpt_path.stem
        folder = new_timestamped_dir(evaluated / "predict") if subcommand == "predict" else evaluated / subcommand
    if logger in (None, True):
        logger = config.trainer.logger = Namespace(class_path=TENSORBOARD, init_args=Namespace())
    logger.init_args.save_dir, logger.init_args.name = str(folder.parent.parent), folder.parent.name
    logger.init_args.version = folder.name


def new_timestamped_dir(parent: Path) -> Path:
    """`parent/YYYYmmdd-HHMMSS`, with `-2`, `-3`... for runs started within the same second; made by rank 0 only,
    whose folder the other ranks' trainers take."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    for attempt in range(1, 1000):
        folder = parent / (stamp if attempt == 1 else f"{stamp}-{attempt}")
        if rank_zero_only.rank != 0:
            return folder
        try:
            folder.mkdir(parents=True)
            return folder
        except FileExistsError:
            continue
    raise FileExistsError(f"{parent}: 999 runs started in the second {stamp}")


@contextmanager
def naming_extras() -> Iterator[None]:
    """A module of an extra that is not installed ends the command with the install line, not a traceback."""
    try:
        yield
    except ModuleNotFoundError as error:
        root = (error.name or "").partition(".")[0]
        extra = next((extra for extra, modules in EXTRAS.items() if root in modules), None)
        if extra is None:
            raise
        raise MissingExtra(f"{root} is not installed: pip install 'classifier[{extra}]'", name=error.name) from error


def cli_main(args: ArgsType = None) -> None:
    """The `classifier` command's work; `args` lets tests drive it without a subprocess. Errors propagate."""
    configure_logging()
    with naming_extras():
        run_command(args)


def run_command(args: ArgsType) -> None:
    """The subcommand `args` (or the command line) names."""
    argv = sys.argv[1:] if args is None else args
    if isinstance(argv, list) and argv[:1] == ["cv"]:  # a loop over fit, so not a LightningCLI subcommand
        cross_validate(argv[1:])
    elif isinstance(argv, list) and argv[:1] == ["check-data"]:  # reads the data fit would, trains nothing
        check_data(argv[1:])
    elif isinstance(argv, list) and argv[:1] == ["runs"]:  # reads run folders, runs no trainer
        list_runs(argv[1:])
    elif isinstance(argv, list) and argv[:1] == ["calibrate"]:  # fits one number on saved logits, no trainer
        calibrate(argv[1:])
    elif isinstance(argv, list) and argv[:1] == ["export"]:  # a checkpoint to ONNX & co., runs no trainer
        from classifier.export import export_command  # onnx and onnxruntime: the [export] extra

        export_command(argv[1:])
    elif isinstance(argv, list) and argv[:1] == ["explain"]:  # a checkpoint's maps and features, runs no trainer
        from classifier.explain import explain  # grad-cam: the [explain] extra

        explain(argv[1:])
    elif isinstance(argv, list) and argv[:1] == ["tune"]:  # a loop over fit, so not a LightningCLI subcommand
        from classifier.tune import tune  # optuna: the [tune] extra

        tune(argv[1:])
    else:
        try:
            ClassifierCLI(args=args)
        except RuntimeError as error:  # a collective that lost its peer says so in gloo's or NCCL's words
            peer = lost_peer(error)
            if peer is None:
                raise
            raise peer from error


def main(args: list[str] | None = None) -> None:
    """Entry point of the `classifier` command: third-party noise hidden and a user's error on one line with its exit
    status (`EXIT_CODES`), unless `--debug`/`--verbose` (anywhere on the line) or CLASSIFIER_DEBUG=1 asks for every
    warning and the traceback."""
    argv = list(sys.argv[1:] if args is None else args)
    debug, argv = debugging(argv), without_debug_flags(argv)
    if args is None:  # LightningCLI reads sys.argv itself, and warns when given the same arguments
        sys.argv[1:], argv = argv, None
    debug_env = os.environ.get(DEBUG_ENV)
    if debug:  # the parser's errors too, here and in the processes a run starts
        os.environ[DEBUG_ENV] = "1"
    try:
        with exit_codes(EXIT_CODES, debug), quiet_third_party(debug):
            cli_main(argv)
    finally:
        if debug_env is None:
            os.environ.pop(DEBUG_ENV, None)
