"""`classifier serve --model best.ckpt|model.onnx`: the app under uvicorn, which on SIGTERM stops accepting
connections, finishes the requests in flight, and exits."""

from __future__ import annotations

import argparse
import json
import os
import re
from typing import Any

import uvicorn
from fastapi import FastAPI

from classifier.serve.app import create_app
from classifier.serve.backends import load_backend

SETTINGS_ENV = "CLASSIFIER_SERVE_SETTINGS"  # how `--workers N` hands the settings to each worker process
SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmg]i?)?b?", re.IGNORECASE)
UNITS = {None: 1, "k": 10**3, "m": 10**6, "g": 10**9, "ki": 2**10, "mi": 2**20, "gi": 2**30}


def size(text: str) -> int:
    """Bytes from `10MB`, `512KB`, `2MiB` or a number of bytes."""
    match = SIZE.fullmatch(text.strip())
    if not match or float(match[1]) * UNITS[match[2] and match[2].lower()] < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size: write 10MB, 512KB, 2MiB or a number of bytes")
    return int(float(match[1]) * UNITS[match[2] and match[2].lower()])


def positive(kind: type) -> Any:
    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            value = 0
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text!r} is not a positive {kind.__name__}")
        return value

    return parse


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="classifier serve",
        description="Serve a checkpoint (through PyTorch) or an .onnx file (through ONNX Runtime, without torch) over "
        "HTTP: POST /predict, GET /health /ready /info /metrics, and a try-it page at /.",
    )
    parser.add_argument("--model", required=True, help="best.ckpt from `classifier fit`, or model.onnx from export")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max_batch_size", type=positive(int), default=16, help="images per inference batch")
    parser.add_argument(
        "--batch_timeout_ms", type=positive(float), default=5.0, help="longest wait for a batch to fill"
    )
    parser.add_argument("--max_bytes", type=size, default="10MB", help="largest request body (413 above)")
    parser.add_argument(
        "--max_pixels", type=positive(int), default=40_000_000, help="largest image, from its header (413 above)"
    )
    parser.add_argument("--max_files", type=positive(int), default=32, help="most files per request (413 above)")
    parser.add_argument("--topk", type=positive(int), default=5, help="classes returned per image")
    parser.add_argument("--workers", type=positive(int), default=1, help="server processes, each with the model")
    return parser


def app_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The arguments of `create_app` that the command line sets."""
    names = ("max_batch_size", "batch_timeout_ms", "max_bytes", "max_pixels", "max_files", "topk")
    return {name: getattr(args, name) for name in names}


def serve(argv: list[str], graceful_timeout_s: float = 30.0) -> None:
    """Load the model (a bad path stops here, with one line), then serve until SIGINT or SIGTERM."""
    args = parser().parse_args(argv)
    settings = app_settings(args)
    backend = load_backend(args.model)
    common = {"host": args.host, "port": args.port, "timeout_graceful_shutdown": graceful_timeout_s}
    if args.workers == 1:
        uvicorn.run(create_app(backend, **settings), **common)
        return
    del backend  # each worker process loads its own
    os.environ[SETTINGS_ENV] = json.dumps({"model": args.model, **settings})
    uvicorn.run(f"{__name__}:app_from_environment", factory=True, workers=args.workers, **common)


def app_from_environment() -> FastAPI:
    """The app of one of `--workers N` processes, from the settings the command put in the environment."""
    settings = json.loads(os.environ[SETTINGS_ENV])
    return create_app(load_backend(settings.pop("model")), **settings)
