"""What each image file is, checked once: readable or why not, its size, mode and EXIF rotation, the hashes of its
bytes and pixels, and the perceptual hashes of it and of slight crops of it; kept in a cache keyed by path, size
and mtime that `fit`, `cv` and `check-data` share, so an unchanged folder is never decoded twice."""

from __future__ import annotations

import hashlib
import io
import logging
import multiprocessing
import os
import sqlite3
import sys
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import astuple, dataclass, fields
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from classifier.core.imageio import EXIF_ORIENTATION, open_image, to_rgb, unreadable_reason

log = logging.getLogger(__name__)

CACHE_ENV = "CLASSIFIER_CACHE_DIR"  # where the cache lives, instead of the user's cache folder
CACHE_FILE = "verification-v2.sqlite"  # the version changes whenever what a row holds does
BESIDE_DATA = f".classifier-{CACHE_FILE}"  # the fallback, in the data folder (hidden, so never an image)
UNREADABLE = "unreadable"  # the byte hash of a file that cannot be opened
TURNED = (5, 6, 7, 8)  # EXIF orientations that swap width and height
CHECK_SIDE = 64  # JPEGs decode at the smallest DCT scale (1/2 to 1/8) that keeps the shorter side this long
THUMB_SIDE = 16  # the grey thumbnail that near-copy candidates are first compared on
HASH_SIDE = 32  # pHash: the DCT of a 32x32 grey image, whose 8x8 lowest frequencies give the 64 bits
HASHED_SIDE = 2 * HASH_SIDE  # the hashes, thumbnail and near-copy checks all start from one grey copy this size
CUTS = (0.1, 0.05)  # the crops also hashed cut this share of a side off (see crop_windows)
PROCESSES_FROM = 2000  # files to check from which starting worker processes (about 0.3 s) pays
LOCK_TIMEOUT_S = 120.0  # how long a process waits for another one's write to the cache
QUERIED_PATHS = 500  # paths per SELECT (SQLite allows 999 parameters in older builds)


@dataclass(frozen=True)
class FileFacts:
    """One file as decoding finds it; `reason` is None when it decodes. Sizes are upright (after EXIF rotation)."""

    reason: str | None
    format: str
    width: int
    height: int
    mode: str
    orientation: int
    file_hash: str  # `<bytes>-<BLAKE2b-64 of the bytes>`, or UNREADABLE
    pixel_hash: str  # `<width>x<height>-<BLAKE2b-64 of the upright RGB pixels as decoded>`; "" when unreadable
    phash: int  # 64-bit perceptual hash, signed (as SQLite stores integers); 0 when unreadable
    crop_hashes: bytes  # the pHashes of the crops WINDOWS[1:], int64 each; b"" when unreadable
    thumb: bytes  # THUMB_SIDE² grey pixels; b"" when unreadable


COLUMNS = [field.name for field in fields(FileFacts)]


def file_hash(data: bytes) -> str:
    """`<bytes>-<BLAKE2b-64>`: any edit, re-encode or replacement under the same name changes it."""
    return f"{len(data)}-{hashlib.blake2b(data, digest_size=8).hexdigest()}"


def dct_rows(side: int, kept: int) -> np.ndarray:
    """The first `kept` rows of the orthonormal DCT-II matrix of size `side` (scipy's `dct(norm="ortho")`)."""
    k, n = np.arange(kept)[:, None], np.arange(side)[None, :]
    rows = np.sqrt(2 / side) * np.cos(np.pi * (2 * n + 1) * k / (2 * side))
    rows[0] /= np.sqrt(2)
    return rows


LOW_DCT = dct_rows(HASH_SIDE, 8)


def crop_windows() -> np.ndarray:
    """(1 + crops, 4): the whole image, then for each of CUTS the windows (left, top, right, bottom, as shares of
    the sides) that cut it off the middle (half off each side), off each corner's two sides and off each side."""
    windows = [(0.0, 0.0, 1.0, 1.0)]
    for cut in CUTS:
        half, rest = cut / 2, 1 - cut
        windows += [(half, half, 1 - half, 1 - half), (0, 0, rest, rest), (cut, 0, 1, rest), (0, cut, rest, 1),
                    (cut, cut, 1, 1), (cut, 0, 1, 1), (0, 0, rest, 1), (0, cut, 1, 1), (0, 0, 1, rest)]  # fmt: skip
    return np.array(windows)


WINDOWS = crop_windows()


def area_rows(length: int, starts: np.ndarray, ends: np.ndarray, cells: int) -> np.ndarray:
    """(windows, cells, length): the weights that average each window [start, end) of a `length`-pixel line onto
    `cells` equal cells, each pixel weighted by the share of it a cell covers (the image as flat squares)."""
    edges = starts[:, None] + (ends - starts)[:, None] * np.arange(cells + 1) / cells
    low, high = edges[:, :-1, None], edges[:, 1:, None]
    pixel = np.arange(length)
    return np.clip(np.minimum(high, pixel + 1) - np.maximum(low, pixel), 0, None) / (high - low)


@lru_cache(maxsize=256)
def whole_rows(length: int, cells: int) -> np.ndarray:
    return area_rows(length, np.zeros(1), np.full(1, length), cells)[0]


def hashed_copy(grey: Image.Image) -> np.ndarray:
    """The HASHED_SIDE² grey copy (float64) that hashes and checks start from: PIL's BOX where it shrinks both
    sides, else exact area weights (BOX enlarges by repeating pixels unevenly, which moves edges)."""
    if min(grey.size) >= HASHED_SIDE:
        small = grey.resize((HASHED_SIDE, HASHED_SIDE), Image.Resampling.BOX)
        return np.frombuffer(small.tobytes(), np.uint8).reshape(HASHED_SIDE, HASHED_SIDE).astype(np.float64)
    pixels = np.asarray(grey, dtype=np.float64)
    return whole_rows(pixels.shape[0], HASHED_SIDE) @ pixels @ whole_rows(pixels.shape[1], HASHED_SIDE).T


def window_rows(windows: np.ndarray, axis: int, length: int, cells: int) -> np.ndarray:
    """(windows, cells, length): along x (0) or y (1), the averaging of each window's span onto `cells` cells."""
    return area_rows(length, windows[:, axis] * length, windows[:, axis + 2] * length, cells)


HASH_ROWS = [LOW_DCT @ window_rows(WINDOWS, axis, HASHED_SIDE, HASH_SIDE) for axis in (0, 1)]


def hashes_of(grey: Image.Image) -> tuple[int, bytes, bytes]:
    """pHash (imagehash's, with an area-averaging resize: the signs, against their median, of the 8x8 lowest DCT
    frequencies of a 32x32 grey copy; resizing and recompression flip few of its bits), the pHashes of the crop
    WINDOWS (a crop moves every frequency, so a cropped copy is found by the hash of the same crop of its original)
    and the THUMB_SIDE² thumbnail. Averaging and the DCT are linear: each hash is `rows_y @ pixels @ rows_x.T`."""
    pixels = hashed_copy(grey)
    low = (HASH_ROWS[1] @ pixels @ HASH_ROWS[0].transpose(0, 2, 1)).reshape(len(WINDOWS), 64)
    middle = np.sort(low, axis=1)[:, 31:33].mean(axis=1, keepdims=True)  # np.median's, without its overhead
    codes = np.packbits(low > middle, axis=1).view(">i8").astype(np.int64).ravel()
    step = HASHED_SIDE // THUMB_SIDE
    thumb = pixels.reshape(THUMB_SIDE, step, THUMB_SIDE, step).mean(axis=(1, 3))
    return int(codes[0]), codes[1:].tobytes(), np.rint(thumb).astype(np.uint8).tobytes()


def inspect_file(path: Path) -> FileFacts:
    """Read `path` once: hash its bytes, decode them (truncation is found, never tolerated), and hash the upright RGB
    pixels the model would see, with the perceptual hash and thumbnail made from them.

    JPEGs decode at the DCT scale that keeps the shorter side at least CHECK_SIDE (every byte is still read), as
    the decode check always has: the pixel hash is of that decode, the same for the same coded image.
    """
    try:
        data = path.read_bytes()
    except OSError as error:
        return unreadable(unreadable_reason(path, error), UNREADABLE)
    try:
        with open_image(io.BytesIO(data)) as image:
            kind, mode, (width, height) = image.format or "", image.mode, image.size
            orientation = int(image.getexif().get(EXIF_ORIENTATION, 1))
            image.draft("RGB", (CHECK_SIDE, CHECK_SIDE))
            image.load()
            rgb = to_rgb(image)
    except UnidentifiedImageError:  # PIL's own words, which would name the in-memory copy
        error = UnidentifiedImageError(f"cannot identify image file {str(path)!r}")
        return unreadable(unreadable_reason(path, error), file_hash(data))
    except Exception as error:  # noqa: BLE001 - any decoder failure makes the file unusable
        return unreadable(unreadable_reason(path, error), file_hash(data))
    if orientation in TURNED:
        width, height = height, width
    pixels = f"{rgb.width}x{rgb.height}-{hashlib.blake2b(rgb.tobytes(), digest_size=8).hexdigest()}"
    phash, crops, thumb = hashes_of(rgb.convert("L"))
    return FileFacts(None, kind, width, height, mode, orientation, file_hash(data), pixels, phash, crops, thumb)


def unreadable(reason: str, hashed: str) -> FileFacts:
    return FileFacts(reason, "", 0, 0, "", 1, hashed, "", 0, b"", b"")


def cache_location(data_dir: Path | None) -> Path | None:
    """$CLASSIFIER_CACHE_DIR, else the user's cache folder ($XDG_CACHE_HOME or ~/.cache), else beside the data:
    the first one writable. None when none is (the files are checked every time)."""
    user = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    chosen = os.environ.get(CACHE_ENV)
    for folder, name in ((Path(chosen or Path(user) / "classifier"), CACHE_FILE), (data_dir, BESIDE_DATA)):
        if folder is None:
            continue
        try:
            Path(folder).mkdir(parents=True, exist_ok=True)
            if os.access(folder, os.W_OK):
                return Path(folder) / name
        except OSError:
            pass
        if chosen:  # a folder asked for is not silently replaced by the data's
            log.warning("%s %s is not a writable folder: the images are checked without a cache", CACHE_ENV, chosen)
            break
    return None


class FactsCache:
    """The SQLite table of FileFacts by absolute path, size and mtime. SQLite's file locks make it safe for several
    processes (DDP ranks, parallel jobs) at once; a cache that cannot be used is warned about, never fatal."""

    def __init__(self, location: Path | None) -> None:
        self.location = location
        self.connection: sqlite3.Connection | None = None
        if location is None:
            return
        try:
            self.connection = sqlite3.connect(location, timeout=LOCK_TIMEOUT_S, check_same_thread=False)
            columns = ", ".join(COLUMNS)
            with self.connection:
                self.connection.execute(
                    "CREATE TABLE IF NOT EXISTS files "
                    f"(path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, {columns})"
                )
        except sqlite3.Error as error:
            self._give_up(error)

    def _give_up(self, error: sqlite3.Error) -> None:
        log.warning(
            "The verification cache %s cannot be used (%s): checking the images without it. Delete the file to "
            "start a new one, or set %s to another folder.", self.location, error, CACHE_ENV,
        )  # fmt: skip
        if self.connection is not None:
            self.connection.close()
        self.connection = None

    def load(self, paths: list[str]) -> dict[str, tuple[int, int, FileFacts]]:
        """The rows of `paths` that the cache holds: path -> (size, mtime_ns, facts)."""
        if self.connection is None:
            return {}
        found = {}
        try:
            for start in range(0, len(paths), QUERIED_PATHS):
                chunk = paths[start : start + QUERIED_PATHS]
                rows = self.connection.execute(
                    f"SELECT path, size, mtime_ns, {', '.join(COLUMNS)} FROM files "
                    f"WHERE path IN ({', '.join('?' * len(chunk))})",
                    chunk,
                )
                found.update((row[0], (row[1], row[2], FileFacts(*row[3:]))) for row in rows)
        except sqlite3.Error as error:
            self._give_up(error)
            return {}
        return found

    def store(self, rows: Iterable[tuple[str, int, int, FileFacts]]) -> None:
        if self.connection is None:
            return
        marks = ", ".join("?" * (3 + len(COLUMNS)))
        try:
            with self.connection:
                self.connection.executemany(
                    f"INSERT OR REPLACE INTO files VALUES ({marks})",
                    [(path, size, mtime, *astuple(facts)) for path, size, mtime, facts in rows],
                )
        except sqlite3.Error as error:
            self._give_up(error)

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()


def file_key(path: Path) -> tuple[str, int, int]:
    """(absolute path, size, mtime in ns); size -1 for a file that cannot be stat'ed, which is never cached."""
    absolute = os.path.abspath(path)
    try:
        status = os.stat(absolute)
    except OSError:
        return absolute, -1, -1
    return absolute, status.st_size, status.st_mtime_ns


def inspect_all(paths: list[Path], num_threads: int) -> list[FileFacts]:
    """`inspect_file` of each path: in threads for a few files; for many, on Linux, in processes forked as
    PyTorch's loader workers are (PIL's Python code and the hashing hold the GIL, so threads run at one core's
    speed; spawned processes would re-import the user's script)."""
    processes = min(os.cpu_count() or 1, num_threads)
    if len(paths) < PROCESSES_FROM or processes < 2 or not sys.platform.startswith("linux"):
        with ThreadPoolExecutor(max(1, num_threads)) as pool:
            return list(pool.map(inspect_file, paths, chunksize=16))
    with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("fork")) as pool:
        return list(pool.map(inspect_file, paths, chunksize=64))


def verify_files(paths: list[Path], data_dir: Path | None = None, num_threads: int = 8) -> dict[Path, FileFacts]:
    """FileFacts of every path, in order: from the cache when its size and mtime are unchanged, else inspected
    (`inspect_all`) and stored. `data_dir` is where the cache may go when no user cache folder is writable."""
    if not paths:
        return {}
    keys = [file_key(path) for path in paths]
    store = FactsCache(cache_location(data_dir))
    try:
        known = store.load([key[0] for key in keys])
        found: dict[int, FileFacts] = {}
        for i, (absolute, size, mtime) in enumerate(keys):
            hit = known.get(absolute)
            if hit is not None and hit[:2] == (size, mtime) and size >= 0:
                found[i] = hit[2]
        missing = [i for i in range(len(paths)) if i not in found]
        if missing:
            found.update(zip(missing, inspect_all([paths[i] for i in missing], num_threads), strict=True))
            store.store([(*keys[i], found[i]) for i in missing if keys[i][1] >= 0])
            log.info(
                "Checked %d new or changed images (%d unchanged, from %s)",
                len(missing), len(paths) - len(missing), store.location or "no cache",
            )  # fmt: skip
    finally:
        store.close()
    return {path: found[i] for i, path in enumerate(paths)}
