"""`classifier fit|validate|test|predict|lr_find`: the trainer's methods, run by the LightningCLI of
`classifier.cli.base`."""

from __future__ import annotations

import sys
import warnings

from classifier.cli.base import ClassifierCLI
from classifier.training.faults import lost_peer

# Lightning's warning at a fit's start; a resumed fit writes into its own run folder by design, so it says nothing
NOT_EMPTY = r"Checkpoint directory .* exists and is not empty"


def run(subcommand: str, argv: list[str]) -> None:
    """Run one of the trainer's methods; a collective that lost its peer says so as a PeerRankFailed."""
    args = [subcommand, *argv]
    resuming = subcommand == "fit" and any(arg.partition("=")[0] == "--ckpt_path" for arg in argv)
    try:
        with warnings.catch_warnings():
            if resuming:
                warnings.filterwarnings("ignore", message=NOT_EMPTY)
            # from the command line, LightningCLI reads sys.argv itself (and warns when it is also given it)
            ClassifierCLI(args=None if sys.argv[1:] == args else args)
    except RuntimeError as error:  # gloo's or NCCL's words for a rank that is gone
        peer = lost_peer(error)
        if peer is None:
            raise
        raise peer from error


def fit(argv: list[str]) -> None:
    """Train a model."""
    run("fit", argv)


def validate(argv: list[str]) -> None:
    """Evaluate a checkpoint on its validation split."""
    run("validate", argv)


def test(argv: list[str]) -> None:
    """Evaluate a checkpoint on its frozen test split."""
    run("test", argv)


def predict(argv: list[str]) -> None:
    """Predict a folder of images with a checkpoint."""
    run("predict", argv)


def lr_find(argv: list[str]) -> None:
    """Find a learning rate for a config."""
    run("lr_find", argv)
