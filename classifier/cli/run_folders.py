"""Where each run's folder goes: `version_N` for training runs, evaluations filed under the run of the checkpoint
they evaluate, lr_find and predictions in timestamped folders of their own."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

from jsonargparse import Namespace
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from classifier.training.tracking import FILE_LOGGERS, TENSORBOARD, evaluation_trackers


def logger_root(trainer: Namespace) -> Path | None:
    """The folder holding the logger's version_N run folders (of the first logger, in a list)."""
    logger = run_folder_logger(trainer.get("logger"))
    if logger in (None, True):
        return Path(trainer.get("default_root_dir") or ".") / "lightning_logs"
    if isinstance(logger, Namespace) and "save_dir" in logger.get("init_args", {}):
        return Path(logger.init_args.save_dir) / (logger.init_args.get("name") or "")
    return None


def run_folder_logger(logger: Any) -> Any:
    """The logger whose folder is the run folder: the first of a list (False for an empty one)."""
    return (logger[0] if logger else False) if isinstance(logger, list) else logger


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
        logger = run_folder_logger(loggers)
        if logger in (None, True):
            logger = config.trainer.logger = Namespace(class_path=TENSORBOARD, init_args=Namespace())
            logger.init_args.save_dir, logger.init_args.name = str(run.parent.parent), run.parent.name
        root = logger_root(config.trainer)
        if root is not None and root.resolve() == run.parent:
            logger.init_args.version = run.name  # where a recorded MLflow run continues too
        return
    logger = run_folder_logger(loggers)
    ours = logger in (None, True) or (isinstance(logger, Namespace) and logger.class_path.endswith(FILE_LOGGERS))
    if logger_given or not ours:
        return
    if isinstance(loggers, list):
        config.trainer.logger = evaluation_trackers(loggers, None if subcommand == "lr_find" else run)
    root = logger_root(config.trainer)
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
