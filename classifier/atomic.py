"""Files written whole or not at all: each goes to a temporary file in its own folder, renamed over the target once
complete, so a kill, a crash or a full disk leaves the previous version, never half a file. Torch-free, for the
export and serving modules too.

The temporary file lives beside the target, not in $TMPDIR: a rename is atomic only within one filesystem, and
staging elsewhere fills another disk (Lightning's own `_atomic_save` stages in fsspec's temporary folder).
"""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

PARTIAL_SUFFIX = ".partial"


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


def human_bytes(count: float) -> str:
    """1.5 MiB, not 1572864."""
    if count < 1024:
        return f"{count:.0f} bytes"
    for unit in ("KiB", "MiB"):
        count /= 1024
        if count < 1024:
            return f"{count:.1f} {unit}"
    return f"{count / 1024:.1f} GiB"


@contextmanager
def atomic_path(path: str | Path, needed: int | None = None) -> Iterator[Path]:
    """A fresh path beside `path` to write to; renamed to `path` when the block succeeds, removed when it fails.

    `needed` (bytes), when known, is checked against the free space first, so a full disk fails before writing.
    """
    path = Path(path)
    partial = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}{PARTIAL_SUFFIX}")
    if needed is not None and shutil.disk_usage(path.parent).free < needed:
        raise DiskFullError(path, needed)
    try:
        yield partial
        os.replace(partial, path)
    except OSError as error:
        if error.errno == errno.ENOSPC and not isinstance(error, DiskFullError):
            raise DiskFullError(path, needed) from error
        raise
    finally:
        partial.unlink(missing_ok=True)


@contextmanager
def atomic_open(path: str | Path, mode: str = "w", **kwargs: Any) -> Iterator[IO]:
    """`open(path, mode)` for writing, through `atomic_path`."""
    with atomic_path(path) as partial, open(partial, mode, **kwargs) as file:
        yield file


def write_text(path: str | Path, text: str) -> None:
    """`Path.write_text`, atomically."""
    with atomic_open(path) as file:
        file.write(text)
