"""What the `classifier` command shows: its own log lines, one-line errors with their exit status, and no
third-party noise unless debugging."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import warnings
from collections.abc import Iterator, Sequence
from typing import TextIO

from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

DEBUG_FLAGS = ("--debug", "--verbose")  # anywhere on the line: every warning, and the traceback of any error
DEBUG_ENV = "CLASSIFIER_DEBUG"  # =1: the same, for a whole job script and the processes it starts
DEBUG_HINT = f"({DEBUG_FLAGS[0]} or {DEBUG_ENV}=1 shows the traceback)"
PARSER_KEY = re.compile(r'^Parser key "([^"]+)":\s*')
EXPECTED = re.compile(r"Expected a (.+?)(?:\. Got value: .*)?$", re.MULTILINE)
GIVEN = re.compile(r"(?:Given|Got) value: (.*)$", re.MULTILINE)
# Lightning's and torch's messages that every run repeats and that ask nothing of the user
NOISY_WARNINGS = (
    r".*isinstance\(treespec, LeafSpec\)` is deprecated",  # Lightning 2.6 on torch >= 2.10, fixed upstream
    r"The dirpath has changed from",  # evaluating a checkpoint: its ModelCheckpoint state names the training run
    r"The number of training batches \(\d+\) is smaller than the logging interval",  # small folders; epoch logs stay
    r"The '\w+' does not have many workers",  # a config's num_workers is a choice (0 for the in-memory digits)
    r"Image size \(\d+ pixels\) exceeds limit",  # PIL's warning for an image that the decode check refuses
    r"It is recommended to use `self.log\('val/f1/",  # DDP: the per-class F1 is synced by its metric already
    # Lightning looks for a loader with state_dict(); the datamodule's sampler resumes inside the epoch itself
    r"You're resuming from a checkpoint that ended before the epoch ended",
    r"LightningCLI's args parameter is intended",
    # shards: LitData gives each loader worker its own chunks, so its length is exact
    r"Your `IterableDataset` has `__len__` defined",  # `cv` and `check-data` parse fit's options after their own
    # an EMA run evaluated: its checkpoint's weights are the averaged ones already, so there is nothing to restore
    r"You're using the WeightAveraging callback, but loading a checkpoint outside the 'fit' stage",
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


class CurrentStderrHandler(logging.StreamHandler):
    """Writes to `sys.stderr` as it is at each message, not as it was when the first command configured logging: a
    caller that redirects or captures stderr later (a test, a notebook) gets the messages, never a closed stream."""

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:
        """Ignored: the stream is always the current stderr."""


def configure_logging() -> None:
    """Show this package's INFO messages (where files went) on the console."""
    package = logging.getLogger("classifier")
    if not package.handlers:
        handler = CurrentStderrHandler()
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


def debugging(argv: Sequence[str] = ()) -> bool:
    """Whether a debug flag in `argv` or `CLASSIFIER_DEBUG=1` asks for tracebacks."""
    return any(flag in argv for flag in DEBUG_FLAGS) or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def without_debug_flags(argv: Sequence[str]) -> list[str]:
    return [arg for arg in argv if arg not in DEBUG_FLAGS]


@contextlib.contextmanager
def lightning_silenced() -> Iterator[None]:
    """Lightning's INFO lines (seed, accelerators) hidden while a command builds a trainer it does not run."""
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def human_bytes(count: float) -> str:
    """1.5 MiB, not 1572864."""
    if count < 1024:
        return f"{count:.0f} bytes"
    for unit in ("KiB", "MiB"):
        count /= 1024
        if count < 1024:
            return f"{count:.1f} {unit}"
    return f"{count / 1024:.1f} GiB"


def parse_error_line(message: str) -> str:
    """jsonargparse's report of a bad value, which spans up to a dozen lines, as `--key value: expected ...`."""
    key = PARSER_KEY.match(message)
    if key is None:
        return " ".join(message.split())
    expected = []
    for kind in EXPECTED.findall(message):
        kind = re.sub(r"<class '(?:\w+\.)*(\w+)'>", r"\1", kind).replace("NoneType", "null")
        expected.append(re.sub(r"typing\.Literal\[(.*)\]", r"one of \1", kind))
    given = GIVEN.search(message)
    if not expected or given is None:
        return f"--{key[1]}: {' '.join(message[key.end() :].split())}"
    return f"--{key[1]} {given[1]}: expected {' or '.join(dict.fromkeys(expected))}"


def print_table(table: Table) -> None:
    """Print a table whole: into a file or pipe at its natural width (rich would cut it at 80 columns); in a
    terminal at the terminal's width, folding cells rather than cutting them short."""
    console = Console()
    for column in table.columns:
        column.overflow = "fold"
    if not console.is_terminal:
        unbounded = console.options.update(max_width=100_000)
        console.width = max(console.width, Measurement.get(console, unbounded, table).maximum)
    console.print(table)
