"""The FastAPI app: `/predict`, `/health`, `/ready`, `/info`, `/metrics` and the try-it page at `/`."""

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
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

from classifier.serve.backends import Backend, describe
from classifier.serve.batcher import MicroBatcher, QueueFull
from classifier.serve.metrics import ServeMetrics
from classifier.serve.uploads import Refused, Upload, decode, read_uploads

log = logging.getLogger(__name__)
ROUTES = frozenset({"/", "/predict", "/health", "/ready", "/info", "/metrics"})
CLIENT_GONE = 499  # nginx's code for a client that closed the connection before its answer


def create_app(
    backend: Backend,
    max_batch_size: int = 16,
    batch_timeout_ms: float = 5.0,
    max_bytes: int = 10_000_000,
    max_pixels: int = 40_000_000,
    max_files: int = 32,
    topk: int = 5,
    max_queue: int = 1024,
    read_timeout_s: float = 30.0,
) -> FastAPI:
    """An app serving `backend`; the batcher starts and the model warms up in the app's lifespan."""
    metrics = ServeMetrics()
    batcher = MicroBatcher(
        backend.predict_batch,
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
        "limits": {"max_bytes": max_bytes, "max_pixels": max_pixels, "max_files": max_files},
        "batching": {"max_batch_size": max_batch_size, "batch_timeout_ms": batch_timeout_ms},
    }
    state = {"ready": False}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await batcher.start()
        warmup = np.zeros((1, *backend.preprocessing["input_size"]), dtype=np.uint8)
        await asyncio.to_thread(backend.predict_batch, warmup)
        state["ready"] = True
        log.info("Serving %s (%s): ready", backend.path, backend.name)
        try:
            yield
        finally:
            state["ready"] = False
            await batcher.stop()

    app = FastAPI(title="classifier", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(RequestMetrics, metrics=metrics)

    def prepare(upload: Upload) -> np.ndarray:
        image = decode(upload, max_pixels)
        try:
            return backend.preprocess(image)
        except Exception as error:  # noqa: BLE001 - an image the preprocessing cannot convert is the upload's fault
            raise Refused(422, "undecodable", f"{upload.name} cannot be converted to RGB: {error}") from None

    async def classify(upload: Upload) -> dict[str, Any]:
        try:
            probabilities = await batcher.predict(await asyncio.to_thread(prepare, upload))
        except Refused as refused:
            metrics.refused.labels(refused.reason).inc()
            return {"file": upload.name, "status": "error", "code": refused.status, "error": refused.message}
        except QueueFull as error:
            metrics.refused.labels("queue_full").inc()
            return {"file": upload.name, "status": "error", "code": 503, "error": str(error)}
        except Exception:  # noqa: BLE001 - logged; the client gets a 500 for this file and the server goes on
            log.exception("Inference failed for %s", upload.name)
            return {"file": upload.name, "status": "error", "code": 500, "error": "inference failed"}
        order = np.argsort(-probabilities, kind="stable")[:topk]
        top = [{"class": backend.class_names[i], "probability": float(probabilities[i])} for i in order]
        return {"file": upload.name, "status": "ok", "top": top}

    @app.post("/predict")
    async def predict(request: Request) -> Response:
        """Top-k classes for each file of a multipart upload (field `files`), or for a raw image body."""
        if not state["ready"]:
            return JSONResponse({"error": "the model is still loading"}, status_code=503)
        try:
            uploads = await read_uploads(request, max_bytes, max_files, read_timeout_s)
        except Refused as refused:
            metrics.refused.labels(refused.reason).inc()
            return JSONResponse({"error": refused.message}, status_code=refused.status)
        except ClientDisconnect:
            return JSONResponse({"error": "the client closed the connection"}, status_code=CLIENT_GONE)
        results = await until_disconnected(asyncio.gather(*map(classify, uploads)), request.receive)
        if results is None:
            return JSONResponse({"error": "the client closed the connection"}, status_code=CLIENT_GONE)
        status = results[0].get("code", 200) if len(results) == 1 else 200
        return JSONResponse({"results": results}, status_code=status)

    @app.get("/health")
    async def health() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> Response:
        """Readiness: the model is loaded and has run once."""
        if state["ready"]:
            return JSONResponse({"status": "ready"})
        return JSONResponse({"status": "loading"}, status_code=503)

    @app.get("/info")
    async def model_info() -> dict[str, Any]:
        """Class names, preprocessing, the model file's hash, the backend, test metrics, limits and batching."""
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
