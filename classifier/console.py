"""What the `classifier` command shows: its own log lines, one-line errors, and no third-party noise unless verbose."""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from collections.abc import Iterator

VERBOSE_FLAG = "--verbose"
# Lightning's and torch's messages that every run repeats and that ask nothing of the user
NOISY_WARNINGS = (
    r".*isinstance\(treespec, LeafSpec\)` is deprecated",  # Lightning 2.6 on torch >= 2.10, fixed upstream
    r"The dirpath has changed from",  # evaluating a checkpoint: its ModelCheckpoint state names the training run
    r"The number of training batches \(\d+\) is smaller than the logging interval",  # small folders; epoch logs stay
    r"The '\w+' does not have many workers",  # a config's num_workers is a choice (0 for the in-memory digits)
    # Lightning looks for a loader with state_dict(); the datamodule's sampler resumes inside the epoch itself
    r"You're resuming from a checkpoint that ended before the epoch ended",
)
NOISY_LOGS = re.compile(
    r"💡 Tip:"  # advertisements for Lightning's cloud services
    r"|Loading `train_dataloader` to estimate number of stepping batches"  # the schedule's length, on every fit
    r"|Restor\w* (all )?states from the checkpoint (path )?at .*\.lr_find_"  # lr_find's own temporary checkpoint
    r"|`weights_only` was not set"  # the same file reloaded; the command loads checkpoints with weights_only=True
)
LIGHTNING_LOGGERS = (
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
    "lightning.pytorch.trainer.connectors.checkpoint_connector",
)


class _HideNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not NOISY_LOGS.search(record.getMessage())


def configure_logging() -> None:
    """Show this package's INFO messages (where files went) on the console."""
    package = logging.getLogger("classifier")
    if not package.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        package.addHandler(handler)
        package.setLevel(logging.INFO)


@contextlib.contextmanager
def quiet_third_party(verbose: bool) -> Iterator[None]:
    """Hide the known noise for the length of one command, and only there: the Python API keeps every message."""
    if verbose:
        yield
        return
    hide = _HideNoise()
    loggers = [logging.getLogger(name) for name in LIGHTNING_LOGGERS]
    with warnings.catch_warnings():
        for message in NOISY_WARNINGS:
            warnings.filterwarnings("ignore", message=message)
        for logger in loggers:
            logger.addFilter(hide)
        try:
            yield
        finally:
            for logger in loggers:
                logger.removeFilter(hide)
