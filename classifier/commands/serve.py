"""`classifier serve --model best.ckpt|model.onnx`: the app under uvicorn (its h11 protocol, with the limits of
`serve.connections`), which on SIGTERM stops accepting connections, finishes the requests in flight, and exits."""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI

from classifier.serve.app import create_app
from classifier.serve.backends import load_backend
from classifier.serve.connections import ConnectionLimits, GuardedH11Protocol, configure

SETTINGS_ENV = "CLASSIFIER_SERVE_SETTINGS"  # how `--workers N` hands the settings to each worker process
API_KEY_ENV = "CLASSIFIER_API_KEY"  # the key, or --api_key_file: never a flag, which `ps` would show
CONNECTION_SETTINGS = ("header_timeout_s", "max_header_bytes", "max_connections")
SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmg]i?)?b?", re.IGNORECASE)
UNITS = {None: 1, "k": 10**3, "m": 10**6, "g": 10**9, "ki": 2**10, "mi": 2**20, "gi": 2**30}


def size(text: str) -> int:
    """Bytes from `10MB`, `512KB`, `2MiB` or a number of bytes."""
    match = SIZE.fullmatch(text.strip())
    if not match or float(match[1]) * UNITS[match[2] and match[2].lower()] < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size: write 10MB, 512KB, 2MiB or a number of bytes")
    return int(float(match[1]) * UNITS[match[2] and match[2].lower()])


def boolean(value: str) -> bool:
    """`true` or `false`, as the other commands spell them (their parsers import torch; this one may not)."""
    if value.lower() not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"expected true or false, not {value!r}")
    return value.lower() == "true"


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
        "--max_pixels",
        type=positive(int),
        default=None,
        help="largest image, from its header (413 above); default: 16 MP, or 256 times the model's input if larger",
    )
    parser.add_argument(
        "--max_request_pixels",
        type=positive(int),
        default=None,
        help="most pixels of one request's images (413 above); default: 4 x --max_pixels",
    )
    parser.add_argument(
        "--decode_memory",
        type=size,
        default="512MiB",
        help="memory that the decodes in flight share; each waits its turn",
    )
    parser.add_argument("--max_files", type=positive(int), default=32, help="most files per request (413 above)")
    parser.add_argument("--topk", type=positive(int), default=5, help="classes returned per image")
    parser.add_argument(
        "--max_concurrency",
        type=positive(int),
        default=64,
        help="/predict requests in flight; one more gets 503 at once",
    )
    parser.add_argument(
        "--request_timeout_s",
        type=positive(float),
        default=30.0,
        help="a /predict request not answered by then gets 504",
    )
    parser.add_argument(
        "--header_timeout_s",
        type=positive(float),
        default=10.0,
        help="a connection's request headers must arrive within this",
    )
    parser.add_argument(
        "--max_header_bytes", type=size, default="16KB", help="larger request headers get 431 and the connection closed"
    )
    parser.add_argument(
        "--max_connections",
        type=positive(int),
        default=None,
        help="open connections (default: the file-descriptor limit less 64)",
    )
    parser.add_argument(
        "--api_key_file",
        default=None,
        help=f"a file holding the API key (or set {API_KEY_ENV}): /predict and /info need it",
    )
    parser.add_argument(
        "--allowed_hosts",
        nargs="+",
        default=None,
        help="Host headers to answer (others get 400): against DNS rebinding",
    )
    parser.add_argument(
        "--allow_failed_parity", action="store_true", help="serve an export whose parity.json says it failed"
    )
    parser.add_argument("--allow_tiff", action="store_true", help="accept TIFF uploads (off: a wide decoder to expose)")
    parser.add_argument(
        "--reject",
        type=boolean,
        default=True,
        help="answer unknown for images under the model's rejection threshold, if calibrated with one (default true)",
    )
    parser.add_argument(
        "--graceful_timeout_s",
        type=positive(float),
        default=25.0,
        help="on SIGTERM, how long requests in flight may finish (under Kubernetes' 30 s grace)",
    )
    parser.add_argument("--workers", type=positive(int), default=1, help="server processes, each with the model")
    return parser


def app_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The arguments of `create_app` that the command line sets."""
    names = ("max_batch_size", "batch_timeout_ms", "max_bytes", "max_pixels", "max_request_pixels", "decode_memory")
    names += ("max_files", "topk", "max_concurrency", "request_timeout_s", "allowed_hosts", "allow_tiff")
    return {name: getattr(args, name) for name in names} | {"api_key": api_key(args.api_key_file)}


def api_key(path: str | None) -> str | None:
    """The key from --api_key_file, else from $CLASSIFIER_API_KEY; None: no key needed."""
    if path is None:
        return os.environ.get(API_KEY_ENV) or None
    try:
        key = Path(path).read_text().strip()
    except OSError as error:
        raise FileNotFoundError(f"--api_key_file {path} cannot be read: {error.strerror}") from None
    if not key:
        raise ValueError(f"--api_key_file {path} is empty: write the key in it")
    return key


def serve(argv: list[str]) -> None:
    """Load the model (a bad path stops here, with one line), then serve until SIGINT or SIGTERM."""
    args = parser().parse_args(argv)
    settings = app_settings(args)
    limits = {name: getattr(args, name) for name in CONNECTION_SETTINGS}
    configure(ConnectionLimits(**limits))
    backend = load_backend(args.model, args.allow_failed_parity, args.reject)
    common = {"host": args.host, "port": args.port, "timeout_graceful_shutdown": args.graceful_timeout_s}
    common |= {"http": GuardedH11Protocol, "h11_max_incomplete_event_size": args.max_header_bytes}
    if args.workers == 1:
        uvicorn.run(create_app(backend, **settings), **common)
        return
    del backend  # each worker process loads its own
    os.environ[SETTINGS_ENV] = json.dumps(
        {"model": args.model, "allow_failed_parity": args.allow_failed_parity, "reject": args.reject}
        | {"connections": limits, **settings}
    )
    uvicorn.run(f"{__name__}:app_from_environment", factory=True, workers=args.workers, **common)


def app_from_environment() -> FastAPI:
    """The app of one of `--workers N` processes, from the settings the command put in the environment."""
    settings = json.loads(os.environ[SETTINGS_ENV])
    configure(ConnectionLimits(**settings.pop("connections")))
    backend = load_backend(settings.pop("model"), settings.pop("allow_failed_parity"), settings.pop("reject"))
    return create_app(backend, **settings)
