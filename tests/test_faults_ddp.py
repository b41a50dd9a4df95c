"""Faults of distributed and repeated runs: a DDP rank that fails ends every rank, and a seeded run repeats exactly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from classifier import cli_main
from tests.helpers import REPO, run_dir, tiny_config

CLASSIFIER = str(Path(sys.executable).parent / "classifier")
BOUND_S = 60  # every process of the run is gone this long after the fault, at most
DDP = ["--trainer.accelerator", "cpu", "--trainer.devices", "2"]


def processes_of(tmp_path: Path) -> list[int]:
    """The processes whose command line names tmp_path's config: the run's ranks and their loader workers."""
    config, found = os.fsencode(tmp_path / "tiny.yaml") + b"\0", []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and config in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:  # ended while we looked
            continue
    return found


def fault(rank: int, how: str, tmp_path: Path) -> dict:
    """A RankFault for a config's trainer.callbacks, noting when it struck in tmp_path/fault."""
    init_args = {"rank": rank, "how": how, "time_file": str(tmp_path / "fault")}
    return {"class_path": "tests.helpers.rank_faults.RankFault", "init_args": init_args}


def fit_with_faults(tmp_path: Path, data_dir: Path, faults: list[dict], *args: str) -> tuple[int, str, float]:
    """Run `classifier fit` on 2 CPU processes; returns its exit code, its output and how long after the (first)
    fault the last of its processes ended. Leaves no process behind, whatever happens."""
    config = tiny_config(tmp_path, data_dir, trainer={"max_epochs": 3, "callbacks": faults})
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    command = [CLASSIFIER, "fit", "--config", str(config), *DDP, *args]
    with open(tmp_path / "output.txt", "w") as output:
        process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=output, stderr=subprocess.STDOUT)
    try:
        process.wait(timeout=600)
        deadline = float((tmp_path / "fault").read_text()) + BOUND_S  # after the fault
        while processes_of(tmp_path) and time.time() < deadline:
            time.sleep(0.2)
        ended = time.time() - float((tmp_path / "fault").read_text())
    finally:
        for pid in [process.pid, *processes_of(tmp_path)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        process.wait()
    return process.returncode, (tmp_path / "output.txt").read_text(), ended


def last_epoch(tmp_path: Path) -> int:
    """The epoch of the run's last.ckpt, which a fault at step 2 (epoch 1's first) leaves loadable."""
    return torch.load(run_dir(tmp_path, 0) / "checkpoints" / "last.ckpt", weights_only=True)["epoch"]


@pytest.mark.slow
@pytest.mark.parametrize("how", ["raise", "kill"])
def test_a_failing_rank_1_ends_every_rank(how: str, small_digits: Path, tmp_path: Path) -> None:
    # rank 0, Lightning's launcher, sees its child end (or its peer gone in the next all-reduce) and ends the rest
    returncode, output, ended = fit_with_faults(
        tmp_path, small_digits, [fault(1, how, tmp_path)], "--trainer.strategy", "ddp"
    )
    assert returncode != 0 and ended < BOUND_S and not processes_of(tmp_path), output[-3000:]
    assert last_epoch(tmp_path) == 0
    if how == "raise":
        assert "[rank1]: RuntimeError: injected fault on rank 1 at step 2" in output
    else:  # rank 0 names the cause, on one line: its peer is gone
        assert "error: another DDP rank failed or was killed, so this one stopped (Connection " in output
        assert "Traceback" not in output, output[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("how", ["raise", "kill"])
def test_a_failing_rank_0_ends_a_busy_rank_1(how: str, small_digits: Path, tmp_path: Path) -> None:
    # rank 1 is still busy (a slow batch, an NCCL collective that never returns): it would never hear of rank 0's end
    faults = [fault(0, how, tmp_path), fault(1, "hang", tmp_path / "busy")]
    (tmp_path / "busy").mkdir()
    returncode, output, ended = fit_with_faults(tmp_path, small_digits, faults, "--trainer.strategy", "ddp")
    assert returncode != 0 and ended < BOUND_S and not processes_of(tmp_path), output[-3000:]
    assert last_epoch(tmp_path) == 0
    if how == "raise":
        assert "RuntimeError: injected fault on rank 0 at step 2" in output
    else:
        assert returncode == -signal.SIGKILL


@pytest.mark.slow
def test_a_stuck_rank_ends_at_the_process_group_timeout(small_digits: Path, tmp_path: Path) -> None:
    timeout = ["--trainer.strategy", "DDPStrategy", "--trainer.strategy.timeout", "0:00:15"]  # default: 30 min
    returncode, output, ended = fit_with_faults(tmp_path, small_digits, [fault(1, "hang", tmp_path)], *timeout)
    assert returncode != 0 and 15 <= ended < BOUND_S and not processes_of(tmp_path), output[-3000:]
    assert last_epoch(tmp_path) == 0
    assert "[rank0]: RuntimeError:" in output and "Timed out waiting 15000ms" in output


def weights(run: Path) -> dict[str, dict[str, torch.Tensor]]:
    """The state dicts of a run's best.ckpt and last.ckpt."""
    checkpoints = run / "checkpoints"
    return {
        name: torch.load(checkpoints / name, weights_only=True)["state_dict"] for name in ("best.ckpt", "last.ckpt")
    }


def assert_equal_weights(mine: dict, theirs: dict) -> None:
    for checkpoint in theirs:
        assert mine[checkpoint].keys() == theirs[checkpoint].keys()
        for name, tensor in theirs[checkpoint].items():
            assert torch.equal(mine[checkpoint][name], tensor), f"{checkpoint}: {name}"


@pytest.mark.slow
def test_seeded_deterministic_runs_end_with_equal_weights_with_and_without_workers(
    small_digits: Path, tmp_path: Path
) -> None:
    runs = {}
    for name, workers in [("a0", 0), ("b0", 0), ("a2", 2), ("b2", 2)]:
        config = tiny_config(
            tmp_path / name,
            small_digits,
            trainer={"deterministic": True},
            model={"drop_rate": 0.3},
            data={"hflip": 0.5, "crop_scale": [0.5, 1.0], "num_workers": workers},  # augmentation that draws
        )
        cli_main(["fit", "--config", str(config)])
        runs[name] = weights(run_dir(tmp_path / name, 0))
    assert_equal_weights(runs["b0"], runs["a0"])
    assert_equal_weights(runs["b2"], runs["a2"])
    assert_equal_weights(runs["a2"], runs["a0"])  # each sample's augmentation is seeded in the main process

    cli_main(["fit", "--config", str(tmp_path / "a0" / "tiny.yaml"), "--seed_everything", "8"])
    other_seed, seed_7 = weights(run_dir(tmp_path / "a0", 1))["last.ckpt"], runs["a0"]["last.ckpt"]
    assert not all(torch.equal(tensor, seed_7[name]) for name, tensor in other_seed.items())  # the test can fail
