"""The `classifier` command's entry point: `serve` runs without importing `classifier.cli` (and so torch, which an
ONNX model does not need); every other subcommand goes to `classifier.cli.main`."""

from __future__ import annotations

import sys

from classifier.console import USAGE_ERROR, configure_logging, debugging, exit_codes, without_debug_flags
from classifier.launched import end_with_launcher

# as `classifier.cli.EXIT_CODES`, less Lightning's errors, which serving never raises: a missing extra is the user's
SERVE_EXIT_CODES = (((OSError, ValueError, ModuleNotFoundError), USAGE_ERROR),)


def main(args: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if args is None else args)
    if argv[:1] != ["serve"]:
        end_with_launcher()
        from classifier.cli import main as cli_main

        cli_main(args)
        return
    debug, argv = debugging(argv), without_debug_flags(argv)
    configure_logging()
    with exit_codes(SERVE_EXIT_CODES, debug):
        try:
            from classifier.serve.command import serve
        except ModuleNotFoundError as error:
            message = f"classifier serve needs {error.name}: pip install 'classifier[serve]'"
            raise ModuleNotFoundError(message, name=error.name) from error
        serve(argv[1:])
