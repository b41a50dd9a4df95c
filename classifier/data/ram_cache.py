"""The RAM cache: each image decoded once and kept presized as uint8, so later epochs only crop on the device."""

from __future__ import annotations

import logging
import os
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image
from torch import Tensor

from classifier.core.imageio import unreadable_reason
from classifier.data.file_lists import listing
from classifier.data.images import presize

log = logging.getLogger(__name__)

MEMORY_SHARE = 0.7  # of the memory still available; the rest stays for loader workers, batches and the OS
SAMPLED_HEADERS = 256


def available_memory() -> int:
    """Bytes the system can still hand out without swapping (Linux's MemAvailable)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def estimated_bytes(paths: list[Path], size: int | None, enlarge: bool = True) -> int:
    """What `paths` take presized as `presize` does, from the headers of a sample of them."""

    def presized_bytes(path: Path) -> float:
        try:
            with Image.open(path) as image:
                width, height = image.size
        except Exception:  # noqa: BLE001 - an unreadable file is reported when the cache is filled
            width = height = 1
        short = min(width, height)
        side = short if size is None or (not enlarge and short <= size) else size
        return 3 * side * side * max(width, height) / max(1, short)

    sample = random.Random(0).sample(paths, min(len(paths), SAMPLED_HEADERS))
    if not sample:
        return 0
    return int(sum(map(presized_bytes, sample)) / len(sample) * len(paths))


def fits_in_memory(paths: list[Path], size: int | None, copies: int, what: str, enlarge: bool = True) -> bool:
    """Whether `copies` caches of `paths` fit in memory; if not, a warning that says what happens instead."""
    needed, available = estimated_bytes(paths, size, enlarge) * copies, available_memory()
    if needed <= MEMORY_SHARE * available:
        return True
    log.warning(
        "--data.cache ram: the %d %s images need about %.1f GiB in memory%s, more than %.0f%% of the %.1f GiB "
        "available; reading them from disk instead.",
        len(paths), what, needed / 2**30, f" ({copies} processes each hold a copy)" if copies > 1 else "",
        100 * MEMORY_SHARE, available / 2**30,
    )  # fmt: skip
    return False


def fill(
    paths: list[Path], size: int | tuple[int, int] | None, interpolation: str, training: bool, num_threads: int
) -> tuple[dict[Path, Tensor], dict[Path, str]]:
    """Decode and presize every file in parallel threads (PIL releases the GIL); unreadable files map to why.

    Without `draft`, JPEGs decode in full, as eval's transform does.
    """

    def load(path: Path) -> Tensor | str:
        try:
            return presize(path, size, interpolation, training)
        except Exception as error:  # noqa: BLE001 - any decoder failure makes the file unusable
            return unreadable_reason(path, error)

    with ThreadPoolExecutor(max(1, num_threads)) as pool:
        loaded = dict(zip(paths, pool.map(load, paths, chunksize=16), strict=True))
    images = {path: value for path, value in loaded.items() if isinstance(value, Tensor)}
    unreadable = {path: value for path, value in loaded.items() if isinstance(value, str)}
    megabytes = sum(image.numel() for image in images.values()) / 2**20
    log.info("Cached %d images presized to %s px in RAM: %.0f MiB", len(images), size or "full", megabytes)
    return images, unreadable


def cached_split(
    paths: list[Path],
    size: int | tuple[int, int] | None,
    interpolation: str,
    training: bool,
    copies: int,
    name: str,
    num_threads: int,
) -> dict[Path, Tensor] | None:
    """A split's checked images presized in RAM (one cache per device: `copies`); None when they would not fit.
    Training never enlarges (`size`: a shorter side); eval keeps its resize (`size`: its (height, width) scale)."""
    shorter = min(size) if isinstance(size, tuple) else size
    if not fits_in_memory(paths, shorter, copies, name, enlarge=not training):
        return None
    images, unreadable = fill(paths, size, interpolation, training, num_threads)
    if unreadable:  # checked a moment before
        raise ValueError(f"{len(unreadable)} images changed while they were read:\n{listing(unreadable)}")
    return images
