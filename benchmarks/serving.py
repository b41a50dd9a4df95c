"""`classifier serve` under load, next to the same ONNX model's offline batched throughput, measured in the same run.

    python -m benchmarks.serving --model best.ckpt --out serving.json        # exports to ONNX first
    python -m benchmarks.serving --model model.onnx --images data/digits     # 2,000 requests per concurrency
    python -m benchmarks.serving --model best.ckpt --quick                    # a smoke run: 40 requests each
    python -m benchmarks.serving --model model.onnx --quick --requests 32 --warmup_requests 0   # a smaller one

The server runs on 127.0.0.1 in its own process; the client (httpx) sends a bounded number of one-image requests at
each concurrency (1, 8, 32) and stops. Per concurrency: p50, p95 and p99 latency, images/s, and errors (any answer
that is not 200 with the offline top-1 class and probabilities within 1e-4). Offline: the same images decoded,
preprocessed and run through `OnnxPredictor` in batches of --max_batch_size, in this process. Then 200 requests of
bad input of every kind, mixed with good ones, with the server's resident memory before and after. Last, the hostile
mix (`benchmarks/attacks.py`): the load at concurrency 8 alone, then the same load while images that decode to the
most memory the limits allow, 200 sockets trickling their headers and a flood over --max_concurrency go on beside
it; its p99 against the load alone, what the attackers met (by status), and the server's peak resident memory.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import logging
import os
import random
import socket
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from benchmarks.attacks import attack_while
from classifier.deploy.onnx_predictor import OnnxPredictor
from classifier.serve.decoding import ALLOWED_TYPES, TIFF, Upload, decode, inspect

log = logging.getLogger("serving")
REPO = Path(__file__).resolve().parents[1]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
Expected = list[tuple[str, float]]  # each image's top class and its probability, offline


def decoded(data: bytes) -> Image.Image:
    """An image's bytes decoded as the server decodes an upload, without its limits."""
    return decode(inspect(Upload("x", data), 10**9, (*ALLOWED_TYPES, TIFF)))


def start_server(model: Path, *flags: str) -> tuple[subprocess.Popen, str]:
    """`classifier serve` on a free loopback port, once /ready answers; (process, base URL)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "classifier", "serve", "--model", str(model), "--port", str(port), *flags]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(REPO)})
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        if process.poll() is not None:
            raise SystemExit(f"the server exited with {process.returncode}")
        try:
            if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit("the server was not ready within 2 minutes")


def png(size: int = 64) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def png_bomb(width: int = 30000, height: int = 30000) -> bytes:
    """A PNG of a few hundred bytes whose header claims width x height pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    rows = zlib.compress(b"\x00" * (width + 1) * 16, 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def onnx_model(model: Path, work: Path) -> Path:
    """`model` itself, or the ONNX export of a checkpoint (`classifier export`, no parity check)."""
    if model.suffix.lower() == ".onnx":
        return model
    command = [sys.executable, "-m", "classifier", "export", "--ckpt_path", str(model), "--output", str(work)]
    subprocess.run([*command, "--check", "none"], check=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    return work / "model.onnx"


def offline(predictor: OnnxPredictor, images: list[bytes], batch_size: int, rounds: int) -> dict:
    """Images/s of decode + preprocess + inference in batches, and of inference alone, best of `rounds`."""
    end_to_end, model_only = [], []
    for _ in range(rounds):
        started, inference = time.perf_counter(), 0.0
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            batch = np.stack([predictor.preprocess(decoded(data)) for data in chunk])
            before = time.perf_counter()
            predictor.predict_batch(batch)
            inference += time.perf_counter() - before
        end_to_end.append(len(images) / (time.perf_counter() - started))
        model_only.append(len(images) / inference)
    return {"img_s": max(end_to_end), "model_only_img_s": max(model_only), "batch_size": batch_size}


async def load(url: str, images: list[bytes], expected: Expected, requests: int, concurrency: int) -> dict:
    """`requests` one-image requests from `concurrency` clients at once; latencies, throughput and errors."""
    order = [index % len(images) for index in range(requests)]
    latencies: list[float] = []
    errors: dict[str, int] = {}

    async def client() -> None:
        # a client and connection of its own, like separate users: one httpx pool shared by 32 tasks is slower
        # than the server on 2 cores
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            while order:
                index = order.pop()
                started = time.perf_counter()
                try:
                    response = await http.post("/predict", content=images[index])
                    problem = check(response, expected[index])
                except httpx.HTTPError as error:
                    problem = type(error).__name__
                latencies.append(time.perf_counter() - started)
                if problem:
                    errors[problem] = errors.get(problem, 0) + 1

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    wall = time.perf_counter() - started
    p50, p95, p99 = (float(np.percentile(latencies, q)) * 1000 for q in (50, 95, 99))
    return {
        "requests": requests,
        "img_s": requests / wall,
        "p50_ms": p50,
        "p95_ms": p95,
        "p99_ms": p99,
        "errors": sum(errors.values()),
        "error_kinds": errors,
    }


def check(response: httpx.Response, expected: tuple[str, float]) -> str | None:
    """What is wrong with a good image's answer (its offline top class and probability), or None."""
    if response.status_code != 200:
        return f"status {response.status_code}"
    top = response.json()["results"][0]["top"][0]
    if top["class"] != expected[0] or abs(top["probability"] - expected[1]) > 1e-4:
        return "wrong result"
    return None


def bad_inputs(good: bytes) -> dict[str, tuple[dict, int]]:
    """kind -> (httpx request arguments, the status the server must answer)."""
    image = png()
    return {
        "too_large": ({"content": b"\xff\xd8\xff" + bytes(11_000_000)}, 413),
        "unsupported_type": ({"content": b"%PDF-1.7 not an image\n" * 10}, 415),
        "bomb": ({"content": png_bomb()}, 413),
        "truncated": ({"content": image[: len(image) // 2]}, 422),
        "too_many_files": ({"files": [("files", ("a.png", good))] * 33}, 413),
        "mixed_files": ({"files": [("files", ("a.png", good)), ("files", ("b.png", png_bomb()))]}, 200),
    }


async def disconnect(url: str, body: bytes) -> None:
    """A client that sends its image and leaves before the answer."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    head = f"POST /predict HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
    writer.write(head + body)
    await writer.drain()
    writer.close()


async def bad_mix(url: str, images: list[bytes], expected: Expected, total: int, seed: int = 0) -> dict:
    """`total` requests, about half bad (every kind, and disconnects), the rest good; 8 at a time."""
    kinds = bad_inputs(images[0])
    rng = random.Random(seed)
    plan = [rng.choice([*kinds, "disconnect", "good", "good", "good", "good"]) for _ in range(total)]
    outcome = {"server_errors": 0, "unexpected_status": 0, "good": 0, "good_correct": 0}
    semaphore = asyncio.Semaphore(8)

    async def one(http: httpx.AsyncClient, kind: str, index: int) -> None:
        async with semaphore:
            if kind == "disconnect":
                await disconnect(url, images[index % len(images)])
                return
            if kind == "good":
                response = await http.post("/predict", content=images[index % len(images)])
                outcome["good"] += 1
                outcome["good_correct"] += check(response, expected[index % len(images)]) is None
            else:
                arguments, status = kinds[kind]
                response = await http.post("/predict", **arguments)
                outcome["unexpected_status"] += response.status_code != status
            outcome["server_errors"] += response.status_code >= 500

    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        await asyncio.gather(*(one(http, kind, index) for index, kind in enumerate(plan)))
    return {"requests": total, **{kind: plan.count(kind) for kind in sorted(set(plan))}, **outcome}


def hostile(url: str, process: subprocess.Popen, images: list[bytes], expected: Expected, requests: int) -> dict:
    """The load at concurrency 8 alone, then beside the attackers: p99 against p99, refusals, peak memory."""
    alone = asyncio.run(load(url, images, expected, requests, 8))
    attacked = asyncio.run(attack_while(url, lambda: load(url, images, expected, requests, 8), images[0]))
    under = attacked["well_formed"]
    figures = {"alone": alone, **attacked, "p99_under_attack_over_alone": under["p99_ms"] / alone["p99_ms"]}
    figures |= {"peak_rss_mb": rss_mb(process.pid, "VmHWM"), "rss_after_mb": rss_mb(process.pid)}
    figures |= {"alive": process.poll() is None, "ready_after": httpx.get(f"{url}/ready").status_code == 200}
    log.info(
        "hostile mix: well-formed p99 %.1f ms under attack vs %.1f ms alone (%.2fx), %d of %d refused; peak RSS %.0f "
        "MB; the attackers met %s",
        under["p99_ms"],
        alone["p99_ms"],
        figures["p99_under_attack_over_alone"],
        under["errors"],
        under["requests"],
        figures["peak_rss_mb"],
        json.dumps(attacked["attackers_met"]),
    )
    return figures


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    """Resident memory of a process now (VmRSS), or at its peak so far (VmHWM), from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} for process {pid}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="a .ckpt (exported first) or an .onnx file")
    parser.add_argument("--images", type=Path, default=REPO / "data" / "digits", help="good images (recursive)")
    parser.add_argument("--num_images", type=int, help="distinct images sent, cycled (default 256; 32 quick)")
    parser.add_argument("--requests", type=int, help="requests per concurrency (default 2000; 40 quick)")
    parser.add_argument("--warmup_requests", type=int, help="uncounted, at concurrency 8 (default: --requests, <= 64)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--bad_requests", type=int, help="the bad input mix's requests (default 200; 40 quick)")
    parser.add_argument("--hostile_requests", type=int, help="well-formed requests beside the attack (500; 40 quick)")
    parser.add_argument("--max_batch_size", type=int, default=16)
    parser.add_argument("--batch_timeout_ms", type=float, default=5.0)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="40 requests each, 40 bad, 32 images: a smoke run")
    parser.add_argument("--out", type=Path, default=Path("serving.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request otherwise
    defaults = (
        ("requests", 2000, 40),
        ("bad_requests", 200, 40),
        ("num_images", 256, 32),
        ("hostile_requests", 500, 40),
    )
    for name, default, quick in defaults:
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else default)
    if args.warmup_requests is None:
        args.warmup_requests = min(args.requests, 64)

    paths = sorted(p for p in args.images.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)[: args.num_images]
    if not paths:
        raise SystemExit(f"--images {args.images} holds no images")
    images = [path.read_bytes() for path in paths]
    with tempfile.TemporaryDirectory() as work:
        model = onnx_model(args.model, Path(work))
        predictor = OnnxPredictor(model)
        probabilities = predictor.predict([decoded(data) for data in images])
        expected = [(predictor.class_names[row.argmax()], float(row.max())) for row in probabilities]
        figures: dict = {"model": str(args.model), "images": len(images), "cpus": os.cpu_count()}
        figures["offline"] = offline(predictor, images, args.max_batch_size, rounds=1 if args.quick else 3)
        offline_figures = figures["offline"]["img_s"], figures["offline"]["model_only_img_s"]
        log.info("offline: %.1f img/s end to end, %.1f img/s inference alone", *offline_figures)
        flags = ["--max_batch_size", str(args.max_batch_size), "--batch_timeout_ms", str(args.batch_timeout_ms)]
        process, url = start_server(model, *flags, "--workers", str(args.workers))
        try:
            if args.warmup_requests:
                asyncio.run(load(url, images, expected, args.warmup_requests, 8))  # warm-up, not counted
            figures["served"] = {}
            for concurrency in args.concurrency:
                result = asyncio.run(load(url, images, expected, args.requests, concurrency))
                figures["served"][str(concurrency)] = result
                log.info(
                    "concurrency %2d: %7.1f img/s (%.2fx offline), p50 %.1f ms, p95 %.1f ms, p99 %.1f ms, %d errors",
                    concurrency,
                    result["img_s"],
                    result["img_s"] / figures["offline"]["img_s"],
                    result["p50_ms"],
                    result["p95_ms"],
                    result["p99_ms"],
                    result["errors"],
                )
            before = rss_mb(process.pid)
            mix = asyncio.run(bad_mix(url, images, expected, args.bad_requests))
            time.sleep(0.5)
            mix |= {"rss_before_mb": before, "rss_after_mb": rss_mb(process.pid), "alive": process.poll() is None}
            mix["rss_ratio"] = mix["rss_after_mb"] / before
            mix["ready_after"] = httpx.get(f"{url}/ready").status_code == 200
            figures["bad_input"] = mix
            log.info("bad input mix: %s", json.dumps(mix))
            figures["hostile"] = hostile(url, process, images, expected, args.hostile_requests)
        finally:
            process.terminate()
            process.wait(timeout=60)
    most = str(max(args.concurrency))
    figures["served_over_offline"] = figures["served"][most]["img_s"] / figures["offline"]["img_s"]
    if "8" in figures["served"]:
        figures["p99_over_p50_at_8"] = figures["served"]["8"]["p99_ms"] / figures["served"]["8"]["p50_ms"]
    args.out.write_text(json.dumps(figures, indent=2) + "\n")
    log.info(
        "served/offline at concurrency %s: %.2f; p99/p50 at 8: %s; written to %s",
        most,
        figures["served_over_offline"],
        f"{figures['p99_over_p50_at_8']:.2f}" if "p99_over_p50_at_8" in figures else "-",
        args.out,
    )


if __name__ == "__main__":
    main()
