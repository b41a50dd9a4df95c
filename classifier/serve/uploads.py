"""Reading uploads safely: the body's size is counted while it arrives, a form's files and fields are capped, and a
body that does not arrive in time is refused. Torch-free."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

from classifier.serve.decoding import Refused, Upload

MAX_FORM_FIELDS = 8  # fields that are not files are ignored, but never parsed without end
RAW_BODY_NAME = "body"


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
