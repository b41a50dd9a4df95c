"""Reading uploads safely: the body's size is counted while it arrives, the type is read from the bytes, the pixel
count from the header, and only then is an image decoded. Torch-free."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from dataclasses import dataclass

from PIL import Image
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

ALLOWED_TYPES = ("JPEG", "PNG", "WEBP", "BMP", "TIFF")
# leading bytes of each allowed type; WebP is RIFF....WEBP, checked apart
SIGNATURES = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)
MAX_FORM_FIELDS = 8  # fields that are not files are ignored, but never parsed without end
RAW_BODY_NAME = "body"


class Refused(Exception):
    """An upload the server will not classify: an HTTP status, a metric reason and a message for the client."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message


@dataclass
class Upload:
    name: str
    data: bytes


async def read_uploads(request: Request, max_bytes: int, max_files: int, read_timeout_s: float) -> list[Upload]:
    """The request's images: each file part of a multipart form (field `files`), or the raw body as one image."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise Refused(413, "too_large", f"the request body is {int(declared)} bytes; the limit is {max_bytes}")
    try:
        return await asyncio.wait_for(_read(request, max_bytes, max_files), read_timeout_s)
    except asyncio.TimeoutError:
        raise Refused(408, "read_timeout", f"the request body did not arrive within {read_timeout_s:g} s") from None


async def _read(request: Request, max_bytes: int, max_files: int) -> list[Upload]:
    stream = _limited(request.stream(), max_bytes)
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        return [Upload(RAW_BODY_NAME, b"".join([chunk async for chunk in stream]))]
    parser = MultiPartParser(request.headers, stream, max_files=max_files, max_fields=MAX_FORM_FIELDS)
    try:
        form = await parser.parse()
    except MultiPartException as error:
        if error.message.startswith("Too many files"):
            raise Refused(413, "too_many_files", f"at most {max_files} files per request") from None
        raise Refused(400, "bad_form", f"the multipart form cannot be read: {error.message}") from None
    try:
        files = [value for key, value in form.multi_items() if key == "files" and isinstance(value, UploadFile)]
        if not files:
            raise Refused(400, "no_files", "the form has no files: send images in the field `files`")
        return [Upload(upload.filename or f"file{index}", await upload.read()) for index, upload in enumerate(files)]
    finally:
        await form.close()


async def _limited(stream: AsyncIterator[bytes], max_bytes: int) -> AsyncIterator[bytes]:
    """The body, refused as soon as it passes `max_bytes` (a chunked body declares no length)."""
    received = 0
    async for chunk in stream:
        received += len(chunk)
        if received > max_bytes:
            raise Refused(413, "too_large", f"the request body is over the limit of {max_bytes} bytes")
        yield chunk


def sniff(data: bytes) -> str | None:
    """The image type the bytes start with, whatever the file is called; None for anything else."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return next((kind for signature, kind in SIGNATURES if data.startswith(signature)), None)


def decode(upload: Upload, max_pixels: int, allowed: tuple[str, ...] = ALLOWED_TYPES) -> Image.Image:
    """The decoded image, once its type and its header's pixel count are known to be within the limits."""
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
    try:
        image.load()
    except Exception as error:  # noqa: BLE001 - truncated or corrupt data
        raise Refused(422, "undecodable", f"{upload.name} cannot be decoded: {error}") from None
    return image
