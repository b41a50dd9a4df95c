"""Helpers for tests: a tiny CPU config each test writes into its tmp_path, and run-folder paths."""

from __future__ import annotations

import csv
from pathlib import Path

import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def tiny_config(tmp_path: Path, data_dir: Path, **overrides: dict) -> Path:
    """A config for `test_resnet` on 32 px images, logging under tmp_path/lightning_logs/tiny."""
    config = {
        "seed_everything": 7,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_epochs": 2,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "log_every_n_steps": 1,
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": str(tmp_path / "lightning_logs"), "name": "tiny"},
            },
        },
        "model": {"backbone": "test_resnet"},
        "data": {"data_dir": str(data_dir), "image_size": 32, "batch_size": 32, "num_workers": 0, "hflip": 0.0},
    }
    for group, values in overrides.items():
        config.setdefault(group, {}).update(values)
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_dir(tmp_path: Path, version: int) -> Path:
    return tmp_path / "lightning_logs" / "tiny" / f"version_{version}"


def save_image(path: Path, image: Image.Image, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as file:
        return list(csv.DictReader(file))
