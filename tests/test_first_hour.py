"""A new user's first hour, as they live it: the `classifier` command in its own process, output redirected."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO

NOISE = re.compile(r"warn|deprecat|tip:|no seed found|weights_only|finding best initial lr", re.IGNORECASE)


def classifier(*args: str) -> list[str]:
    """Run `classifier` from the repository root as the README does; the lines it printed."""
    done = subprocess.run(
        [sys.executable, "-m", "classifier", *args], cwd=REPO, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return (done.stdout + done.stderr).splitlines()


@pytest.mark.slow
def test_lr_finds_rate_trains_the_bundled_config_and_no_command_prints_a_warning(tmp_path: Path) -> None:
    """lr_find, then fit with its rate and nothing else changed, then test, each shortened: the bundled config learns
    (the full run's accuracy target is `benchmarks/first_hour.py`'s), and no command prints noise."""
    logs = ["--trainer.logger.save_dir", str(tmp_path)]
    lr_find = classifier("lr_find", "--config", "configs/resnet18.yaml", "--num_training", "30", *logs)
    (flag,) = [line.removeprefix("Use it with: ") for line in lr_find if line.startswith("Use it with: ")]
    fit = classifier("fit", "--config", "configs/resnet18.yaml", *flag.split(), "--trainer.max_epochs", "2", *logs)
    (best,) = tmp_path.glob("resnet18/version_*/checkpoints/best.ckpt")
    assert f"Evaluate it with: classifier test --ckpt_path {best}" in fit
    test = classifier("test", "--ckpt_path", str(best))
    metrics = json.loads((best.parents[1] / "test" / "metrics.json").read_text())
    assert metrics["test/acc"] >= 0.5, flag  # two epochs from scratch; chance is 0.1
    assert [line for line in lr_find + fit + test if NOISE.search(line)] == []
