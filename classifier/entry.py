"""The `classifier` command's entry point: `serve` runs without importing `classifier.cli` (and so torch, which an
ONNX model does not need); every other subcommand goes to `classifier.cli.main`."""

from __future__ import annotations

import sys

from classifier.console import VERBOSE_FLAG, configure_logging
from classifier.launched import end_with_launcher


def main(args: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if args is None else args)
    if argv[:1] != ["serve"]:
        end_with_launcher()
        from classifier.cli import main as cli_main

        cli_main(args)
        return
    verbose = VERBOSE_FLAG in argv
    configure_logging()
    try:
        from classifier.serve.command import serve

        serve([arg for arg in argv[1:] if arg != VERBOSE_FLAG])
    except ModuleNotFoundError as error:
        if verbose:
            raise
        sys.stderr.write(f"error: classifier serve needs {error.name}: pip install 'classifier[serve]'\n")
        sys.exit(1)
    except (OSError, ValueError) as error:
        if verbose:
            raise
        sys.stderr.write(f"error: {error}\n(--verbose shows the traceback)\n")
        sys.exit(1)
