"""Decoding uploads within a memory budget: the type is read from the bytes and the pixel count from the header, then
each decode waits until the memory it will take fits the budget that every decode in flight shares, and runs on a
thread pool sized to the cores. Torch-free."""

from __future__ import annotations

import asyncio
import ctypes
import io
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from PIL import Image

from classifier.core.imageio import SIXTEEN_BIT_MODES

ALLOWED_TYPES = ("JPEG", "PNG", "WEBP", "BMP")
TIFF = "TIFF"  # opt-in (`--allow_tiff`): its decoder reads many layouts and codecs, a wide surface for hostile files
# leading bytes of each type; WebP is RIFF....WEBP, checked apart
SIGNATURES = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"BM", "BMP"),
    (b"II*\x00", TIFF),
    (b"MM\x00*", TIFF),
)
# bytes per pixel that Pillow holds a decoded image in: one 8-bit band in 1, 16-bit grey in 2, the rest in 4
DECODED_BYTES = {"1": 1, "L": 1, "P": 1, **dict.fromkeys(SIXTEEN_BIT_MODES, 2)}
RGB_BYTES = 4  # the upright RGB copy (Pillow pads RGB to 4 bytes a pixel)
WIDE_BYTES = 6  # 16-bit, 32-bit and float grey to 8 bits: an int32 copy, then 8-bit grey, before the RGB copy
ALPHA_BYTES = 8  # an RGBA copy and the white background it is composited on
TRIM_ABOVE = 32 << 20  # after a decode this large, give the freed memory back to the system
T = TypeVar("T")


class Refused(Exception):
    """An upload the server will not classify: an HTTP status, a metric reason and a message for the client."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message


@dataclass
class Upload:
    name: str
    data: bytes


@dataclass
class Inspected:
    """An upload whose header is read and within the limits: its lazily opened image and what decoding will cost."""

    upload: Upload
    image: Image.Image
    pixels: int
    memory: int


def sniff(data: bytes) -> str | None:
    """The image type the bytes start with, whatever the file is called; None for anything else."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return next((kind for signature, kind in SIGNATURES if data.startswith(signature)), None)


def decoding_memory(mode: str, pixels: int, transparent: bool = False) -> int:
    """The bytes that decoding an image of `mode` to upright RGB holds at its peak (`core.imageio.to_rgb`)."""
    per_pixel = DECODED_BYTES.get(mode, 4) + RGB_BYTES
    if mode in SIXTEEN_BIT_MODES or mode in ("I", "F"):
        per_pixel += WIDE_BYTES
    if transparent or "A" in mode or mode in ("La", "RGBa"):
        per_pixel += ALPHA_BYTES
    return pixels * per_pixel


def inspect(upload: Upload, max_pixels: int, allowed: tuple[str, ...] = ALLOWED_TYPES) -> Inspected:
    """The upload's header, read without decoding: refused here when its type or its pixel count is not allowed."""
    kind = sniff(upload.data)
    if kind not in allowed:
        raise Refused(
            415, "unsupported_type", f"{upload.name} is not an image of an allowed type ({', '.join(allowed)})"
        )
    try:
        image = Image.open(io.BytesIO(upload.data), formats=[kind])  # reads the header only
    except Image.DecompressionBombError:
        raise Refused(413, "too_many_pixels", f"{upload.name} claims too many pixels to decode safely") from None
    except Exception as error:  # noqa: BLE001 - any header the decoder rejects is a bad upload, not a server error
        raise Refused(422, "undecodable", f"{upload.name} cannot be read as {kind}: {error}") from None
    width, height = image.size
    if width * height > max_pixels:
        raise Refused(413, "too_many_pixels", f"{upload.name} is {width}x{height} pixels; the limit is {max_pixels}")
    memory = decoding_memory(image.mode, width * height, "transparency" in image.info)
    return Inspected(upload, image, width * height, memory)


def decode(inspected: Inspected) -> Image.Image:
    """The decoded image of an inspected upload; truncated or corrupt data is the upload's fault (422)."""
    try:
        inspected.image.load()
    except Exception as error:  # noqa: BLE001 - truncated or corrupt data
        raise Refused(422, "undecodable", f"{inspected.upload.name} cannot be decoded: {error}") from None
    return inspected.image


class DecodePool:
    """Decodes on `workers` threads (the cores, by default), admitting each only while the memory it will take fits
    `memory_budget`, which the decodes of every request in flight share: a burst of large images waits its turn
    instead of multiplying the server's memory."""

    def __init__(self, memory_budget: int, workers: int | None = None) -> None:
        self.memory_budget = memory_budget
        self.in_use = 0
        self._executor = ThreadPoolExecutor(workers or os.cpu_count() or 1, thread_name_prefix="decode")
        self._freed: asyncio.Condition | None = None  # made in the event loop that first uses it

    async def run(self, memory: int, work: Callable[[], T]) -> T:
        """`work()` on the pool once `memory` bytes of the budget are free."""
        if memory > self.memory_budget:
            raise Refused(
                413,
                "too_many_pixels",
                f"decoding it takes about {memory >> 20} MiB; the limit is {self.memory_budget >> 20} MiB",
            )
        self._freed = self._freed or asyncio.Condition()
        async with self._freed:
            await self._freed.wait_for(lambda: self.in_use + memory <= self.memory_budget)
            self.in_use += memory
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, self._release_after, memory, work)
        finally:
            async with self._freed:
                self.in_use -= memory
                self._freed.notify_all()

    @staticmethod
    def _release_after(memory: int, work: Callable[[], T]) -> T:
        try:
            return work()
        finally:
            if memory > TRIM_ABOVE:
                release_freed_memory()

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def release_freed_memory() -> None:
    """Hand the heap's free pages back to the system (glibc's malloc_trim): without it, the memory of one large
    decode stays with the process after the image is gone. Elsewhere, nothing to do."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, from the symbols the process already has loaded (no library search at start-up)."""
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


_MALLOC_TRIM = _malloc_trim()
