"""A checkpoint's test metrics as its run recorded them, for export's description and serving's /info (no torch)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml


def run_test_metrics(ckpt_path: Path) -> dict | None:
    """`classifier test`'s metrics.json for this checkpoint (`version_N/test/`), when that test ran on this file
    after it was last written; None otherwise."""
    test = ckpt_path.resolve().parent.parent / "test"
    metrics, config = test / "metrics.json", test / "config.yaml"
    if not (metrics.is_file() and config.is_file()) or metrics.stat().st_mtime < ckpt_path.stat().st_mtime:
        return None
    tested = (yaml.safe_load(config.read_text()) or {}).get("ckpt_path")
    return json.loads(metrics.read_text()) if tested and Path(tested).name == ckpt_path.name else None
