"""Faults the tests inject into real `classifier` processes, as callbacks a config names
(`--trainer.callbacks+=tests.helpers.faults.KillAt`): a kill -9 at a chosen moment, a NaN weight, and a log of the
samples each training step saw; and how the fault tests start, watch and compare those processes."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from lightning.pytorch import Callback

from tests.helpers import REPO, run_dir, tiny_config


class SampleLog(Callback):
    """Appends `epoch step row row ...` per training batch to `path`, flushed at once, so a kill loses none."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        rows = " ".join(str(row) for row in batch[2].tolist())
        with open(self.path, "a") as file:
            file.write(f"{trainer.current_epoch} {trainer.global_step} {rows}\n")


class KillAt(Callback):
    """SIGKILLs its own process when training reaches optimizer step `step` (after the checkpoints of the step
    before), or the start of epoch `epoch` (after the checkpoints of the epoch before)."""

    def __init__(self, step: int | None = None, epoch: int | None = None) -> None:
        self.step = step
        self.epoch = epoch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step or (trainer.current_epoch == self.epoch and batch_idx == 0):
            os.kill(os.getpid(), signal.SIGKILL)


class NaNAt(Callback):
    """Turns the model's first weight NaN before optimizer step `step`, as a diverging learning rate would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                next(pl_module.parameters()).fill_(math.nan)


def read_sample_log(path: Path) -> list[tuple[int, int, list[int]]]:
    """(epoch, step, rows) per logged batch."""
    entries = []
    for line in path.read_text().splitlines():
        epoch, step, *rows = map(int, line.split())
        entries.append((epoch, step, rows))
    return entries


STEPS_PER_EPOCH = 39  # 1,257 training digits (70% of 1,797) in batches of 32, the last partial one dropped
EPOCHS = 3


def digits_config(tmp_path: Path, digits_dir: Path, **trainer: object) -> Path:
    """3 epochs of a few seconds each on all 1,797 digits, with augmentation that draws randomness."""
    data = {"hflip": 0.5, "crop_scale": [0.5, 1.0]}
    return tiny_config(tmp_path, digits_dir, trainer={"max_epochs": EPOCHS, **trainer}, data=data)


def start(
    args: list[str], log: Path | None = None, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.Popen:
    """`classifier ARGS` in its own process (in `cwd`); with `log`, each training batch's rows are appended to it."""
    if log is not None:
        args = [*args, "--trainer.callbacks+=tests.helpers.faults.SampleLog", f"--trainer.callbacks.path={log}"]
    environment = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})}
    command = [sys.executable, "-m", "classifier", *args]
    return subprocess.Popen(
        command, env=environment, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finish(process: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    """Exit code and stderr."""
    _, stderr = process.communicate(timeout=timeout)
    return process.returncode, stderr


def run(
    args: list[str], log: Path | None = None, env: dict[str, str] | None = None, cwd: Path | None = None
) -> tuple[int, str]:
    return finish(start(args, log, env, cwd))


def lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.is_file() else 0


def wait_for_batches(process: subprocess.Popen, log: Path, count: int, timeout: float = 120) -> None:
    """Until `log` holds `count` batches in all."""
    deadline = time.monotonic() + timeout
    while lines(log) < count:
        assert process.poll() is None, f"the run ended before batch {count}: {process.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline, f"no batch {count} within {timeout} s"
        time.sleep(0.05)


def batches_or_the_end(process: subprocess.Popen, log: Path, count: int, timeout: float = 120) -> bool:
    """Until `log` holds `count` batches (True), or the run ends by itself having finished its training (False):
    a run resumed from a checkpoint saved after its last step has no batch left to train."""
    deadline = time.monotonic() + timeout
    while lines(log) < count:
        if process.poll() is not None:
            assert process.returncode == 0, f"the run failed before batch {count}: {process.communicate()[1][-2000:]}"
            return False
        assert time.monotonic() < deadline, f"no batch {count} within {timeout} s"
        time.sleep(0.05)
    return True


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]


def assert_same_weights(checkpoint: Path, reference: Path) -> None:
    mine, expected = weights(checkpoint), weights(reference)
    assert mine.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(mine[name], tensor, atol=1e-6, rtol=0, msg=name)


def last_of(tmp_path: Path) -> Path:
    return run_dir(tmp_path, 0) / "checkpoints" / "last.ckpt"
