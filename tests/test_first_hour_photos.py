"""A new user's first hour with their own photos: the README's photo config, as the README runs it (its own file, so
that pytest-xdist can run it beside `test_first_hour.py`'s other long test)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO
from tests.test_first_hour import NOISE, classifier

PHOTOS_CPU_TEST_ACC = 0.9  # the target; measured 1.0, 1.0 and 0.97 for generator seeds 0, 1, 2


@pytest.mark.slow
def test_photos_cpu_config_learns_generated_photos_from_scratch(tmp_path: Path) -> None:
    """The README's first suggestion for your own images, on the generated photo set, as the README runs it."""
    photos = tmp_path / "my_photos"
    subprocess.run([sys.executable, "-m", "tests.photos", str(photos)], cwd=REPO, check=True)
    assert sum(1 for _ in photos.rglob("*.*")) == 240
    logs = ["--trainer.logger.init_args.save_dir", str(tmp_path / "lightning_logs")]
    fit = classifier("fit", "--config", "configs/photos_cpu.yaml", "--data.data_dir", str(photos), *logs)
    assert [line for line in fit if NOISE.search(line)] == []
    (best,) = (tmp_path / "lightning_logs").glob("photos_cpu/version_0/checkpoints/best.ckpt")
    classifier("test", "--ckpt_path", str(best))
    metrics = json.loads((best.parents[1] / "test" / "metrics.json").read_text())
    assert metrics["test/acc"] >= PHOTOS_CPU_TEST_ACC
