"""`classifier serve` under hostile load, driven over sockets as an attacker or an overloaded client would: images
that decode to gigabytes, slow and oversized headers, idle sockets past the process's file limit, floods over
`--max_concurrency`, requests without the API key; and the server's own faults (a dead inference loop, a model it
cannot preprocess for), which are never blamed on the upload."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest
import torch

from classifier import cli_main
from classifier.commands.serve import parser
from classifier.deploy.preprocess import METADATA_KEY
from classifier.serve.app import create_app
from classifier.serve.backends import load_backend
from classifier.serve.batcher import MicroBatcher
from tests.helpers import classifier_here
from tests.helpers.serving import encoded, noise, rss_bytes, sixteen_bit_png, start_server

GIB = 1 << 30
SIDE = 6320  # 16-bit grey: 40 MP in 80 MB once decoded, from a PNG of a few dozen KB


@pytest.fixture(scope="module")
def onnx_model(trained_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tests' trained checkpoint exported to ONNX: a torch-free server starts in a second or two."""
    folder = tmp_path_factory.mktemp("onnx")
    cli_main(["export", "--ckpt_path", str(trained_checkpoint), "--output", str(folder), "--check", "none"])
    return folder / "model.onnx"


@contextmanager
def server(model: Path, *flags: str, **options) -> Iterator[tuple[subprocess.Popen, str]]:
    process, url = start_server(model, *flags, **options)
    try:
        yield process, url
    finally:
        process.kill()
        process.wait(timeout=30)


def files(*images: bytes, name: str = "x.png") -> list[tuple[str, tuple[str, bytes]]]:
    return [("files", (f"{i}-{name}", data)) for i, data in enumerate(images)]


def raw_socket(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def answer(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (b"" if it closed without a word)."""
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received


@pytest.mark.slow
def test_large_16_bit_images_within_the_limits_keep_memory_bounded_and_return_it(onnx_model: Path) -> None:
    """Four 40 MP 16-bit PNGs of a few dozen KB each, in one request: they took a server to 4.17 GB (float64
    conversion on a pool of up to 32 threads) and left 550 MB behind."""
    png = sixteen_bit_png(SIDE)
    assert len(png) < 200_000
    with server(onnx_model, "--max_pixels", "40000000") as (process, url):
        idle = rss_bytes(process.pid)
        response = httpx.post(f"{url}/predict", files=files(*[png] * 4), timeout=120)
        peak, after = rss_bytes(process.pid, "VmHWM"), rss_bytes(process.pid)
        over = httpx.post(f"{url}/predict", files=files(*[png] * 5), timeout=60)  # 200 MP: over 4 x --max_pixels
    assert response.status_code == 200, response.text
    assert [result["status"] for result in response.json()["results"]] == ["ok"] * 4
    assert peak < 1.5 * GIB, f"peak RSS {peak / GIB:.2f} GiB"
    # one image decoded at a time within --decode_memory's 512 MiB (about 430 MiB each here): two at once, or its
    # float64 conversion, go past it
    assert peak - idle < 600 * (1 << 20), f"{(peak - idle) >> 20} MiB over the idle server at the peak"
    assert after < idle + 200 * (1 << 20), f"{(after - idle) >> 20} MiB kept after the request"
    assert over.status_code == 413 and "the limit is 160000000" in over.json()["error"]


def test_the_pixel_limits_default_to_the_models_input_size(onnx_model: Path) -> None:
    """A 32 px model needs no 40 MP image: the default per-image limit is 16 MP (4096 x 4096)."""
    backend = load_backend(onnx_model)
    app = create_app(backend)
    big = sixteen_bit_png(4100)  # 16.8 MP

    async def scenario() -> tuple[httpx.Response, httpx.Response]:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://serve") as client:
                return await client.post("/predict", files=files(big)), await client.get("/info")

    refused, info = asyncio.run(scenario())
    assert refused.status_code == 413 and "4100x4100 pixels; the limit is 16777216" in refused.text
    limits = info.json()["limits"]
    assert limits["max_pixels"] == 16_777_216 and limits["max_request_pixels"] == 4 * 16_777_216


@pytest.mark.slow
def test_slow_or_huge_headers_and_idle_sockets_past_the_file_limit_cannot_take_the_server_down(
    onnx_model: Path,
) -> None:
    with server(onnx_model, "--header_timeout_s", "1", open_files=256) as (_, url):
        silent = raw_socket(url)  # sends nothing at all
        started = time.monotonic()
        assert answer(silent).startswith(b"HTTP/1.1 408 ")
        assert 0.9 < time.monotonic() - started < 5

        trickle = raw_socket(url)  # a header every 0.4 s: never a complete request
        trickle.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        started = time.monotonic()
        with pytest.raises(OSError):
            for index in range(50):
                time.sleep(0.4)
                trickle.sendall(f"X-Slow-{index}: 1\r\n".encode())
        assert time.monotonic() - started < 5

        huge = raw_socket(url)
        try:
            huge.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"X-Big: " + b"a" * 2_000_000 + b"\r\n\r\n")
        except OSError:  # closed while we sent: the answer is already in our receive buffer
            pass
        assert answer(huge).startswith(b"HTTP/1.1 431 ")

        idle = [raw_socket(url) for _ in range(300)]  # more than the server may open files for
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "/health stayed unreachable"
                time.sleep(0.2)
            assert httpx.post(f"{url}/predict", files=files(encoded(noise(40), "PNG"))).status_code == 200
        finally:
            for sock in idle:
                sock.close()


@pytest.mark.slow
def test_a_request_over_max_concurrency_is_refused_at_once_and_a_slow_one_gets_504(onnx_model: Path) -> None:
    body = encoded(noise(800), "JPEG", quality=100)  # about 1.9 MB
    flags = ["--max_concurrency", "2", "--request_timeout_s", "3", "--max_bytes", "4MB"]
    with server(onnx_model, *flags) as (_, url):
        stalled = []
        for _ in range(2):  # headers and half the body, then nothing: two requests in flight
            sock = raw_socket(url)
            sock.sendall(
                b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body[: len(body) // 2]
            )
            stalled.append((sock, time.monotonic()))
        time.sleep(0.5)
        started = time.monotonic()
        busy = httpx.post(f"{url}/predict", content=body, headers={"Content-Type": "image/jpeg"}, timeout=30)
        waited = time.monotonic() - started
        late = [(answer(sock), time.monotonic() - since) for sock, since in stalled]
        after = httpx.post(f"{url}/predict", content=body, headers={"Content-Type": "image/jpeg"}, timeout=30)
    assert busy.status_code == 503 and busy.headers["Retry-After"] == "1", busy.text
    assert waited < 2.5  # refused before its body was read, not after the stalled ones
    for response, seconds in late:
        assert response.startswith(b"HTTP/1.1 504 "), response[:200]
        assert b"retry-after: 3" in response.lower() and 2.5 < seconds < 10
    assert after.status_code == 200


@pytest.mark.slow
def test_an_api_key_guards_predict_and_info_and_allowed_hosts_refuse_others(onnx_model: Path) -> None:
    png = encoded(noise(40), "PNG")
    key = {"Authorization": "Bearer s3cret"}
    env = {"CLASSIFIER_API_KEY": "s3cret"}
    with server(onnx_model, "--allowed_hosts", "127.0.0.1", env=env) as (_, url):
        anonymous = httpx.post(f"{url}/predict", files=files(png))
        wrong = httpx.post(f"{url}/predict", files=files(png), headers={"Authorization": "Bearer s3cre"})
        keyed = httpx.post(f"{url}/predict", files=files(png), headers=key)
        info = httpx.get(f"{url}/info"), httpx.get(f"{url}/info", headers=key)
        probes = [httpx.get(f"{url}{route}").status_code for route in ("/health", "/ready", "/metrics", "/")]
        rebound = httpx.get(f"{url}/health", headers={"Host": "attacker.example"})
        tiff = httpx.post(f"{url}/predict", files=files(encoded(noise(40), "TIFF"), name="x.tif"), headers=key)
    assert anonymous.status_code == wrong.status_code == 401
    assert anonymous.headers["WWW-Authenticate"] == "Bearer"
    assert keyed.status_code == 200 and keyed.json()["results"][0]["status"] == "ok"
    assert [response.status_code for response in info] == [401, 200]
    assert probes == [200, 200, 200, 200]
    assert rebound.status_code == 400
    assert tiff.status_code == 415 and "(JPEG, PNG, WEBP, BMP)" in tiff.json()["results"][0]["error"]


def test_tiff_is_taken_when_allowed(onnx_model: Path) -> None:
    app = create_app(load_backend(onnx_model), allow_tiff=True)

    async def scenario() -> httpx.Response:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://serve") as client:
                return await client.post("/predict", files=files(encoded(noise(40), "TIFF"), name="x.tif"))

    assert asyncio.run(scenario()).status_code == 200


def test_a_model_the_torch_free_path_cannot_preprocess_for_is_refused_by_export_and_serve(
    onnx_model: Path, trained_checkpoint: Path, tmp_path: Path
) -> None:
    """A crop_mode the torch-free preprocessing does not know (timm's own transform takes any unknown one as
    "center") once made a server answer every image with 422 while /ready was green. Now neither export nor serve
    takes such a model."""
    checkpoint = torch.load(trained_checkpoint, weights_only=True)
    checkpoint["net"]["preprocessing"]["crop_mode"] = "zoom"
    torch.save(checkpoint, zoom := tmp_path / "zoom.ckpt")
    refused = classifier_here("export", "--ckpt_path", str(zoom), "--output", str(tmp_path / "out"))
    assert refused.returncode == 2 and "crop_mode 'zoom' is none of timm's center, squash, border" in refused.stderr
    assert not (tmp_path / "out" / "model.onnx").exists()

    model = onnx.load(onnx_model)  # as an older version exported it, without refusing
    (entry,) = [prop for prop in model.metadata_props if prop.key == METADATA_KEY]
    entry.value = json.dumps({**json.loads(entry.value), "crop_mode": "zoom"})
    onnx.save(model, tmp_path / "zoom.onnx")
    served = classifier_here("serve", "--model", str(tmp_path / "zoom.onnx"), "--port", "1")
    assert served.returncode == 2 and "Traceback" not in served.stderr
    assert "crop_mode 'zoom' is none of timm's center, squash, border" in served.stderr


async def posted(app, *requests: bytes, timeout_s: float = 20) -> list[httpx.Response]:
    """Each image posted in turn to the app, started (lifespan) as the command starts it; then /health and /ready."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://serve") as client:
            answers = [
                await asyncio.wait_for(client.post("/predict", files=files(data)), timeout_s) for data in requests
            ]
            return [*answers, await client.get("/health"), await client.get("/ready")]


def test_a_batch_of_the_wrong_shape_fails_its_request_and_the_next_one_is_served(onnx_model: Path) -> None:
    """A model that returns one row too many ended the inference loop: every later request hung."""
    backend, calls = load_backend(onnx_model), []
    predict = backend.predict_batch

    def one_row_too_many_once(images: np.ndarray) -> np.ndarray:
        calls.append(len(images))
        rows = predict(images)
        return np.concatenate([rows, rows[:1]]) if len(calls) == 2 else rows  # call 1 is the warm-up

    backend.predict_batch = one_row_too_many_once
    png = encoded(noise(40), "PNG")
    failed, served, health, ready = asyncio.run(posted(create_app(backend), png, png))
    assert failed.status_code == 500 and failed.json()["results"][0]["error"] == "the server failed on this image"
    assert served.status_code == 200 and health.status_code == ready.status_code == 200


class Fatal(BaseException):
    """What `except Exception` does not catch: it ends the inference loop."""


def test_a_dead_inference_loop_fails_health_and_ready_and_answers_every_request(
    onnx_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def dies(self, batch) -> None:
        raise Fatal("the loop is gone")

    monkeypatch.setattr(MicroBatcher, "_compute", dies)
    png = encoded(noise(40), "PNG")
    first, later, health, ready = asyncio.run(posted(create_app(load_backend(onnx_model)), png, png))
    for response in (first, later):  # answered, not left hanging
        assert response.status_code == 503 and "the inference loop ended" in response.json()["results"][0]["error"]
    assert health.status_code == ready.status_code == 503
    assert health.json() == {"status": "failed", "error": "Fatal('the loop is gone')"}


def test_a_preprocessing_fault_is_the_servers_500_not_the_uploads_422(onnx_model: Path) -> None:
    backend, calls = load_backend(onnx_model), []
    preprocess = backend.preprocess

    def fails_after_the_warm_up(image):
        calls.append(image)
        if len(calls) > 1:
            raise RuntimeError("a bug of ours")
        return preprocess(image)

    backend.preprocess = fails_after_the_warm_up
    response, *_ = asyncio.run(posted(create_app(backend), encoded(noise(40), "PNG")))
    assert response.status_code == 500 and response.json()["results"][0]["error"] == "the server failed on this image"


def test_stopping_never_waits_for_a_hung_batch() -> None:
    """`executor.shutdown(wait=True)` blocked the event loop for as long as a batch ran: SIGTERM waited for ever."""
    release = threading.Event()

    def hangs(images: np.ndarray) -> np.ndarray:
        release.wait(10)
        return np.zeros((len(images), 3), dtype=np.float32)

    async def scenario() -> float:
        batcher = MicroBatcher(hangs, batch_timeout_ms=1)
        await batcher.start()
        waiting = asyncio.ensure_future(batcher.predict(np.zeros((3, 4, 4), dtype=np.uint8)))
        await asyncio.sleep(0.2)  # its batch is in the model now
        started = time.monotonic()
        await batcher.stop()
        stopped = time.monotonic() - started
        release.set()
        await asyncio.gather(waiting, return_exceptions=True)
        return stopped

    assert asyncio.run(scenario()) < 1
    assert parser().parse_args(["--model", "m.onnx"]).graceful_timeout_s == 25  # under Kubernetes' 30 s grace


def test_a_model_whose_preprocessing_fails_is_never_ready(onnx_model: Path) -> None:
    """The warm-up runs an image through preprocessing too: a server that cannot preprocess stops at start instead
    of saying ready and refusing every upload."""
    backend = load_backend(onnx_model)

    def refuses(image) -> np.ndarray:
        raise ValueError("no preprocessing for this model")

    backend.preprocess = refuses
    app = create_app(backend)

    async def start() -> None:
        async with app.router.lifespan_context(app):
            pass

    with pytest.raises(ValueError, match="no preprocessing for this model"):
        asyncio.run(start())
