"""The `classifier` command's entry point: it reads the table of commands, imports only the command asked for, and
ends a user's error with one line and its exit status. Torch-free: `classifier serve model.onnx` loads no torch."""

from __future__ import annotations

import difflib
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from classifier.cli.commands import BY_NAME, Command, extra_of, usage
from classifier.cli.launched import end_with_launcher
from classifier.core.console import DEBUG_ENV, configure_logging, debugging, quiet_third_party, without_debug_flags
from classifier.core.errors import USAGE_ERROR, MissingExtra, exit_codes

HELP_FLAGS = ("-h", "--help")


def main(args: list[str] | None = None) -> None:
    """Entry point of the `classifier` command: third-party noise hidden and a user's error on one line with its exit
    status (`core.errors.EXIT_CODES`), unless `--debug`/`--verbose` (anywhere on the line) or CLASSIFIER_DEBUG=1 asks
    for every warning and the traceback."""
    argv = list(sys.argv[1:] if args is None else args)
    debug, argv = debugging(argv), without_debug_flags(argv)
    if args is None:  # LightningCLI, and DDP's relaunch of the other ranks, read sys.argv
        sys.argv[1:] = argv
    debug_env = os.environ.get(DEBUG_ENV)
    if debug:  # the parser's errors too, here and in the processes a run starts
        os.environ[DEBUG_ENV] = "1"
    try:
        with exit_codes(debug), quiet_third_party(debug):
            cli_main(argv)
    finally:
        if debug_env is None:
            os.environ.pop(DEBUG_ENV, None)


def cli_main(args: list[str] | None = None) -> None:
    """The `classifier` command's work; `args` lets tests drive it without a subprocess. Errors propagate."""
    argv = list(sys.argv[1:] if args is None else args)
    configure_logging()
    if not argv or argv[0] in HELP_FLAGS:
        sys.stdout.write(usage())
        sys.exit(0 if argv else USAGE_ERROR)
    command = BY_NAME.get(argv[0])
    if command is None:
        close = difflib.get_close_matches(argv[0], BY_NAME, n=3, cutoff=0.6)
        hint = f" (did you mean {' or '.join(close)}?)" if close else ""
        sys.stderr.write(f"error: unknown command {argv[0]!r}{hint}\n`classifier --help` lists the commands.\n")
        sys.exit(USAGE_ERROR)
    if command.name != "serve":  # a DDP rank that its launcher started ends with it
        end_with_launcher()
    with naming_extras(command):
        command.load()(argv[1:])


@contextmanager
def naming_extras(command: Command | None = None) -> Iterator[None]:
    """A module of an extra that is not installed ends the command with the install line, not a traceback."""
    try:
        yield
    except ModuleNotFoundError as error:
        extra = extra_of(error.name or "", command)
        if extra is None or isinstance(error, MissingExtra):
            raise
        root = (error.name or "").partition(".")[0]
        raise MissingExtra(f"{root} is not installed: pip install 'classifier[{extra}]'", name=error.name) from error
