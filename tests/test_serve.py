"""`classifier serve`: every endpoint in process (httpx on the ASGI app), the limits on hostile uploads,
micro-batching, and the command as a subprocess (SIGTERM, one-line errors) and in a real browser."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from classifier import cli_main
from classifier.serve.app import create_app
from classifier.serve.backends import load_backend
from tests.helpers import read_csv
from tests.helpers.serving import REPO, encoded, noise, png_bomb, sample, start_server


@pytest.fixture(scope="module")
def trained(trained_checkpoint: Path, digits_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The tests' trained checkpoint (one tested epoch of test_resnet on the digits), and `classifier predict`'s
    probabilities for 16 new digits."""
    root = tmp_path_factory.mktemp("served")
    checkpoint = trained_checkpoint
    images = root / "new_digits"
    images.mkdir()
    for class_dir in sorted(digits_dir.iterdir()):
        for path in sorted(class_dir.iterdir())[100:102] if class_dir.name < "8" else []:
            shutil.copy(path, images / f"{class_dir.name}_{path.name}")
    predictions = root / "predictions.csv"
    cli_main(
        [
            "predict",
            "--ckpt_path",
            str(checkpoint),
            "--data.predict_dir",
            str(images),
            "--predictions.output",
            str(predictions),
        ]
    )
    classes = [str(digit) for digit in range(10)]
    expected = {
        Path(row["path"]).name: np.array([float(row[f"prob_{c}"]) for c in classes]) for row in read_csv(predictions)
    }
    return {"checkpoint": checkpoint, "images": images, "expected": expected, "classes": classes}


@pytest.fixture(scope="module")
def backend(trained: dict):
    return load_backend(trained["checkpoint"])


def run(coroutine: Awaitable) -> object:
    return asyncio.run(coroutine)


@contextlib.asynccontextmanager
async def serving(app) -> AsyncIterator[httpx.AsyncClient]:
    """The app started (its lifespan: batcher and warm-up, which httpx's ASGI transport does not run) and a client."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://serve") as client:
            yield client


def probabilities(result: dict, classes: list[str]) -> np.ndarray:
    """A result's top-k as a probability per class (topk = every class)."""
    assert result["status"] == "ok", result
    by_class = {entry["class"]: entry["probability"] for entry in result["top"]}
    return np.array([by_class[c] for c in classes])


def upload(path: Path) -> tuple[str, tuple[str, bytes, str]]:
    return ("files", (path.name, path.read_bytes(), "application/octet-stream"))


def test_predict_gives_the_probabilities_of_classifier_predict(trained: dict, backend) -> None:
    paths = sorted(trained["images"].iterdir())

    async def scenario() -> tuple[httpx.Response, httpx.Response, httpx.Response]:
        async with serving(create_app(backend, topk=10)) as client:
            multi = await client.post("/predict", files=[upload(path) for path in paths])
            raw = await client.post("/predict", content=paths[3].read_bytes())
            top3 = await client.post("/predict", files=[upload(paths[0])])
            return multi, raw, top3

    multi, raw, top3 = run(scenario())
    assert multi.status_code == 200
    results = multi.json()["results"]
    assert [result["file"] for result in results] == [path.name for path in paths]
    for result in results:
        np.testing.assert_allclose(
            probabilities(result, trained["classes"]), trained["expected"][result["file"]], atol=1e-4
        )
    (result,) = raw.json()["results"]
    assert result["file"] == "body"
    np.testing.assert_allclose(probabilities(result, trained["classes"]), trained["expected"][paths[3].name], atol=1e-4)
    top = [entry["probability"] for entry in top3.json()["results"][0]["top"]]
    assert top == sorted(top, reverse=True) and len(top) == 10


def test_sixteen_concurrent_requests_are_batched_with_the_unbatched_results(trained: dict, backend) -> None:
    paths = sorted(trained["images"].iterdir())

    async def scenario(max_batch_size: int, concurrent: bool) -> tuple[list[np.ndarray], str]:
        app = create_app(backend, max_batch_size=max_batch_size, batch_timeout_ms=200, topk=10)
        async with serving(app) as client:
            requests = [client.post("/predict", files=[upload(path)]) for path in paths]
            if concurrent:
                responses = await asyncio.gather(*requests)
            else:
                responses = [await request for request in requests]
            metrics = (await client.get("/metrics")).text
        return [probabilities(r.json()["results"][0], trained["classes"]) for r in responses], metrics

    batched, metrics = run(scenario(16, concurrent=True))
    unbatched, unbatched_metrics = run(scenario(1, concurrent=False))
    assert sample(unbatched_metrics, "classifier_batch_size_count") == 16
    batches = sample(metrics, "classifier_batch_size_count")
    assert sample(metrics, "classifier_batch_size_sum") == 16
    assert batches < 16 and sample(metrics, "classifier_batch_size_bucket", le="1.0") < batches
    np.testing.assert_allclose(np.stack(batched), np.stack(unbatched), atol=1e-6)


def test_health_ready_info_metrics_and_the_page(trained: dict, backend) -> None:
    app = create_app(backend)

    async def not_started() -> tuple[int, int, int]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://serve") as client:
            responses = [await client.get(path) for path in ("/health", "/ready")]
            responses.append(await client.post("/predict", content=b"x"))
        return tuple(response.status_code for response in responses)

    async def started() -> dict[str, httpx.Response]:
        async with serving(app) as client:
            await client.post("/predict", files=[upload(sorted(trained["images"].iterdir())[0])])
            return {path: await client.get(path) for path in ("/health", "/ready", "/info", "/", "/metrics")}

    assert run(not_started()) == (200, 503, 503)  # alive, not loaded and warmed
    responses = run(started())
    assert all(response.status_code == 200 for response in responses.values())
    info = responses["/info"].json()
    checkpoint = trained["checkpoint"]
    assert info["backend"] == "pytorch"
    assert info["model_sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert info["class_names"] == trained["classes"]
    assert info["preprocessing"] == backend.predictor.net.preprocessing
    assert info["test_metrics"] == json.loads((checkpoint.parents[1] / "test" / "metrics.json").read_text())
    assert info["topk"] == 5 and info["limits"]["max_files"] == 32
    page = responses["/"].text
    assert responses["/"].headers["content-type"].startswith("text/html")
    assert 'type="file"' in page and "http://" not in page and "https://" not in page  # no external assets
    metrics = responses["/metrics"].text
    assert sample(metrics, "classifier_requests_total", route="/predict", status="200") == 1
    assert sample(metrics, "classifier_requests_total", route="/predict", status="503") == 1
    assert sample(metrics, "classifier_request_seconds_count", route="/predict") == 2
    assert sample(metrics, "classifier_model_seconds_count") == 1
    assert sample(metrics, "classifier_batch_size_sum") == 1
    assert sample(metrics, "classifier_queue_depth") == 0


def bad_uploads() -> dict[str, tuple[bytes, int, str]]:
    """name -> (bytes, status, refusal reason): every kind of bad image the server must refuse."""
    png = encoded(noise(64), "PNG")
    jpeg = encoded(noise(64), "JPEG", quality=90)
    return {
        "notes.png": (b"these are not the pixels you are looking for\n" * 4, 415, "unsupported_type"),
        "animation.gif": (encoded(noise(16), "GIF"), 415, "unsupported_type"),
        "bomb.png": (png_bomb(), 413, "too_many_pixels"),
        "cut.png": (png[: len(png) // 2], 422, "undecodable"),
        "cut.jpg": (jpeg[: len(jpeg) // 2], 422, "undecodable"),
        "header_only.webp": (encoded(noise(16), "WEBP")[:20], 422, "undecodable"),
    }


def test_bad_uploads_are_refused_one_by_one_and_the_server_keeps_serving(trained: dict, backend) -> None:
    good = sorted(trained["images"].iterdir())[5]
    bad = bad_uploads()

    async def scenario() -> tuple[dict, httpx.Response, httpx.Response, httpx.Response, httpx.Response, str]:
        async with serving(create_app(backend, topk=10, max_bytes=200_000, max_files=4)) as client:
            single = {
                name: await client.post("/predict", files=[("files", (name, data))])
                for name, (data, _, _) in bad.items()
            }
            mixed = await client.post(
                "/predict", files=[upload(good), ("files", ("bomb.png", png_bomb())), ("files", ("notes.png", b"hi"))]
            )
            too_many = await client.post("/predict", files=[upload(good)] * 5)
            too_big = await client.post("/predict", content=b"\xff\xd8\xff" + bytes(300_000))
            after = await client.post("/predict", files=[upload(good)])
            return single, mixed, too_many, too_big, after, (await client.get("/metrics")).text

    single, mixed, too_many, too_big, after, metrics = run(scenario())
    for name, (_, status, _reason) in bad.items():
        assert single[name].status_code == status, (name, single[name].text)
        (result,) = single[name].json()["results"]
        assert result["status"] == "error" and result["code"] == status and name in result["error"]
    assert mixed.status_code == 200
    ok, bomb, notes = mixed.json()["results"]
    np.testing.assert_allclose(probabilities(ok, trained["classes"]), trained["expected"][good.name], atol=1e-4)
    assert (bomb["code"], notes["code"]) == (413, 415)
    assert too_many.status_code == 413 and "at most 4 files" in too_many.json()["error"]
    assert too_big.status_code == 413 and "200000" in too_big.json()["error"]
    np.testing.assert_allclose(
        probabilities(after.json()["results"][0], trained["classes"]), trained["expected"][good.name], atol=1e-4
    )
    assert sample(metrics, "classifier_images_refused_total", reason="unsupported_type") == 3
    assert sample(metrics, "classifier_images_refused_total", reason="too_many_pixels") == 2
    assert sample(metrics, "classifier_images_refused_total", reason="undecodable") == 3
    assert sample(metrics, "classifier_images_refused_total", reason="too_many_files") == 1
    assert sample(metrics, "classifier_images_refused_total", reason="too_large") == 1


def test_max_pixels_is_read_from_the_header(backend) -> None:
    image = encoded(noise(40), "PNG")  # 1,600 pixels

    async def scenario() -> list[int]:
        async with serving(create_app(backend, max_pixels=1599)) as client:
            refused = await client.post("/predict", content=image)
        async with serving(create_app(backend, max_pixels=1600)) as client:
            accepted = await client.post("/predict", content=image)
        return [refused.status_code, accepted.status_code]

    assert run(scenario()) == [413, 200]


async def asgi_post(app, chunks: list[bytes], then: Callable[[], Awaitable[dict]], headers: dict[str, str]) -> dict:
    """POST /predict straight through ASGI: the body in `chunks`, then whatever `then` says (a disconnect, a stall).
    Returns the status, the JSON body and how many chunks the app read."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/predict",
        "raw_path": b"/predict",
        "query_string": b"",
        "root_path": "",
        "headers": [(key.lower().encode(), value.encode()) for key, value in headers.items()],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }
    pending, response = list(chunks), {"read": 0, "body": b""}

    async def receive() -> dict:
        if pending:
            response["read"] += 1
            return {"type": "http.request", "body": pending.pop(0), "more_body": True}
        return await then()

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            response["status"] = message["status"]
        elif message["type"] == "http.response.body":
            response["body"] += message.get("body", b"")

    await app(scope, receive, send)
    response["json"] = json.loads(response["body"]) if response["body"] else None
    return response


def test_a_body_over_max_bytes_is_refused_without_reading_it_all(backend) -> None:
    chunks = [b"\x89PNG\r\n\x1a\n" + bytes(1000)] + [bytes(1000)] * 99  # 100 kB, chunked: no declared length

    async def never() -> dict:
        raise AssertionError("the app read past the limit")

    async def scenario() -> tuple[dict, dict, dict]:
        app = create_app(backend, max_bytes=10_000)
        async with serving(app):
            declared = await asgi_post(app, chunks, never, {"content-length": "100008"})
            # twice the limit: refused from the header too, not once ten of its chunks have streamed in
            twice = await asgi_post(app, chunks[:20], never, {"content-length": "20008"})
            chunked = await asgi_post(app, chunks, never, {"transfer-encoding": "chunked"})
        return declared, twice, chunked

    declared, twice, chunked = run(scenario())
    assert (declared["status"], declared["read"]) == (413, 0)  # refused from its Content-Length alone
    assert (twice["status"], twice["read"]) == (413, 0)
    assert twice["json"] == {"error": "the request body is 20008 bytes; the limit is 10000"}
    assert (chunked["status"], chunked["read"]) == (413, 10)  # refused at the chunk that passed 10,000 bytes
    assert chunked["json"] == {"error": "the request body is over the limit of 10000 bytes"}


def test_clients_that_disconnect_or_stall_give_their_queue_slot_back(trained: dict, backend) -> None:
    image = sorted(trained["images"].iterdir())[0].read_bytes()
    gone = asyncio.Event()

    async def end_then_disconnect() -> dict:
        if not gone.is_set():
            gone.set()
            return {"type": "http.request", "body": b"", "more_body": False}
        await asyncio.sleep(0.3)  # queued by now: the batch waits 10 s to fill
        return {"type": "http.disconnect"}

    async def stall() -> dict:
        await asyncio.Event().wait()
        return {}

    async def scenario() -> tuple[dict, dict, httpx.Response, str]:
        app = create_app(backend, max_queue=1, batch_timeout_ms=10_000, max_batch_size=2, read_timeout_s=0.5)
        async with serving(app) as client:
            disconnected = await asgi_post(app, [image], end_then_disconnect, {})
            gone.clear()
            stalled = await asgi_post(app, [image[:50]], stall, {})
            app_fast = create_app(backend, max_queue=1, max_batch_size=1)
            metrics = (await client.get("/metrics")).text
        async with serving(app_fast) as client:
            after = await client.post("/predict", content=image)
        return disconnected, stalled, after, metrics

    disconnected, stalled, after, metrics = run(scenario())
    assert disconnected["status"] == 499
    assert sample(metrics, "classifier_queue_depth") == 0
    assert sample(metrics, "classifier_batch_size_count") == 0  # the departed client's image never ran
    assert stalled["status"] == 408
    assert after.status_code == 200


@pytest.mark.slow
def test_the_command_serves_and_finishes_requests_in_flight_on_sigterm(trained: dict) -> None:
    paths = sorted(trained["images"].iterdir())
    process, url = start_server(trained["checkpoint"], "--batch_timeout_ms", "2000", "--topk", "10")
    try:
        answers: list[httpx.Response] = []
        in_flight = threading.Thread(
            target=lambda: answers.append(httpx.post(f"{url}/predict", files=[upload(paths[1])], timeout=30))
        )
        in_flight.start()
        while sample(httpx.get(f"{url}/metrics").text, "classifier_queue_depth") < 1:  # waiting 2 s for its batch
            pass
        process.send_signal(signal.SIGTERM)
        in_flight.join(timeout=30)
        assert process.wait(timeout=30) == -signal.SIGTERM  # uvicorn re-raises the signal once it has drained
    finally:
        process.kill()
    (answer,) = answers
    assert answer.status_code == 200
    result = answer.json()["results"][0]
    np.testing.assert_allclose(probabilities(result, trained["classes"]), trained["expected"][paths[1].name], atol=1e-4)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/health")
    assert "Finished server process" in process.stdout.read()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--model", "missing.ckpt"], "error: --model missing.ckpt does not exist"),
        (["--model", "x.ckpt", "--max_bytes", "ten"], "--max_bytes: 'ten' is not a size"),
        (["--model", "x.ckpt", "--max_batch_size", "0"], "--max_batch_size: '0' is not a positive int"),
    ],
)
def test_the_command_stops_on_bad_flags_with_one_line(flags: list[str], message: str, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "classifier", "serve", *flags],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=120,
    )
    assert result.returncode != 0
    assert message in result.stderr and "Traceback" not in result.stderr, result.stderr


@pytest.fixture(scope="module")
def server(trained: dict) -> Iterator[str]:
    """`classifier serve` on the checkpoint, in a subprocess; its URL."""
    process, url = start_server(trained["checkpoint"])
    yield url
    process.terminate()
    process.wait(timeout=30)


@pytest.mark.slow
def test_the_page_shows_the_top_classes_of_a_picked_digit(trained: dict, server: str) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    playwright = pytest.importorskip("playwright.sync_api")
    if chromium is None:
        pytest.skip("no chromium installed (Debian: apt-get install chromium)")
    path = sorted(trained["images"].iterdir())[6]
    expected = trained["expected"][path.name]
    best = int(np.argmax(expected))
    with playwright.sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=chromium)
        page = browser.new_page()
        page.goto(server)
        page.set_input_files("#file", str(path))
        page.wait_for_selector("#results .row")
        labels = page.locator("#results .label").all_inner_texts()
        percentages = page.locator("#results .pct").all_inner_texts()
        preview = page.locator("#preview").evaluate("image => image.complete && image.naturalWidth")
        shown = page.locator("#preview").bounding_box()
        model, drop = page.locator("#model").bounding_box(), page.locator("#drop").bounding_box()
        browser.close()
    assert labels[0] == trained["classes"][best] and len(labels) == 5
    assert percentages[0] == f"{expected[best] * 100:.1f}%"
    assert preview == 8  # the digit itself, 8 px wide, shown above the bars
    assert shown["width"] >= 200 and shown["height"] >= 200  # upscaled to be seen, not an 8 px speck
    assert model["y"] + model["height"] <= drop["y"]  # the model line clear of the drop zone's border


@pytest.mark.slow
def test_the_example_clients_classify_through_a_running_server(trained: dict, server: str) -> None:
    paths = sorted(trained["images"].iterdir())[:2]
    python = subprocess.run(
        [sys.executable, str(REPO / "examples" / "client.py"), *map(str, paths), "--url", server],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert python.returncode == 0, python.stderr
    for line, path in zip(python.stdout.splitlines(), paths, strict=True):
        best = trained["classes"][int(np.argmax(trained["expected"][path.name]))]
        assert line.startswith(f"{path.name}: {best} ")
    if shutil.which("curl") is None:
        pytest.skip("no curl installed: examples/client.sh was not tried (examples/client.py passed)")
    curl = subprocess.run(
        ["bash", str(REPO / "examples" / "client.sh"), *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "URL": server},
    )
    assert curl.returncode == 0, curl.stderr
    results = json.loads(curl.stdout)["results"]
    assert [result["file"] for result in results] == [path.name for path in paths]
    assert all(result["status"] == "ok" for result in results)


def mapped_libraries(pid: int) -> str:
    """The shared libraries a process and its children (uvicorn's workers) have loaded."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return "".join(Path(f"/proc/{process}/maps").read_text() for process in [pid, *children])


@pytest.mark.slow
def test_an_onnx_model_is_served_without_torch_with_the_checkpoint_probabilities(trained: dict, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    cli_main(["export", "--ckpt_path", str(trained["checkpoint"]), "--output", str(tmp_path), "--check", "none"])
    model = tmp_path / "model.onnx"
    paths = sorted(trained["images"].iterdir())
    process, url = start_server(model, "--topk", "10", "--workers", "2")
    try:
        responses = [httpx.post(f"{url}/predict", files=[upload(path)], timeout=60) for path in paths]
        info = httpx.get(f"{url}/info").json()
        libraries = mapped_libraries(process.pid)
        assert len(Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()) >= 2
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert "libtorch" not in libraries and "libc10" not in libraries  # torch was never imported
    assert "onnxruntime" in libraries
    assert info["backend"] == "onnxruntime" and info["class_names"] == trained["classes"]
    assert info["model_sha256"] == hashlib.sha256(model.read_bytes()).hexdigest()
    assert info["test_metrics"] == json.loads((trained["checkpoint"].parents[1] / "test" / "metrics.json").read_text())
    for result in (response.json()["results"][0] for response in responses):
        expected = trained["expected"][result["file"]]
        np.testing.assert_allclose(probabilities(result, trained["classes"]), expected, atol=1e-4)


def test_the_serve_command_and_the_onnx_backend_import_no_torch() -> None:
    pytest.importorskip("onnxruntime")
    code = (
        "import sys, classifier.cli.entry, classifier.commands.serve, classifier.serve.backends, "
        "classifier.deploy.onnx_predictor; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.slow
def test_serving_benchmark_quick_writes_every_figure(trained: dict, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    out = tmp_path / "serving.json"
    # exported here, where torch is imported already, as the test above exports: given a checkpoint, the benchmark
    # runs `classifier export` in a new interpreter, seconds of imports
    cli_main(["export", "--ckpt_path", str(trained["checkpoint"]), "--output", str(tmp_path), "--check", "none"])
    command = [sys.executable, "-m", "benchmarks.serving", "--model", str(tmp_path / "model.onnx")]  # as the README
    command += ["--images", str(trained["images"]), "--quick", "--out", str(out)]
    command += ["--requests", "32", "--bad_requests", "20", "--num_images", "8", "--warmup_requests", "0"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert set(figures["served"]) == {"1", "8", "32"}
    for served in figures["served"].values():
        assert served["errors"] == 0 and served["img_s"] > 0 and served["p50_ms"] <= served["p99_ms"]
    assert figures["offline"]["img_s"] > 0 and figures["served_over_offline"] > 0
    bad = figures["bad_input"]
    assert bad["server_errors"] == 0 and bad["unexpected_status"] == 0 and bad["alive"] and bad["ready_after"]
    assert bad["good_correct"] == bad["good"] > 0
    hostile = figures["hostile"]
    assert hostile["alive"] and hostile["ready_after"] and hostile["peak_rss_mb"] < 1536
    met = hostile["attackers_met"]  # how many got through depends on the machine's speed; what they got does not
    assert sum(met.values()) > 0 and set(met) <= {
        "flood_200",
        "flood_503",
        "bomb_200",
        "bomb_503",
        "slow_socket_closed",
    }
    assert hostile["alone"]["errors"] == 0 and hostile["well_formed"]["requests"] == 40
    assert hostile["p99_under_attack_over_alone"] == hostile["well_formed"]["p99_ms"] / hostile["alone"]["p99_ms"]
    assert "served/offline at concurrency 32" in result.stderr and "hostile mix: well-formed p99" in result.stderr
