"""Resume parity, mixed precision and DDP: the trainer features a user scales up with."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import DataLoader

from classifier import ImageFolderDataModule, cli_main
from classifier.cli.base import ClassifierCLI
from classifier.data.device_augment import CropBatch
from classifier.training.callbacks import RNGStateCheckpoint, cuda_rng_states, restore_cuda_rng_state
from tests.helpers import REPO, read_csv, run_dir, spy_of, tiny_config

CLASSIFIER = str(Path(sys.executable).parent / "classifier")


def final_weights(tmp_path: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir(tmp_path, 0) / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]


def resumable_config(tmp_path: Path, data_dir: Path, num_workers: int) -> Path:
    """Random crops, flips and dropout, so that a resume with other RNG draws would show."""
    return tiny_config(
        tmp_path,
        data_dir,
        trainer={"max_epochs": 4, "deterministic": True},
        model={
            "drop_rate": 0.3,
            # the schedule's length is fixed, so stopping early does not change it
            "scheduler": {"class_path": "torch.optim.lr_scheduler.CosineAnnealingLR", "init_args": {"T_max": 4}},
        },
        data={"hflip": 0.5, "crop_scale": [0.5, 1.0], "num_workers": num_workers},  # persistent with workers
    )


@pytest.mark.slow
@pytest.mark.parametrize("num_workers", [0, 2])
def test_stopped_and_resumed_run_ends_with_the_same_weights(
    num_workers: int, small_digits: Path, tmp_path: Path
) -> None:
    uninterrupted = resumable_config(tmp_path / "a", small_digits, num_workers)
    cli_main(["fit", "--config", str(uninterrupted)])

    config = resumable_config(tmp_path / "b", small_digits, num_workers)
    cli_main(["fit", "--config", str(config), "--trainer.max_epochs", "2"])  # stopped after epoch 2
    steps_per_epoch = int((ImageFolderDataModule(str(small_digits)).splits.split == "train").sum()) // 32
    stopped = torch.load(run_dir(tmp_path / "b", 0) / "checkpoints" / "last.ckpt", weights_only=True)
    assert stopped["epoch"] == 1 and stopped["global_step"] == 2 * steps_per_epoch
    cli_main(["fit", "--config", str(config), "--ckpt_path", "last"])

    assert sorted(p.name for p in (tmp_path / "b" / "lightning_logs" / "tiny").iterdir()) == ["version_0"]
    resumed, expected = final_weights(tmp_path / "b"), final_weights(tmp_path / "a")
    assert torch.load(run_dir(tmp_path / "b", 0) / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 3
    for name, tensor in expected.items():
        torch.testing.assert_close(resumed[name], tensor, atol=1e-6, rtol=0, msg=name)
    # the report knows every epoch, the one last.ckpt was saved at included
    histories = [fit_history(run_dir(tmp_path / run, 0)) for run in ("a", "b")]
    assert [row["epoch"] for row in histories[1]] == [0, 1, 2, 3]
    assert [row["val/loss"] for row in histories[1]] == pytest.approx([row["val/loss"] for row in histories[0]])
    assert json.loads((run_dir(tmp_path / "b", 0) / "summary.json").read_text())["epochs"] == 4


def fit_history(run: Path) -> list[dict[str, float]]:
    """FitReport's per-epoch rows, as last.ckpt holds them."""
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    return checkpoint["callbacks"]["FitReport"]["history"]


def epoch_contents(loader: DataLoader) -> list[torch.Tensor]:
    """What one pass of a train loader drew: the pixels (or the device-crop plans) and rows of every batch."""
    drawn = []
    for batch in loader:
        drawn += [batch.plans, batch.rows] if isinstance(batch, CropBatch) else [batch[0], batch[2]]
    return drawn


@pytest.mark.parametrize(
    ("cache", "sampler"),
    [("none", "random"), ("ram", "random"), ("none", "balanced")],
    ids=["files", "ram", "balanced"],
)
def test_a_restored_datamodule_draws_the_epochs_an_uninterrupted_one_draws(
    cache: str, sampler: str, small_digits: Path
) -> None:
    options = {"image_size": 16, "batch_size": 32, "num_workers": 2, "hflip": 0.5, "crop_scale": (0.3, 1.0)}
    options |= {"color_jitter": 0.4, "cache": cache, "sampler": sampler}
    uninterrupted = ImageFolderDataModule(str(small_digits), **options)
    uninterrupted.setup("fit")
    loader = uninterrupted.train_dataloader()  # persistent workers, seeded once for all four epochs
    epochs = []
    for epoch in range(4):
        epochs.append(epoch_contents(loader))
        if epoch == 1:
            saved = copy.deepcopy(uninterrupted.state_dict())  # as a checkpoint at the epoch's end holds it
    resumed = ImageFolderDataModule(str(small_digits), **options)
    resumed.setup("fit")
    resumed.load_state_dict(saved)
    loader = resumed.train_dataloader()
    for expected in epochs[2:]:
        drawn = epoch_contents(loader)
        assert len(drawn) == len(expected)
        assert all(torch.equal(mine, theirs) for mine, theirs in zip(drawn, expected, strict=True))
    assert not torch.equal(epochs[2][0], epochs[3][0])  # the epochs themselves differ


def test_resume_last_without_an_earlier_run_starts_fresh(small_digits: Path, tmp_path: Path, caplog) -> None:
    config = tiny_config(tmp_path, small_digits, trainer={"max_epochs": 1})
    with caplog.at_level("WARNING", logger="classifier"):
        cli_main(["fit", "--config", str(config), "--ckpt_path", "last"])
    assert "no earlier run with a last.ckpt; training from scratch" in caplog.text
    assert (run_dir(tmp_path, 0) / "checkpoints" / "last.ckpt").is_file()


def test_a_resume_into_its_own_run_folder_says_nothing_of_the_folder_being_full(
    small_digits: Path, tmp_path: Path, recwarn: pytest.WarningsRecorder
) -> None:
    """Lightning warns that the checkpoint folder "exists and is not empty"; a resumed run writes there by design."""
    config = tiny_config(tmp_path, small_digits, trainer={"max_epochs": 1})
    cli_main(["fit", "--config", str(config)])
    cli_main(["fit", "--config", str(config), "--ckpt_path", "last", "--trainer.max_epochs", "2"])
    assert last_checkpoint_of(tmp_path, 0)["epoch"] == 1 and not run_dir(tmp_path, 1).exists()
    assert [str(w.message) for w in recwarn if "exists and is not empty" in str(w.message)] == []


def last_checkpoint_of(tmp_path: Path, version: int) -> dict:
    return torch.load(run_dir(tmp_path, version) / "checkpoints" / "last.ckpt", weights_only=True)


@pytest.mark.slow
def test_resume_last_picks_the_run_of_its_own_fold(small_digits: Path, tmp_path: Path) -> None:
    config = tiny_config(tmp_path, small_digits, trainer={"max_epochs": 1}, data={"num_folds": 2})
    fit = ["fit", "--config", str(config), "--ckpt_path", "last"]  # as a SLURM array job, requeued or not
    cli_main([*fit, "--data.fold", "0"])
    cli_main([*fit, "--data.fold", "1"])  # fold 0's run is there, but not this fold's: a fresh run
    for fold in (0, 1):  # requeued in turn; machine settings may change
        cli_main([*fit, "--data.fold", str(fold), "--trainer.max_epochs", "2", "--data.decode", "cpu"])

    assert sorted(p.name for p in (tmp_path / "lightning_logs" / "tiny").iterdir()) == ["version_0", "version_1"]
    for fold in (0, 1):
        checkpoint = last_checkpoint_of(tmp_path, version=fold)
        assert checkpoint["datamodule_hyper_parameters"]["fold"] == fold
        assert checkpoint["epoch"] == 1  # resumed after its first epoch, into its own folder


def test_resume_last_refuses_a_run_with_other_settings(small_digits: Path, tmp_path: Path) -> None:
    config = tiny_config(tmp_path, small_digits, trainer={"max_epochs": 1, "limit_train_batches": 1})
    cli_main(["fit", "--config", str(config)])
    last = run_dir(tmp_path, 0) / "checkpoints" / "last.ckpt"
    changed = ["--data.hflip", "0.5", "--model.drop_rate", "0.2", "--data.num_workers", "1"]
    expected = (
        f"none of the 1 runs under {tmp_path / 'lightning_logs' / 'tiny'} has this config's settings; the newest, "
        f"{last}, differs in model.drop_rate (0.2 here, 0.0 there), data.hflip (0.5 here, 0.0 there). "
        f"To continue it with these settings, pass --ckpt_path {last}"
    )
    with pytest.raises(ValueError, match=re.escape(expected)):
        cli_main(["fit", "--config", str(config), "--ckpt_path", "last", *changed])


def test_missing_checkpoint_path_is_named(small_digits: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=f"--ckpt_path {tmp_path / 'gone.ckpt'} does not exist"):
        cli_main(["test", "--ckpt_path", str(tmp_path / "gone.ckpt")])


# Lightning runs 16-mixed as bf16-mixed on the CPU, which has no fp16 autocast
@pytest.mark.parametrize(("precision", "dtype"), [("bf16-mixed", torch.bfloat16), ("16-mixed", torch.bfloat16)])
def test_mixed_precision_on_cpu(precision: str, dtype: torch.dtype, small_digits: Path, tmp_path: Path) -> None:
    trainer = {"max_epochs": 1, "precision": precision, "callbacks": [{"class_path": "tests.helpers.TrainingSpy"}]}
    fit = ClassifierCLI(["fit", "--config", str(tiny_config(tmp_path, small_digits, trainer=trainer))])
    assert spy_of(fit.trainer).dtypes == {"sanity_check": {dtype}, "train": {dtype}, "validate": {dtype}}
    best = run_dir(tmp_path, 0) / "checkpoints" / "best.ckpt"
    test = ClassifierCLI(["test", "--config", str(tiny_config(tmp_path / "test", small_digits, trainer=trainer)),
                          "--ckpt_path", str(best)])  # fmt: skip
    assert spy_of(test.trainer).dtypes == {"test": {dtype}}
    metrics = json.loads((Path(test.trainer.log_dir) / "metrics.json").read_text())
    assert all(value == value for value in metrics.values())  # no NaN
    assert final_weights(tmp_path)["net.backbone.fc.weight"].dtype == torch.float32  # the weights stay float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision_on_gpu(precision: str, digits_dir: Path, tmp_path: Path) -> None:
    trainer = {"accelerator": "gpu", "max_epochs": 5, "precision": precision}
    config = tiny_config(tmp_path, digits_dir, trainer=trainer)
    cli_main(["fit", "--config", str(config)])
    cli_main(["test", "--ckpt_path", str(run_dir(tmp_path, 0) / "checkpoints" / "best.ckpt")])
    metrics = json.loads((run_dir(tmp_path, 0) / "test" / "metrics.json").read_text())
    assert metrics["test/acc"] > 0.8  # fp32 on CPU reaches about 0.9 in these 5 epochs


def run_classifier(*args: str, cwd: Path) -> None:
    """The installed `classifier` command, as a user runs it (DDP re-launches it per rank)."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))  # tests.helpers' callbacks
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path}
    result = subprocess.run([CLASSIFIER, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.mark.slow
def test_two_process_ddp_on_cpu(small_digits: Path, tmp_path: Path) -> None:
    # 31 test images: an odd count, which a padding DistributedSampler would evaluate one image twice for
    spy = {"class_path": "tests.helpers.TrainingSpy", "init_args": {"output": str(tmp_path / "spy")}}
    trainer = {"max_epochs": 1, "callbacks": [spy]}
    config = tiny_config(tmp_path, small_digits, trainer=trainer, data={"test_fraction": 0.155})
    ddp = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"]
    weights = "[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]"  # the loss is a weighted mean: test's must not depend on the ranks
    run_classifier("fit", "--config", str(config), *ddp, "--data.sampler", "balanced", "--model.class_weights",
                   weights, cwd=tmp_path)  # fmt: skip
    best = run_dir(tmp_path, 0) / "checkpoints" / "best.ckpt"
    assert best.is_file() and (run_dir(tmp_path, 0) / "splits.csv").is_file()
    # the balanced sampler under DDP: each rank draws half of one epoch's worth, with replacement, other images
    train_rows = sum(row["split"] == "train" for row in read_csv(run_dir(tmp_path, 0) / "splits.csv"))
    drawn = [[row for batch in json.loads((tmp_path / "spy" / f"rank{rank}.json").read_text()) for row in batch["rows"]]
             for rank in (0, 1)]  # fmt: skip
    assert [len(rows) for rows in drawn] == [train_rows // 2 // 32 * 32] * 2  # full batches of this rank's half
    summary = json.loads((run_dir(tmp_path, 0) / "summary.json").read_text())
    assert summary["train_images"] == len(drawn[0]) + len(drawn[1])  # both ranks' images, not rank 0's
    assert drawn[0] != drawn[1] and all(0 <= row < train_rows for row in drawn[0] + drawn[1])
    assert len(set(drawn[0] + drawn[1])) < len(drawn[0] + drawn[1])  # drawn with replacement

    cli_main(["test", "--ckpt_path", str(best)])
    tested = run_dir(tmp_path, 0) / "test"  # each test of best.ckpt replaces the one before
    single, single_rows = json.loads((tested / "metrics.json").read_text()), (tested / "predictions.csv").read_text()
    run_classifier("test", "--ckpt_path", str(best), *ddp, cwd=tmp_path)
    synced = json.loads((tested / "metrics.json").read_text())
    assert single.keys() == synced.keys()
    for name, value in single.items():
        # float32 sums accumulate in another order across ranks; a duplicated image shifts acc by 3%
        assert synced[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
    single_rows = single_rows.splitlines()
    synced_rows = (tested / "predictions.csv").read_text().splitlines()
    assert len(synced_rows) == len(single_rows) == 32  # header + 31 test images, none twice
    for mine, theirs in zip(single_rows[1:], synced_rows[1:], strict=True):
        assert mine.split(",")[:3] == theirs.split(",")[:3]


def cuda_machine(device_count: int) -> tuple[dict[int, torch.Tensor], Callable[[torch.Tensor, int], None]]:
    """What a machine with `device_count` GPUs was given, and its `torch.cuda.set_rng_state`, which fails, as
    torch's does, for a device it lacks."""
    restored = {}

    def set_rng_state(state: torch.Tensor, device: int) -> None:
        if device >= device_count:
            raise RuntimeError("CUDA error: invalid device ordinal")
        restored[device] = state

    return restored, set_rng_state


def philox_states(count: int) -> list[torch.Tensor]:
    return [torch.full((16,), index, dtype=torch.uint8) for index in range(count)]


def test_a_checkpoint_from_a_machine_with_more_gpus_resumes_on_one(monkeypatch: pytest.MonkeyPatch) -> None:
    saved = {**RNGStateCheckpoint().state_dict(), "cuda": philox_states(2)}  # an earlier 2-GPU machine's list
    restored, set_rng_state = cuda_machine(device_count=1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_rng_state", set_rng_state)
    monkeypatch.setattr(
        torch.cuda, "set_rng_state_all", lambda states: [set_rng_state(s, i) for i, s in enumerate(states)]
    )
    callback = RNGStateCheckpoint()
    callback.setup(
        SimpleNamespace(global_rank=0, strategy=SimpleNamespace(root_device=torch.device("cuda", 0))), None, "fit"
    )
    callback.load_state_dict(saved)
    assert list(restored) == [0] and torch.equal(restored[0], saved["cuda"][0])


def test_each_rank_gets_its_own_cuda_rng_state_back(caplog: pytest.LogCaptureFixture) -> None:
    states = philox_states(4)
    saved = cuda_rng_states(states[0], gather=lambda local: states)  # rank 0 of four gathers every rank's
    restored, set_rng_state = cuda_machine(device_count=2)
    for rank in range(2):  # resumed by two ranks, one GPU each
        restore_cuda_rng_state(saved, rank, device_index=rank, set_state=set_rng_state)
    assert list(restored) == [0, 1] and all(torch.equal(restored[rank], states[rank]) for rank in range(2))

    restored, set_rng_state = cuda_machine(device_count=8)
    with caplog.at_level("WARNING", logger="classifier"):
        restore_cuda_rng_state(saved, rank=5, device_index=5, set_state=set_rng_state)  # more ranks than saved
    assert not restored and "no CUDA RNG state for rank 5 (it was saved by 4)" in caplog.text


def test_early_stopping_says_when_it_stops_a_run(small_digits: Path, tmp_path: Path, caplog) -> None:
    # min_delta 10: no F1 can improve on the first epoch's, so the run stops after epoch 1
    trainer = {"max_epochs": 5, "limit_train_batches": 1, "limit_val_batches": 1}
    config = tiny_config(tmp_path, small_digits, trainer=trainer, early_stopping={"patience": 1, "min_delta": 10.0})
    with caplog.at_level("INFO", logger="classifier"):
        cli_main(["fit", "--config", str(config)])
    first = last_checkpoint_of(tmp_path, 0)["callbacks"]["FitReport"]["history"][0]["val/f1_macro"]
    stops = [record.getMessage() for record in caplog.records if "Early stopping" in record.getMessage()]
    assert stops == [
        f"Early stopping after epoch 1: val/f1_macro did not improve on its best, {first:.6g} at epoch 0, in 1 "
        "validation (--early_stopping.patience 1; null turns it off)"
    ]
    assert last_checkpoint_of(tmp_path, 0)["epoch"] == 1


def test_early_stopping_turned_off_trains_every_epoch(small_digits: Path, tmp_path: Path, caplog) -> None:
    trainer = {"max_epochs": 4, "limit_train_batches": 1, "limit_val_batches": 1}
    config = tiny_config(tmp_path, small_digits, trainer=trainer, early_stopping={"patience": 1, "min_delta": 10.0})
    with caplog.at_level("INFO", logger="classifier"):
        cli_main(["fit", "--config", str(config), "--early_stopping.patience", "null"])
    assert last_checkpoint_of(tmp_path, 0)["epoch"] == 3
    assert "Early stopping" not in caplog.text


def test_max_steps_ending_before_the_first_validation_ends_the_run_normally(small_digits: Path, tmp_path: Path) -> None:
    config = tiny_config(tmp_path, small_digits, trainer={"max_epochs": 3})
    cli_main(["fit", "--config", str(config), "--trainer.max_steps", "2"])  # 4 steps an epoch: no validation ran
    assert last_checkpoint_of(tmp_path, 0)["global_step"] == 2
