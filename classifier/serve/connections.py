"""Connection limits that uvicorn does not give: a deadline for a request's headers (a socket that sends nothing, or
a header every few seconds, is closed), a cap on their size (431), and a cap on open connections (a socket over it
is answered 503 and closed), so that idle sockets cannot use up the process's file descriptors.

uvicorn's h11 protocol, extended: httptools (uvicorn's default when installed) parses headers of any size in C and
offers no hook to bound them, while h11 keeps the unparsed bytes where they can be counted. Parsing in Python costs
microseconds a request; the model's milliseconds dwarf them."""

from __future__ import annotations

import asyncio
import logging
import resource
from dataclasses import dataclass

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)
RESERVED_DESCRIPTORS = 64  # for the model, logs, and the files a request opens
LINGER_S = 2.0  # after refusing, read and drop what the client still sends, then close: closing with unread bytes
# sends a reset, which makes the client's system discard the answer before it is read


def default_max_connections() -> int:
    """As many connections as the process may open files for, less a reserve; at most 4096."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 4096
    return max(8, min(4096, soft - RESERVED_DESCRIPTORS))


@dataclass
class ConnectionLimits:
    header_timeout_s: float = 10.0
    max_header_bytes: int = 16_384
    max_connections: int | None = None  # None: the file-descriptor limit, less those reserved, read once here

    def __post_init__(self) -> None:
        if self.max_connections is None:
            self.max_connections = default_max_connections()


LIMITS = ConnectionLimits()


def configure(limits: ConnectionLimits) -> None:
    """The limits of every connection this process accepts from now on."""
    global LIMITS
    LIMITS = limits


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with `LIMITS`: each request's headers must arrive within `header_timeout_s` of the
    connection (or of the previous response) and within `max_header_bytes`."""

    _header_timer: asyncio.TimerHandle | None = None
    _refused = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > LIMITS.max_connections:
            log.warning("%d connections are open, the most allowed: one more refused", len(self.connections) - 1)
            self._refuse("503 Service Unavailable", "retry-after: 1")
            return
        self._await_headers()

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # dropped while the connection lingers
        if self.conn.their_state is h11.IDLE:  # between requests, or inside a request's headers
            pending, _ = self.conn.trailing_data
            buffered = pending + data  # the headers so far, and perhaps the start of the body
            end = buffered.find(b"\r\n\r\n")
            if (end if end >= 0 else len(buffered)) > LIMITS.max_header_bytes:
                self._refuse("431 Request Header Fields Too Large")
                return
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self._cancel_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._await_headers()  # the next request's headers, on a kept-alive connection

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def _await_headers(self) -> None:
        self._cancel_header_timer()
        self._header_timer = self.loop.call_later(LIMITS.header_timeout_s, self._headers_too_slow)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self._refuse("408 Request Timeout")

    def _refuse(self, status: str, *headers: str) -> None:
        """Answer with an empty response, for a connection that never got as far as the app, and close it."""
        self._cancel_header_timer()
        self._refused = True
        lines = [f"HTTP/1.1 {status}", "content-length: 0", "connection: close", *headers]
        self.transport.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER_S, self.transport.close)
