"""Files written whole or not at all: each goes to a temporary file in its own folder, renamed over the target once
complete, so a kill, a crash or a full disk leaves the previous version, never half a file. Torch-free, for the
export and serving modules too.

The temporary file lives beside the target, not in $TMPDIR: a rename is atomic only within one filesystem, and
staging elsewhere fills another disk (Lightning's own `_atomic_save` stages in fsspec's temporary folder).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from classifier.core.errors import DiskFullError

PARTIAL_SUFFIX = ".partial"


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


def replace_folder(staged: Path, target: Path) -> Path:
    """`staged`, a complete folder beside `target`, moved to `target` (whatever was there is removed): readers see
    the old folder or the new one, whole, except between two renames of a microsecond."""
    previous = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.old")
    if target.exists():
        os.rename(target, previous)
    os.rename(staged, target)
    shutil.rmtree(previous, ignore_errors=True)
    return target


def write_text(path: str | Path, text: str) -> None:
    """`Path.write_text`, atomically."""
    with atomic_open(path) as file:
        file.write(text)


def rounded(value: Any, digits: int = 6) -> Any:
    """`value` with every float to `digits` significant digits: float32 metrics read 1.0, not 1.0000001192092896."""
    if isinstance(value, float):
        return float(f"{value:.{digits}g}")
    if isinstance(value, dict):
        return {key: rounded(item, digits) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(item, digits) for item in value]
    return value


def write_json(path: Path, data: dict) -> None:
    """A JSON file for people (summary.json, metrics.json, cv_summary.json): indented, floats rounded."""
    write_text(path, json.dumps(rounded(data), indent=2) + "\n")
