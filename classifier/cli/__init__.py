"""The `classifier` command: its torch-free entry point, the one table of commands, the LightningCLI base and run
folders."""

from classifier.core.moved import old_attribute


def __getattr__(name: str) -> object:
    """Names of 0.1's flat module `classifier.cli`, now in `classifier.cli.base`, for configs."""
    return old_attribute(__name__, name)
