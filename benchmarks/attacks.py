"""The hostile mix of `benchmarks/serving.py`: while well-formed requests keep coming, clients send images that
decode to the most memory the limits allow, sockets that trickle their headers, and a flood of requests over
`--max_concurrency`. What is measured: the well-formed requests' p99 latency against the same load alone, what the
server refused (by status), and its peak resident memory."""

from __future__ import annotations

import asyncio
import io
import time
from collections import Counter
from collections.abc import Awaitable, Callable

import httpx
import numpy as np
from PIL import Image

from classifier.serve.app import MIN_MAX_PIXELS

SLOW_SOCKETS = 200
FLOOD_CLIENTS = 96  # over the default --max_concurrency of 64
BOMB_CLIENTS = 2


def sixteen_bit_png(side: int) -> bytes:
    """A grey 16-bit PNG of side x side pixels: a few dozen KB that decode to 2 bytes a pixel."""
    ramp = (np.arange(side, dtype=np.uint32) * 65535 // max(side - 1, 1)).astype(np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(np.broadcast_to(ramp, (side, side)).copy()).save(buffer, format="PNG")
    return buffer.getvalue()


def largest_allowed_bomb() -> bytes:
    """A 16-bit PNG at the default per-image pixel limit: it decodes to 16 MP x 12 bytes on its way to RGB."""
    return sixteen_bit_png(int(MIN_MAX_PIXELS**0.5))


async def slow_sockets(url: str, count: int, until: asyncio.Event, statuses: Counter) -> None:
    """`count` connections that send a header line every 2 s, never finishing; each reopened when closed."""
    host, port = url.removeprefix("http://").split(":")

    async def one(index: int) -> None:
        while not until.is_set():
            try:
                reader, writer = await asyncio.open_connection(host, int(port))
                writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n")
                while not until.is_set():
                    await asyncio.sleep(2)
                    writer.write(f"X-Slow-{index}: 1\r\n".encode())
                    await writer.drain()
            except (ConnectionError, OSError):
                statuses["slow_socket_closed"] += 1
                await asyncio.sleep(0.5)

    tasks = [asyncio.create_task(one(index)) for index in range(count)]
    await until.wait()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def repeatedly(clients: int, until: asyncio.Event, send: Callable[[httpx.AsyncClient], Awaitable]) -> None:
    async def one() -> None:
        async with httpx.AsyncClient(timeout=60) as http:
            while not until.is_set():
                await send(http)

    await asyncio.gather(*(one() for _ in range(clients)))


async def attack_while(url: str, well_formed: Callable[[], Awaitable[dict]], image: bytes) -> dict:
    """`well_formed()` (a load of good requests) run beside the attackers; its figures and what the attack met."""
    until, statuses = asyncio.Event(), Counter()
    bomb = largest_allowed_bomb()

    def sender(content: bytes, kind: str) -> Callable[[httpx.AsyncClient], Awaitable]:
        async def send(http: httpx.AsyncClient) -> None:
            try:
                response = await http.post(f"{url}/predict", content=content)
                statuses[f"{kind}_{response.status_code}"] += 1
            except httpx.HTTPError as error:
                statuses[f"{kind}_{type(error).__name__}"] += 1

        return send

    started = time.perf_counter()
    attackers = asyncio.gather(
        slow_sockets(url, SLOW_SOCKETS, until, statuses),
        repeatedly(FLOOD_CLIENTS, until, sender(image, "flood")),
        repeatedly(BOMB_CLIENTS, until, sender(bomb, "bomb")),
    )
    await asyncio.sleep(1)  # the attack under way first
    figures = await well_formed()
    until.set()
    await attackers
    return {"well_formed": figures, "attack_s": time.perf_counter() - started, "attackers_met": dict(statuses)}
