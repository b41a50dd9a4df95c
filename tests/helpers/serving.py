"""Helpers for the serving tests and benchmark: a tiny trained checkpoint, image bytes good and bad, a server
subprocess on a free loopback port, and Prometheus samples."""

from __future__ import annotations

import io
import os
import resource
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import httpx
import numpy as np
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.attacks import sixteen_bit_png as sixteen_bit_png  # re-exported: the tests' 16-bit PNGs

REPO = Path(__file__).resolve().parents[2]


def encoded(image: Image.Image, format: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **kwargs)
    return buffer.getvalue()


def noise(size: int = 64, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def png_bomb(width: int = 30000, height: int = 30000) -> bytes:
    """A PNG of a few hundred bytes whose header claims width x height grey pixels (the rows are zeros)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    rows = zlib.compress(b"\x00" * (width + 1) * 16, 9)  # the first 16 rows; the rest would follow in a real file
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(
    model: Path, *flags: str, env: dict | None = None, timeout_s: float = 120, open_files: int | None = None
) -> tuple[subprocess.Popen, str]:
    """`python -m classifier serve` on a free loopback port, once /ready answers; (process, base URL). With
    `open_files`, the server may open that many files at most (`ulimit -n`)."""
    port = free_port()
    command = [sys.executable, "-m", "classifier", "serve", "--model", str(model), "--port", str(port), *flags]
    environment = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}

    def limit_files() -> None:
        if open_files is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, open_files))

    process = subprocess.Popen(
        command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, preexec_fn=limit_files
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}: {process.stdout.read()[-3000:]}")
        try:
            if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"the server was not ready within {timeout_s} s: {process.stdout.read()[-3000:]}")


def served(model: Path, image: Path) -> dict:
    """`classifier serve`'s answer to one image POSTed to /predict, the server started for it and stopped after."""
    server, url = start_server(model)
    try:
        answer = httpx.post(f"{url}/predict", files=[("files", (image.name, image.read_bytes()))], timeout=30).json()
    finally:
        server.terminate()
        server.wait(timeout=30)
    (result,) = answer["results"]
    return result


def rss_bytes(pid: int, field: str = "VmRSS") -> int:
    """A process's resident memory now (VmRSS), or at its peak so far (VmHWM), from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise LookupError(f"no {field} in /proc/{pid}/status")


def sample(metrics_text: str, name: str, **labels: str) -> float:
    """One sample's value from Prometheus text; 0 when absent."""
    for family in text_string_to_metric_families(metrics_text):
        for item in family.samples:
            if item.name == name and all(item.labels.get(key) == value for key, value in labels.items()):
                return item.value
    return 0.0
