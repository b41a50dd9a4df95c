"""The file lists a run reads: the images predict is given, the ones that decode, and one line per unreadable file."""

from __future__ import annotations

import logging
from pathlib import Path

from classifier.core.imageio import list_images
from classifier.data.file_facts import verify_files
from classifier.data.workers import available_cores

log = logging.getLogger(__name__)


def predict_paths(source: Path) -> list[Path]:
    """The images named by --data.predict_dir: a folder's (recursively), one file, or a .txt list's."""
    if source.is_dir():
        return list_images(source)
    if not source.is_file():
        raise FileNotFoundError(f"--data.predict_dir {source} does not exist")
    if source.suffix.lower() != ".txt":
        return [source]
    lines = (line.strip() for line in source.read_text().splitlines())
    return [source.parent / line for line in lines if line and not line.startswith("#")]


def predict_files(predict_dir: str | None) -> tuple[list[Path], dict[Path, str]]:
    """predict's images that decode, and those that do not with the reason; an error when none can be predicted."""
    if not predict_dir:
        raise ValueError("predict needs --data.predict_dir: a folder of images, an image, or a .txt list")
    paths = predict_paths(Path(predict_dir))
    if not paths:
        raise ValueError(f"--data.predict_dir {predict_dir} holds no images")
    checked = verify_files(paths, num_threads=2 * available_cores())
    unreadable = {path: facts.reason for path, facts in checked.items() if facts.reason is not None}
    readable = [path for path in paths if path not in unreadable]
    if not readable:  # an unreadable file is one error row; with no readable ones there is nothing to do
        raise ValueError(f"none of the {len(paths)} images of --data.predict_dir can be read:\n{listing(unreadable)}")
    return readable, unreadable


def ood_files(folder: Path, skip_bad_images: bool) -> list[Path]:
    """--data.ood_dir's images that decode; an error naming the option when it holds none."""
    paths = list_images(folder) if folder.is_dir() else []
    if not paths:
        state = "holds no images" if folder.is_dir() else "is not a folder"
        raise ValueError(f"--data.ood_dir {folder} {state}: give a folder of images of none of the classes")
    checked = verify_files(paths, num_threads=2 * available_cores())
    bad = {path: facts.reason for path, facts in checked.items() if facts.reason is not None}
    return readable(paths, bad, skip_bad_images)


def readable(paths: list[Path], bad: dict[Path, str], skip_bad_images: bool) -> list[Path]:
    """`paths` without the unreadable ones (`bad`, with their reasons): skipped with a warning, or an error."""
    if not bad:
        return paths
    if not skip_bad_images:
        raise ValueError(
            f"{len(bad)} of {len(paths)} images cannot be read:\n{listing(bad)}\n"
            "Fix or remove them, or pass --data.skip_bad_images true to leave them out."
        )
    log.warning("Skipping %d unreadable images of %d:\n%s", len(bad), len(paths), listing(bad))
    return [path for path in paths if path not in bad]


def listing(unreadable: dict[Path, str]) -> str:
    """One indented `path: reason` line per unreadable file."""
    return "\n".join(f"  {path}: {reason}" for path, reason in unreadable.items())
