"""The FastAPI app: `/predict`, `/health`, `/ready`, `/info`, `/metrics` and the try-it page at `/`.

Each image's answer holds its top-k classes; a multi-label model's also holds its `labels`: every label whose
probability is at or over the model's threshold for it, with both. A model calibrated with a rejection threshold
(`classifier calibrate`) also says whether the image is `unknown` (its `ood_score` below the threshold; multi-label,
with no label either), and a single-label one its `prediction`: the top class, or "unknown"."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from importlib import resources
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

from classifier.deploy.inputs import UNKNOWN, decide, rejected
from classifier.serve.admission import Admission, ApiKey
from classifier.serve.backends import Backend, describe
from classifier.serve.batcher import BatcherStopped, MicroBatcher, QueueFull
from classifier.serve.decoding import ALLOWED_TYPES, TIFF, DecodePool, Inspected, Refused, Upload, decode, inspect
from classifier.serve.metrics import ServeMetrics
from classifier.serve.uploads import read_uploads

log = logging.getLogger(__name__)
ROUTES = frozenset({"/", "/predict", "/health", "/ready", "/info", "/metrics"})
CLIENT_GONE = 499  # nginx's code for a client that closed the connection before its answer
MIN_MAX_PIXELS = 4096 * 4096  # the default per-image limit, at least: a 12 MP phone photo fits
PIXELS_PER_INPUT = 256  # ... or this many times the model's input, for a model of large inputs


def default_max_pixels(input_size: list[int] | tuple[int, ...]) -> int:
    """A per-image pixel limit that fits the model: a 224 px model needs no 40 MP image."""
    return max(MIN_MAX_PIXELS, PIXELS_PER_INPUT * input_size[-1] * input_size[-2])


def create_app(
    backend: Backend,
    max_batch_size: int = 16,
    batch_timeout_ms: float = 5.0,
    max_bytes: int = 10_000_000,
    max_pixels: int | None = None,
    max_request_pixels: int | None = None,
    decode_memory: int = 512 << 20,
    max_files: int = 32,
    topk: int = 5,
    max_queue: int = 1024,
    read_timeout_s: float = 30.0,
    max_concurrency: int = 64,
    request_timeout_s: float = 30.0,
    api_key: str | None = None,
    allowed_hosts: list[str] | None = None,
    allow_tiff: bool = False,
) -> FastAPI:
    """An app serving `backend`; the batcher starts and the model warms up in the app's lifespan. `max_pixels`
    (per image) defaults to `default_max_pixels` of the model's input, and `max_request_pixels` to four times that."""
    max_pixels = max_pixels or default_max_pixels(backend.preprocessing["input_size"])
    max_request_pixels = max_request_pixels or 4 * max_pixels
    allowed = (*ALLOWED_TYPES, TIFF) if allow_tiff else ALLOWED_TYPES
    metrics = ServeMetrics()
    decoder = DecodePool(decode_memory)
    batcher = MicroBatcher(
        backend.scored_batch if backend.rejection else backend.predict_batch,  # the scores only where they decide
        max_batch_size,
        batch_timeout_ms,
        max_queue,
        on_batch=metrics.observe_batch,
        on_queue=metrics.queue_depth.set,
    )
    topk = min(topk, len(backend.class_names))
    info = {
        **describe(backend),
        "topk": topk,
        "limits": {
            "max_bytes": max_bytes,
            "max_pixels": max_pixels,
            "max_request_pixels": max_request_pixels,
            "decode_memory": decode_memory,
            "max_files": max_files,
            "max_concurrency": max_concurrency,
            "request_timeout_s": request_timeout_s,
            "types": list(allowed),
        },
        "batching": {"max_batch_size": max_batch_size, "batch_timeout_ms": batch_timeout_ms},
    }
    state = {"ready": False}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await batcher.start()
        await asyncio.to_thread(warm_up, backend)
        state["ready"] = True
        log.info("Serving %s (%s): ready", backend.path, backend.name)
        try:
            yield
        finally:
            state["ready"] = False
            await batcher.stop()
            decoder.shutdown()

    app = FastAPI(title="classifier", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    # outermost last: metrics see every request; then hosts, the key, and admission before any body is read
    app.add_middleware(Admission, metrics=metrics, max_concurrency=max_concurrency, timeout_s=request_timeout_s)
    if api_key:
        app.add_middleware(ApiKey, key=api_key)
    if allowed_hosts:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts)
    app.add_middleware(RequestMetrics, metrics=metrics)

    def prepare(inspected: Inspected) -> np.ndarray:
        try:  # a decode error is the upload's (422); a preprocessing error the server's (500)
            return backend.preprocess(decode(inspected))
        finally:
            inspected.image.close()  # its pixels freed now, before the decode pool hands memory back

    def failed(upload: Upload, code: int, message: str) -> dict[str, Any]:
        return {"file": upload.name, "status": "error", "code": code, "error": message}

    async def classify(item: Inspected | Refused, upload: Upload) -> dict[str, Any]:
        try:
            if isinstance(item, Refused):  # at its header: counted and answered as the refusals below
                raise item
            pixels = await decoder.run(item.memory, lambda: prepare(item))
            output = await batcher.predict(pixels)
        except Refused as refused:
            metrics.refused.labels(refused.reason).inc()
            return failed(upload, refused.status, refused.message)
        except QueueFull as error:
            metrics.refused.labels("queue_full").inc()
            return failed(upload, 503, str(error))
        except BatcherStopped as error:
            return failed(upload, 503, str(error))
        except Exception:  # noqa: BLE001 - logged; the client gets a 500 for this file and the server goes on
            log.exception("Preprocessing or inference failed for %s", upload.name)
            return failed(upload, 500, "the server failed on this image")
        probabilities, score = output if backend.rejection else (output, None)
        order = np.argsort(-probabilities, kind="stable")[:topk]
        top = [{"class": backend.class_names[i], "probability": float(probabilities[i])} for i in order]
        answer = {"file": upload.name, "status": "ok"}
        if backend.rejection:
            answer |= verdict(probabilities, score, backend)
        answer["top"] = top
        if backend.thresholds is not None:
            answer["labels"] = labels(probabilities, backend.class_names, backend.thresholds)
        return answer

    @app.post("/predict")
    async def predict(request: Request) -> Response:
        """Top-k classes (a multi-label model's labels; a rejecting model's decision and score) for each file of a
        multipart upload (field `files`), or for a raw image body."""
        if not state["ready"]:
            return JSONResponse({"error": "the model is still loading"}, status_code=503)
        try:
            uploads = await read_uploads(request, max_bytes, max_files, read_timeout_s)
        except Refused as refused:
            metrics.refused.labels(refused.reason).inc()
            return JSONResponse({"error": refused.message}, status_code=refused.status)
        except ClientDisconnect:
            return JSONResponse({"error": "the client closed the connection"}, status_code=CLIENT_GONE)
        inspected = [inspected_or_refused(upload, max_pixels, allowed) for upload in uploads]
        pixels = sum(item.pixels for item in inspected if isinstance(item, Inspected))
        if pixels > max_request_pixels:  # refused whole, before anything is decoded
            metrics.refused.labels("too_many_pixels").inc()
            message = f"the request's images hold {pixels} pixels; the limit is {max_request_pixels}"
            return JSONResponse({"error": message}, status_code=413)
        work = asyncio.gather(*map(classify, inspected, uploads))
        results = await until_disconnected(work, request.receive)
        if results is None:
            return JSONResponse({"error": "the client closed the connection"}, status_code=CLIENT_GONE)
        status = results[0].get("code", 200) if len(results) == 1 else 200
        return JSONResponse({"results": results}, status_code=status)

    @app.get("/health")
    async def health() -> Response:
        """Liveness: the process answers, and its inference loop runs (a dead one needs a restart)."""
        if not batcher.alive:
            return JSONResponse({"status": "failed", "error": repr(batcher.failure)}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/ready")
    async def ready() -> Response:
        """Readiness: the model is loaded and has run once, and the inference loop runs."""
        if not batcher.alive:
            return JSONResponse({"status": "failed", "error": repr(batcher.failure)}, status_code=503)
        if state["ready"]:
            return JSONResponse({"status": "ready"})
        return JSONResponse({"status": "loading"}, status_code=503)

    @app.get("/info")
    async def model_info() -> dict[str, Any]:
        """Class names, the task and thresholds, preprocessing, the model file's hash, the backend, test metrics,
        limits and batching."""
        return info

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    page = resources.files("classifier.serve").joinpath("page.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse)
    async def try_it() -> str:
        """A page to drop an image on and see its top classes."""
        return page

    return app


def labels(probabilities: np.ndarray, class_names: list[str], thresholds: np.ndarray) -> list[dict[str, Any]]:
    """A multi-label answer's labels, in class order: each label at or over its threshold, with its probability and
    that threshold (as `OnnxPredictor.classify` and `Predictor.classify` decide)."""
    (given,) = decide(probabilities[None], thresholds)
    return [
        {"label": class_names[i], "probability": float(probabilities[i]), "threshold": float(thresholds[i])}
        for i in np.flatnonzero(given)
    ]


def verdict(probabilities: np.ndarray, score: np.floating, backend: Backend) -> dict[str, Any]:
    """A rejecting model's decision on one image: single-label, its `prediction` (the top class, or "unknown");
    whether it is `unknown`; and its `ood_score` (as `OnnxPredictor.classify` and `Predictor.classify` decide)."""
    chosen = decide(probabilities[None], backend.thresholds)
    (unknown,) = rejected(chosen, np.array([score]), backend.rejection)
    answer: dict[str, Any] = {}
    if backend.thresholds is None:
        answer["prediction"] = UNKNOWN if unknown else backend.class_names[int(chosen[0])]
    return answer | {"unknown": bool(unknown), "ood_score": float(score)}


def warm_up(backend: Backend) -> None:
    """One image through preprocessing and the model before /ready says so: a model the server cannot preprocess
    for stops it here, not on every request."""
    _, height, width = backend.preprocessing["input_size"]
    image = Image.new("RGB", (width * 2, height + 1), (127, 127, 127))  # resized and cropped, as uploads are
    backend.predict_batch(np.stack([backend.preprocess(image)]))


def inspected_or_refused(upload: Upload, max_pixels: int, allowed: tuple[str, ...]) -> Inspected | Refused:
    try:
        return inspect(upload, max_pixels, allowed)
    except Refused as refused:
        return refused


async def until_disconnected(work: Awaitable, receive: Receive) -> Any:
    """`work`'s result, or None (and `work` cancelled, freeing its batch slots) if the client disconnects first."""
    work = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnect(receive))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if work.done():
        return work.result()
    work.cancel()
    await asyncio.gather(work, return_exceptions=True)
    return None


async def _disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class RequestMetrics:
    """Counts each request by route and status, and times it (plain ASGI: the body stream stays untouched)."""

    def __init__(self, app: ASGIApp, metrics: ServeMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = scope["path"] if scope["path"] in ROUTES else "other"
        status = 500
        started = time.perf_counter()

        async def send_and_record(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.request_latency.labels(route).observe(time.perf_counter() - started)
