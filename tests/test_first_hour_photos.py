"""A new user's first hour with their own photos: the README's photo config, as the README runs it, shortened to a run
that proves learning (its own file, so that pytest-xdist can run it beside `test_first_hour.py`'s long test). The
full run's accuracy target, 0.9, is `benchmarks/first_hour.py`'s."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from classifier.data.photos import CLASSES
from tests.test_first_hour import NOISE, classifier


@pytest.mark.slow
def test_photos_cpu_config_learns_generated_photos_from_scratch(tmp_path: Path) -> None:
    """`classifier demo-data photos`, then the README's first suggestion for your own images, fit and tested."""
    photos = tmp_path / "my_photos"
    classifier("demo-data", "photos", str(photos), "--per_class", "40")
    assert sorted(path.parent.name for path in photos.rglob("*.*")) == [name for name in CLASSES for _ in range(40)]
    logs = ["--trainer.logger.init_args.save_dir", str(tmp_path / "lightning_logs")]
    short = ["--trainer.max_epochs", "20"]
    fit = classifier("fit", "--config", "configs/photos_cpu.yaml", "--data.data_dir", str(photos), *short, *logs)
    assert [line for line in fit if NOISE.search(line)] == []
    (best,) = (tmp_path / "lightning_logs").glob("photos_cpu/version_0/checkpoints/best.ckpt")
    classifier("test", "--ckpt_path", str(best))
    metrics = json.loads((best.parents[1] / "test" / "metrics.json").read_text())
    assert metrics["test/acc"] >= 0.6, metrics  # chance is 1/3; 18 test photos
