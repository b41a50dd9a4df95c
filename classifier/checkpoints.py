"""Reading checkpoints as plain data (one safe loader for the CLI, the datamodule, cv and `Predictor`), and which
settings they do not carry."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

# settings of the machine, not of the model: a checkpoint never brings them along
MACHINE_SETTINGS = frozenset(
    {"data.num_workers", "data.decode", "data.cache", "data.predict_dir", "model.channels_last", "model.compile"}
)


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
    except (RuntimeError, OSError, EOFError, zipfile.BadZipFile) as error:  # not a torch.save zip, cut short
        raise ValueError(
            f"{option} {path} is not a readable checkpoint (truncated, or not written by torch.save?): "
            f"{str(error)[:300]}"
        ) from error
