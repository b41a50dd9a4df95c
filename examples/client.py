"""Classify images with a running `classifier serve`: python examples/client.py a.jpg b.png [--url URL]."""

from __future__ import annotations

import argparse
from pathlib import Path

import httpx


def classify(paths: list[Path], url: str = "http://127.0.0.1:8000") -> list[dict]:
    """One result per file: its name, status, and top classes with probabilities (or the error)."""
    files = [("files", (path.name, path.read_bytes())) for path in paths]
    response = httpx.post(f"{url}/predict", files=files, timeout=60)
    if "results" not in response.json():  # the whole request was refused: too large, too many files...
        raise SystemExit(f"{response.status_code}: {response.json()['error']}")
    return response.json()["results"]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("images", type=Path, nargs="+")
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    args = parser.parse_args()
    for result in classify(args.images, args.url):
        if result["status"] == "ok":
            top = ", ".join(f"{entry['class']} {entry['probability']:.1%}" for entry in result["top"])
            print(f"{result['file']}: {top}")
        else:
            print(f"{result['file']}: error {result['code']}: {result['error']}")
