"""Faults during training: SIGTERM, SLURM's requeue signal and a full disk on real `classifier` processes; NaN losses
and a resume with the wrong settings through the command in this process; each asserts on what is left on disk."""

from __future__ import annotations

import errno
import io
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from classifier.cli.entry import cli_main
from classifier.core.atomic import PARTIAL_SUFFIX, atomic_open
from classifier.core.errors import DiskFullError
from classifier.model.checkpoints import read_checkpoint
from classifier.training.trainer import AtomicCheckpointIO
from tests.helpers import classifier_here, run_dir, tiny_config
from tests.helpers.faults import (
    STEPS_PER_EPOCH,
    assert_same_weights,
    digits_config,
    finish,
    last_of,
    run,
    start,
    wait_for_batches,
)


@pytest.mark.slow
def test_sigterm_saves_a_resumable_checkpoint_and_exits_saying_so(
    reference: tuple[Path, list], digits_dir: Path, tmp_path: Path
) -> None:
    config, log = digits_config(tmp_path, digits_dir), tmp_path / "samples.log"
    process = start(["fit", "--config", str(config)], log)
    wait_for_batches(process, log, 50)
    process.send_signal(signal.SIGTERM)
    code, stderr = finish(process)

    assert code == 128 + signal.SIGTERM
    saved = read_checkpoint(last_of(tmp_path))
    assert 0 < saved["global_step"] % STEPS_PER_EPOCH  # inside an epoch
    assert f"Stopped by SIGTERM at epoch {saved['epoch']}, step {saved['global_step']}: saved {last_of(tmp_path)}" in (
        stderr
    )
    assert "Traceback" not in stderr
    code, stderr = run(["fit", "--config", str(config), "--ckpt_path", "last"])
    assert code == 0, stderr
    assert_same_weights(last_of(tmp_path), reference[0])


@pytest.mark.slow
def test_slurm_requeue_signal_saves_last_ckpt_and_requeues_the_job(digits_dir: Path, tmp_path: Path) -> None:
    """SIGUSR1 under (simulated) SLURM: Lightning's SLURMEnvironment(auto_requeue=True) saves and calls
    `scontrol requeue`; the requeued job, the same command, resumes from the run's last.ckpt."""
    bin_dir, requeued = tmp_path / "bin", tmp_path / "requeued.txt"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {requeued}\n')
    (bin_dir / "scontrol").chmod(0o755)
    slurm = {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "train", "SLURM_JOB_ID": "4242", "SLURM_PROCID": "0"}
    slurm |= {"SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost"}
    slurm["PATH"] = f"{bin_dir}:{os.environ['PATH']}"
    config, log = digits_config(tmp_path, digits_dir, max_epochs=2), tmp_path / "samples.log"
    command = ["fit", "--config", str(config), "--ckpt_path", "last"]
    process = start(command, log, slurm, cwd=tmp_path)  # where Lightning would put hpc_ckpt_N.ckpt
    wait_for_batches(process, log, 45)
    process.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + 30
    while not requeued.is_file() and time.monotonic() < deadline:
        time.sleep(0.1)
    saved = read_checkpoint(last_of(tmp_path))
    process.send_signal(signal.SIGTERM)  # what SLURM sends when it takes the node back
    code, stderr = finish(process)

    assert requeued.read_text() == "requeue 4242\n"
    # 45 batches begun: the 44th step at least was done when SIGUSR1 saved, inside epoch 1 (steps 39 to 77)
    assert saved["global_step"] >= 44 and saved["global_step"] % STEPS_PER_EPOCH
    assert code == 128 + signal.SIGTERM, stderr
    assert not list(tmp_path.glob("hpc_ckpt_*.ckpt"))  # the run's own last.ckpt, not one in the working directory
    code, stderr = run(command, env={**slurm, "SLURM_RESTART_COUNT": "1"}, cwd=tmp_path)
    assert code == 0, stderr
    assert read_checkpoint(last_of(tmp_path))["epoch"] == 1


def test_disk_full_on_a_small_filesystem_ends_in_one_line_and_keeps_the_checkpoints(
    small_digits: Path, tmp_path: Path
) -> None:
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=11m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root); the injected ENOSPC test covers the write path")
    try:
        config = tiny_config(disk, small_digits, trainer={"max_epochs": 4}, early_stopping={"patience": None})
        code, stderr = run(["fit", "--config", str(config)])
        checkpoints = run_dir(disk, 0) / "checkpoints"
        # not memory-mapped, as read_checkpoint would, which keeps the filesystem busy
        best, last = (torch.load(checkpoints / name, weights_only=True) for name in ("best.ckpt", "last.ckpt"))
        leftovers = list(checkpoints.glob(f".*{PARTIAL_SUFFIX}"))
    finally:
        subprocess.run(["umount", str(disk)], check=True)

    assert code == 1
    (line,) = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert line.startswith("error: disk full: writing ")
    assert f"in {checkpoints}, which has " in line and " bytes) " in line
    assert "Traceback" not in stderr
    assert best["epoch"] == 0 and last["epoch"] == 0  # the checkpoints of the epoch before, whole
    assert not leftovers


def test_a_checkpoint_write_failing_with_enospc_leaves_the_previous_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "last.ckpt"
    writer = AtomicCheckpointIO()
    writer.save_checkpoint({"weights": torch.ones(1000)}, path)

    class FullDisk(io.FileIO):
        def write(self, data: bytes) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(
        "classifier.model.checkpoints.open", lambda name, mode, **kw: FullDisk(name, "w"), raising=False
    )
    with pytest.raises(DiskFullError) as raised:
        writer.save_checkpoint({"weights": torch.zeros(100_000)}, path)

    needed = io.BytesIO()
    torch.save({"weights": torch.zeros(100_000)}, needed)
    size = f"{needed.tell() / 1024:.1f} KiB ({needed.tell():,} bytes)"
    assert str(raised.value).startswith(f"disk full: writing last.ckpt needs {size} in {tmp_path}, which has ")
    assert torch.equal(torch.load(path, weights_only=True)["weights"], torch.ones(1000))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_a_report_write_cut_short_leaves_the_previous_report(tmp_path: Path) -> None:
    report = tmp_path / "metrics.json"
    report.write_text('{"test/acc": 0.9}\n')
    with pytest.raises(RuntimeError), atomic_open(report) as file:
        file.write('{"test/acc": 0.')
        raise RuntimeError("killed mid-write")
    assert report.read_text() == '{"test/acc": 0.9}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_checkpoints_and_reports_are_renamed_into_place_from_their_own_folder(
    small_digits: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    renamed: list[tuple[Path, Path]] = []
    replace = os.replace

    def recording_replace(source: str, target: str) -> None:
        renamed.append((Path(source), Path(target)))
        replace(source, target)

    monkeypatch.setattr("classifier.core.atomic.os.replace", recording_replace)
    config = tiny_config(tmp_path, small_digits, trainer={"max_epochs": 1})
    cli_main(["fit", "--config", str(config)])
    best = run_dir(tmp_path, 0) / "checkpoints" / "best.ckpt"
    cli_main(["test", "--ckpt_path", str(best), "--trainer.enable_progress_bar", "false"])

    targets = {target.name: (source, target) for source, target in renamed}
    for name in ("best.ckpt", "last.ckpt", "splits.csv", "summary.json", "metrics.json", "predictions.csv"):
        source, target = targets[name]
        assert source.parent == target.parent and source.name.startswith(f".{name}.")
    assert {"training_curves.png", "confusion_matrix.png", "classification_report.csv"} <= targets.keys()


def here(args: list[str]) -> tuple[int, str]:
    """`classifier ARGS` as its entry point ends it (exit status, one-line error), in this process: a NaN loss is
    not a fault of the process, and a process of its own would spend 5 s importing."""
    done = classifier_here(*args)
    return done.returncode, done.stderr


def test_a_nan_loss_stops_the_run_naming_epoch_and_step_with_finite_checkpoints(
    small_digits: Path, tmp_path: Path
) -> None:
    config = tiny_config(tmp_path, small_digits, trainer={"max_epochs": 3})  # 4 steps an epoch
    nan = ["--trainer.callbacks+=tests.helpers.faults.NaNAt", "--trainer.callbacks.step=5"]
    code, stderr = here(["fit", "--config", str(config), "--checkpoint.every_n_train_steps", "1", *nan])

    assert code == 1
    (line,) = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert line.startswith("error: training diverged: the loss was nan at epoch 1, batch 1 (global step 6).")
    assert "Traceback" not in stderr
    checkpoints = run_dir(tmp_path, 0) / "checkpoints"
    best, last = read_checkpoint(checkpoints / "best.ckpt"), read_checkpoint(checkpoints / "last.ckpt")
    assert best["epoch"] == 0 and last["global_step"] == 5  # the step before the NaN weights: refused after it
    for checkpoint in (best, last):
        assert all(torch.isfinite(tensor).all() for tensor in checkpoint["state_dict"].values())


def test_a_diverging_learning_rate_stops_in_the_epoch_it_diverges(small_digits: Path, tmp_path: Path) -> None:
    config = tiny_config(tmp_path, small_digits, trainer={"max_epochs": 3})
    code, stderr = here(["fit", "--config", str(config), "--model.optimizer.init_args.lr", "1e4"])

    assert code == 1
    stopped = re.search(r"error: training diverged: the loss was (nan|inf) at epoch (\d+), batch \d+ \(global", stderr)
    assert stopped, stderr
    for path in (tmp_path / "lightning_logs").rglob("*.ckpt"):  # those of the epochs before, finite
        checkpoint = read_checkpoint(path)
        assert checkpoint["epoch"] < int(stopped[2])
        assert all(torch.isfinite(tensor).all() for tensor in checkpoint["state_dict"].values())


def test_a_resume_with_another_backbone_or_image_size_is_refused_before_training(
    small_digits: Path, tmp_path: Path
) -> None:
    config = tiny_config(tmp_path, small_digits, trainer={"max_epochs": 1})
    cli_main(["fit", "--config", str(config)])
    last = last_of(tmp_path)
    changed = ["--model.backbone", "resnet10t", "--data.image_size", "48", "--data.batch_size", "16"]

    with pytest.raises(ValueError) as refused:
        cli_main(["fit", "--config", str(config), "--ckpt_path", str(last), *changed])

    assert str(refused.value) == (
        f"--ckpt_path {last} was trained with other settings: model.backbone 'test_resnet' there, 'resnet10t' here; "
        "data.image_size 32 there, 48 here. Its weights fit only its own: drop these options (the checkpoint brings "
        "its settings), or train a new run without --ckpt_path"
    )
    with pytest.raises(ValueError, match=r"data.classes \['0', '1', .*\] there, \['a', 'b'\] here"):
        cli_main(["test", "--ckpt_path", str(last), "--data.classes", "[a, b]"])
    assert read_checkpoint(last)["global_step"] == 4  # untouched
