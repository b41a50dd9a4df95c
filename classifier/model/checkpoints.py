"""Reading checkpoints as plain data (one safe loader for the CLI, the datamodule, cv and `Predictor`), writing them
whole or not at all, and which settings they do not carry."""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from classifier.core.atomic import atomic_path

# settings of the machine, not of the model: a checkpoint never brings them along
MACHINE_SETTINGS = frozenset(
    {
        "data.num_workers",
        "data.decode",
        "data.cache",
        "data.shard_cache",
        "data.predict_dir",
        "model.channels_last",
        "model.compile",
    }
)
ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since torch 1.6; only it can be memory-mapped
FORBIDDEN_GLOBAL = re.compile(r"GLOBAL ([\w.]*\w)|Unsupported globals: ([\w.]*\w)")  # torch's wordings, then timm's
UNPICKLER_ERROR = re.compile(r"WeightsUnpickler error:\s*(.+)")  # what weights_only found, not torch's advice
FIRST_SENTENCE = re.compile(r"^\s*([^\n]*?)(?:\. |\.?$)", re.MULTILINE)
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def read_checkpoint(path: str | Path, option: str = "--ckpt_path") -> dict[str, Any]:
    """A checkpoint's tensors and plain data, memory-mapped; a pickle that could run code is refused, not loaded.

    `option` names where the path came from, for the error messages.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{option} {path} does not exist")
    with open(path, "rb") as file:
        zipped = file.read(len(ZIP_MAGIC)) == ZIP_MAGIC
    with loading(option, path):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)


@contextlib.contextmanager
def loading(option: str, path: Path) -> Iterator[None]:
    """Around a `torch.load(weights_only=True)`, ours or timm's: whatever it raises, one line naming the file."""
    with warnings.catch_warnings():  # torch's note on a plain pickle's protocol, which is refused anyway
        warnings.filterwarnings("ignore", message="Detected pickle protocol")
        try:
            yield
        except Exception as error:  # noqa: BLE001 - refused or unreadable, the user learns which and of what file
            raise unreadable(option, path, error) from error


def unreadable(option: str, path: Path, error: BaseException) -> ValueError:
    """A pickle that `weights_only` refused for the code it would call, an empty file, or one cut short or of another
    format (a pickle it cannot parse may hide code too: it is not loaded either way)."""
    chain = [error]
    while chain[-1].__cause__ or chain[-1].__context__:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    found = next((match for cause in reversed(chain) if (match := FORBIDDEN_GLOBAL.search(str(cause)))), None)
    if found:  # torch's own error, innermost, names the global as the pickle does
        return ValueError(
            f"{option} {path} holds pickled objects other than tensors and plain data (it calls "
            f"{found[1] or found[2]}), which could run code when loaded, so it was not loaded. Use a checkpoint "
            "written by `classifier fit`, or weights saved as .safetensors or as a state dict of tensors"
        )
    if path.stat().st_size == 0:
        return ValueError(f"{option} {path} is empty (0 bytes): a save or copy that never wrote? Use another file")
    cause = next((cause for cause in chain if isinstance(cause, pickle.UnpicklingError)), error)
    detail = UNPICKLER_ERROR.search(str(cause)) or FIRST_SENTENCE.search(ANSI.sub("", str(cause)))
    return ValueError(
        f"{option} {path} is not a readable checkpoint ({path.stat().st_size} bytes): cut short by an unfinished save "
        f"or copy, or not written by torch.save ({type(cause).__name__}: {detail[1] if detail else 'no detail'})"
    )


def save_checkpoint(checkpoint: dict[str, Any], path: Path) -> None:
    """torch.save beside `path`, then rename: the free space is checked against the checkpoint's size first, and the
    file is fsynced before the rename, so the old file stays until the new one is complete."""
    buffer = io.BytesIO()  # its size is what the disk must hold; Lightning's own writer buffers too
    torch.save(checkpoint, buffer)
    with atomic_path(path, needed=buffer.tell()) as partial, open(partial, "wb") as file:
        file.write(buffer.getbuffer())
        file.flush()
        os.fsync(file.fileno())
