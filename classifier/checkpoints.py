"""Reading checkpoints as plain data: one safe loader for the CLI, the datamodule, cv and `Predictor`."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch


def read_checkpoint(path: str | Path, option: str = "--ckpt_path") -> dict[str, Any]:
    """A checkpoint's tensors and plain data, memory-mapped; a pickle that could run code is refused, not loaded.

    `option` names where the path came from, for the error messages.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{option} {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"{option} {path} holds objects other than tensors and plain data, which could run code when loaded, "
            f"so it was not loaded. Pass a checkpoint written by `classifier fit`. ({str(error)[:300]})"
        ) from error
