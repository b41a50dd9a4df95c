"""Every error of this package's own, and the one table of exit statuses the `classifier` command ends with.

Torch-free, so that serving an ONNX file and the command's entry point share it: Lightning's errors are keyed by
their qualified names, not imported.
"""

from __future__ import annotations

import errno
import shutil
import signal
import sys
import traceback
from argparse import ArgumentError
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from classifier.core.console import DEBUG_HINT, human_bytes

USAGE_ERROR = 2  # a mistake in the options, the config or the input files: argparse's own status for bad options
# an error class, or the qualified name of a class this module does not import (Lightning's, which needs torch)
ErrorKind = type[BaseException] | str
ExitCodes = Sequence[tuple[tuple[ErrorKind, ...], int]]


class DiskFullError(OSError):
    """A write that did not fit on its disk: the message names the folder, the bytes needed and those free."""

    def __init__(self, path: Path, needed: int | None) -> None:
        folder = path.parent.absolute()
        free = shutil.disk_usage(folder).free
        size = f"{human_bytes(needed)} ({needed:,} bytes)" if needed is not None else "more space"
        super().__init__(
            errno.ENOSPC,
            f"disk full: writing {path.name} needs {size} in {folder}, which has {human_bytes(free)} free; "
            "the files there from before are intact. Free some space there and resume with --ckpt_path last",
        )

    def __str__(self) -> str:
        return self.strerror


class TrainingDiverged(ArithmeticError):
    """The loss became NaN or infinite: the run stops with the checkpoints of the last finite weights."""


class TrialsFailed(RuntimeError):
    """Every trial a `classifier tune` session started failed: the cause is the first one's error."""


class PeerRankFailed(RuntimeError):
    """Another DDP rank died or raised, and this one lost it in a collective: the cause is that rank's own error."""


class DataCheckFailed(RuntimeError):
    """--strict found leakage, label conflicts or unreadable files."""


class ParityError(ValueError):
    """The exported model disagrees with the checkpoint by more than the tolerance."""


class MissingExtra(ModuleNotFoundError):
    """An optional dependency is not installed: the message names the extra to install."""


# the exit status of each kind of error, first match first; any error not listed is a bug and keeps its traceback
# (Python's status 1). An error without a message ends the command silently: SIGTERM's run has said what it saved.
EXIT_CODES: ExitCodes = (
    # preempted: last.ckpt saved, `--ckpt_path last` resumes
    (("lightning.pytorch.utilities.exceptions.SIGTERMException",), 128 + signal.SIGTERM),
    # faults of the run or of the data (check-data --strict), not mistakes in what the user gave the command
    ((DiskFullError, TrainingDiverged, PeerRankFailed, DataCheckFailed, TrialsFailed), 1),
    # a mistake in the options, the config or the input files, as the parser's own; ParityError is a ValueError
    (
        (
            OSError,
            ValueError,
            ArgumentError,
            MissingExtra,
            "lightning.fabric.utilities.exceptions.MisconfigurationException",
        ),
        USAGE_ERROR,
    ),
)


def is_kind(error: BaseException, kinds: tuple[ErrorKind, ...]) -> bool:
    """Whether `error` is an instance of one of `kinds`, classes or qualified class names."""
    names = {f"{cls.__module__}.{cls.__qualname__}" for cls in type(error).__mro__}
    return any(kind in names if isinstance(kind, str) else isinstance(error, kind) for kind in kinds)


def exit_status(error: BaseException, table: ExitCodes = EXIT_CODES) -> int | None:
    """The status `table` gives `error` (first match), or None for a bug."""
    return next((code for kinds, code in table if is_kind(error, kinds)), None)


@contextmanager
def exit_codes(debug: bool, table: ExitCodes = EXIT_CODES) -> Iterator[None]:
    """End the command with the status `table` gives the error's class: its message on one line, or its traceback
    when debugging. An error of no listed class is a bug, and keeps its traceback and Python's 1."""
    try:
        yield
    except BaseException as error:  # Lightning's SIGTERMException is a SystemExit
        status = exit_status(error, table)
        if status is None:
            raise
        if debug:
            traceback.print_exception(type(error), error, error.__traceback__)
        elif str(error):
            sys.stderr.write(f"error: {error}\n{DEBUG_HINT}\n")
        sys.exit(status)
