"""What reaches the handler: the API key, then a cap on requests in flight (one more is refused before its body is
read) and a deadline for each. Plain ASGI middleware, so that a refused body is never read."""

from __future__ import annotations

import asyncio
import hmac
import logging
import math

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from classifier.serve.metrics import ServeMetrics

log = logging.getLogger(__name__)
OPEN_ROUTES = frozenset({"/", "/health", "/ready", "/metrics"})  # the page, probes and scrapers need no key
RETRY_AFTER_S = 1


class ApiKey:
    """With a key set, every route but the probes' needs `Authorization: Bearer <key>`; 401 otherwise."""

    def __init__(self, app: ASGIApp, key: str) -> None:
        self.app, self.expected = app, f"Bearer {key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_ROUTES:
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"authorization", b"")
        if hmac.compare_digest(given, self.expected):  # in constant time: the key is not guessed byte by byte
            await self.app(scope, receive, send)
            return
        headers = {"WWW-Authenticate": "Bearer"}
        await JSONResponse({"error": "send the API key: Authorization: Bearer <key>"}, 401, headers)(
            scope, receive, send
        )


class Admission:
    """At most `max_concurrency` requests to `path` in flight: one more gets 503 with Retry-After at once, before its
    body is read. Each admitted request is answered within `timeout_s`, with 504 if the work is not done by then."""

    def __init__(
        self, app: ASGIApp, metrics: ServeMetrics, max_concurrency: int, timeout_s: float, path: str = "/predict"
    ) -> None:
        self.app, self.metrics, self.path = app, metrics, path
        self.max_concurrency, self.timeout_s = max_concurrency, timeout_s
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != self.path:
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.max_concurrency:
            self.metrics.refused.labels("busy").inc()
            message = f"{self.in_flight} requests are in flight, the most this server takes; try again shortly"
            busy = JSONResponse({"error": message}, 503, {"Retry-After": str(RETRY_AFTER_S)})
            await busy(scope, receive, send)
            return
        self.in_flight += 1
        started = False

        async def send_and_note(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await asyncio.wait_for(self.app(scope, receive, send_and_note), self.timeout_s)
        except asyncio.TimeoutError:
            self.metrics.refused.labels("deadline").inc()
            log.warning("A request to %s was not answered within %g s: 504", self.path, self.timeout_s)
            if not started:
                message = f"the request was not answered within {self.timeout_s:g} s"
                headers = {"Retry-After": str(math.ceil(self.timeout_s))}
                await JSONResponse({"error": message}, 504, headers)(scope, receive, send)
        finally:
            self.in_flight -= 1
