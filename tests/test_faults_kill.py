"""kill -9 during training, at random moments, after an epoch's checkpoint and inside an epoch, on real
`classifier` processes: what is left on disk always loads, and resuming ends with an uninterrupted run's weights."""

from __future__ import annotations

import random
import signal
import time
from pathlib import Path

import pytest
import torch

from classifier.core.atomic import PARTIAL_SUFFIX
from classifier.model.checkpoints import read_checkpoint
from tests.helpers.faults import (
    EPOCHS,
    STEPS_PER_EPOCH,
    assert_same_weights,
    batches_or_the_end,
    digits_config,
    last_of,
    lines,
    read_sample_log,
    run,
    start,
)

KILLS = 3  # each kill costs a restart (about 10 s, most of it imports); 3 land among saves made every 0.25 s


@pytest.mark.slow
def test_kill_9_at_random_moments_never_leaves_a_torn_checkpoint(
    reference: tuple[Path, list], digits_dir: Path, tmp_path: Path
) -> None:
    config = digits_config(tmp_path, digits_dir)
    # last.ckpt every quarter second, inside epochs too: many writes for the kills to land in
    command = ["fit", "--config", str(config), "--ckpt_path", "last", "--checkpoint.train_time_interval", "0:00:00.25"]
    log, rng, steps = tmp_path / "samples.log", random.Random(0), []
    for _ in range(KILLS):
        process = start(command, log)
        if not batches_or_the_end(process, log, lines(log) + 1):  # past start-up: the kill lands in training
            break  # a kill that landed after the last step's save left nothing to train: the run just ended
        time.sleep(rng.uniform(0.3, 1.0))  # training gets under a second: the kills land within 3 epochs
        process.kill()
        process.wait()
        if last_of(tmp_path).is_file():  # a kill before the first save leaves none, and the next run starts fresh
            checkpoint = read_checkpoint(last_of(tmp_path))  # a torn file would fail here
            assert all(torch.isfinite(t).all() for t in checkpoint["state_dict"].values())
            steps.append(checkpoint["global_step"])
    assert steps == sorted(steps) and steps[-1] > 0, steps  # each run went on from the last one's checkpoint

    code, stderr = run(command, log)

    assert code == 0, stderr
    assert sorted(p.name for p in (tmp_path / "lightning_logs" / "tiny").iterdir()) == ["version_0"]
    assert not list(last_of(tmp_path).parent.glob(f".*{PARTIAL_SUFFIX}"))  # what the kills left is cleaned up
    assert_same_weights(last_of(tmp_path), reference[0])


@pytest.mark.slow
def test_a_kill_after_an_epoch_checkpoint_resumes_to_the_uninterrupted_weights(
    reference: tuple[Path, list], digits_dir: Path, tmp_path: Path
) -> None:
    config = digits_config(tmp_path, digits_dir)
    code, _ = run(
        [
            "fit",
            "--config",
            str(config),
            "--trainer.callbacks+=tests.helpers.faults.KillAt",
            "--trainer.callbacks.epoch=2",
        ]
    )
    assert code == -signal.SIGKILL
    assert read_checkpoint(last_of(tmp_path))["epoch"] == 1

    code, stderr = run(["fit", "--config", str(config), "--ckpt_path", "last"])

    assert code == 0, stderr
    assert read_checkpoint(last_of(tmp_path))["epoch"] == EPOCHS - 1
    assert_same_weights(last_of(tmp_path), reference[0])


@pytest.mark.slow
def test_a_mid_epoch_checkpoint_resumes_inside_its_epoch_seeing_each_sample_once(
    reference: tuple[Path, list], digits_dir: Path, tmp_path: Path
) -> None:
    config, log = digits_config(tmp_path, digits_dir), tmp_path / "samples.log"
    kill = ["--trainer.callbacks+=tests.helpers.faults.KillAt", "--trainer.callbacks.step=51"]
    code, _ = run(["fit", "--config", str(config), "--checkpoint.every_n_train_steps", "10", *kill], log)
    assert code == -signal.SIGKILL
    saved = read_checkpoint(last_of(tmp_path))
    assert (saved["epoch"], saved["global_step"]) == (1, 50)  # inside epoch 1, which began at step 39
    before = [entry for entry in read_sample_log(log) if entry[1] < 50]  # batches 51's kill undid are done again
    log.unlink()
    torn = last_of(tmp_path).with_name(f".last.ckpt.0badc0de{PARTIAL_SUFFIX}")  # as a kill mid-write leaves it
    torn.write_bytes(b"PK\x03\x04 cut short")

    code, stderr = run(["fit", "--config", str(config), "--ckpt_path", "last"], log)

    assert code == 0, stderr
    assert not torn.exists()  # removed when the run resumed
    after = read_sample_log(log)
    epoch = [rows for e, _, rows in before + after if e == 1]
    seen = [row for rows in epoch for row in rows]
    assert len(seen) == len(set(seen)) == STEPS_PER_EPOCH * 32  # one pass: each sample once, none twice
    assert [(e, s) for e, s, _ in before + after] == [(e, s) for e, s, _ in reference[1]]
    assert [rows for *_, rows in before + after] == [rows for *_, rows in reference[1]]  # in the same order
    assert_same_weights(last_of(tmp_path), reference[0])


def test_under_ddp_each_rank_resumes_its_own_share_of_the_epoch() -> None:
    """Lightning's DistributedSamplerWrapper over the training sampler, 2 ranks: resumed after `done` batches on
    each rank, every rank's remaining batches are those it would have drawn next."""
    from lightning.fabric.utilities.distributed import DistributedSamplerWrapper

    from classifier.data.samplers import EpochStart, training_sampler

    targets, batch, world, done = [i % 3 for i in range(100)], 8, 2, 4

    def rank_batches(start: EpochStart, rank: int) -> list[list[tuple[int, int]]]:
        sampler = training_sampler(targets, 3, False, torch.Generator().manual_seed(5), start)
        keys = list(DistributedSamplerWrapper(sampler, num_replicas=world, rank=rank, shuffle=False))
        return [keys[i : i + batch] for i in range(0, len(keys) - batch + 1, batch)]  # drop_last

    for rank in range(world):
        uninterrupted = rank_batches(EpochStart(), rank)
        resumed = rank_batches(EpochStart(done=done * batch * world), rank)
        assert len(resumed) == len(uninterrupted)  # the loader's length, which the trainer counts, is unchanged
        assert resumed[: len(uninterrupted) - done] == uninterrupted[done:]
