"""`classifier runs [DIR]`: the training runs under a folder, with their data, best score, epochs and status."""

from __future__ import annotations

import argparse
import json
import re
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from rich.table import Table

from classifier.core.console import print_table
from classifier.model.checkpoints import read_checkpoint


def find_runs(root: Path) -> list[Path]:
    """Run folders of `fit` under `root`: those with fit's config.yaml and a checkpoint or summary.json.

    Evaluations (`test/`, `validate/`, `predict/`), `lr_find/` and `cv_N/` folders hold neither.
    """
    found = [
        config.parent
        for config in root.rglob("config.yaml")
        if (config.parent / "summary.json").is_file() or any((config.parent / "checkpoints").glob("*.ckpt"))
    ]
    return sorted(found, key=natural_order)


def natural_order(path: Path) -> list[int | str]:
    """version_2 before version_10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def describe(run: Path) -> dict[str, Any]:
    """One run's row: finished runs from summary.json; unfinished ones from their checkpoints' ModelCheckpoint state."""
    config = yaml.safe_load((run / "config.yaml").read_text()) or {}
    summary_path = run / "summary.json"
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        monitor, best, epochs, written = summary["monitor"], summary["best_value"], summary["epochs"], summary_path
    else:
        monitor, best, epochs, written = _progress(run)
    return {
        "path": str(run),
        "name": run.parent.name,
        "data_dir": (config.get("data") or {}).get("data_dir"),
        "monitor": monitor,
        "best": best,
        "epochs": epochs,
        "date": datetime.fromtimestamp(written.stat().st_mtime).strftime("%Y-%m-%d %H:%M"),
        "status": "finished" if summary_path.is_file() else "unfinished",
    }


def _progress(run: Path) -> tuple[str | None, float | None, int | None, Path]:
    """(monitor, best value, epochs done, newest checkpoint) of a run that has not written summary.json yet."""
    monitor = best = epochs = None
    best_ckpt, last_ckpt = run / "checkpoints" / "best.ckpt", run / "checkpoints" / "last.ckpt"
    if best_ckpt.is_file():
        for key, state in read_checkpoint(best_ckpt).get("callbacks", {}).items():
            if key.startswith("ModelCheckpoint") and state.get("monitor") and state.get("best_model_score") is not None:
                monitor, best = state["monitor"], float(state["best_model_score"])
    if last_ckpt.is_file():
        epochs = int(read_checkpoint(last_ckpt)["epoch"]) + 1
    checkpoints = [path for path in (last_ckpt, best_ckpt) if path.is_file()] or sorted(run.glob("checkpoints/*.ckpt"))
    return monitor, best, epochs, max(checkpoints, key=lambda path: path.stat().st_mtime)


def list_runs(argv: list[str]) -> list[dict[str, Any]]:
    """Print the training runs under the folder `argv` names (default lightning_logs); returns their rows."""
    parser = argparse.ArgumentParser(
        prog="classifier runs",
        description="List the training runs (fit's run folders) under DIR: data, best score, epochs, date, status.",
    )
    parser.add_argument("root", nargs="?", type=Path, default=Path("lightning_logs"), metavar="DIR")
    root = parser.parse_args(argv).root
    if not root.is_dir():
        raise FileNotFoundError(f"classifier runs: {root} does not exist (pass the folder that holds the run folders)")
    rows = [describe(run) for run in find_runs(root)]
    table = Table(title=f"Training runs under {root}: {len(rows)}")
    for column in ("path", "name", "data_dir", "monitor", "best", "epochs", "date", "status"):
        table.add_column(column, justify="right" if column in ("best", "epochs") else "left")
    for row in rows:
        best = "" if row["best"] is None else f"{row['best']:.4f}"
        cells = [row["path"], row["name"], str(row["data_dir"]), str(row["monitor"] or ""), best]
        table.add_row(*cells, str(row["epochs"] or ""), row["date"], row["status"])
    print_table(table)
    return rows
