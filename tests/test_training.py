"""Resume parity, mixed precision and DDP: the trainer features a user scales up with."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from classifier import ImageFolderDataModule, cli_main
from classifier.cli import ClassifierCLI
from tests.helpers import REPO, read_csv, run_dir, spy_of, tiny_config

CLASSIFIER = str(Path(sys.executable).parent / "classifier")


def final_weights(tmp_path: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir(tmp_path, 0) / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]


def resumable_config(tmp_path: Path, data_dir: Path) -> Path:
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
        data={"hflip": 0.5, "crop_scale": [0.5, 1.0]},
    )


@pytest.mark.slow
def test_stopped_and_resumed_run_ends_with_the_same_weights(small_digits: Path, tmp_path: Path) -> None:
    uninterrupted = resumable_config(tmp_path / "a", small_digits)
    cli_main(["fit", "--config", str(uninterrupted)])

    config = resumable_config(tmp_path / "b", small_digits)
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


def test_resume_last_without_an_earlier_run_starts_fresh(small_digits: Path, tmp_path: Path, caplog) -> None:
    config = tiny_config(tmp_path, small_digits, trainer={"max_epochs": 1})
    with caplog.at_level("WARNING", logger="classifier"):
        cli_main(["fit", "--config", str(config), "--ckpt_path", "last"])
    assert "no earlier run with a last.ckpt; training from scratch" in caplog.text
    assert (run_dir(tmp_path, 0) / "checkpoints" / "last.ckpt").is_file()


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
    assert final_weights(tmp_path)["backbone.fc.weight"].dtype == torch.float32  # the weights stay float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision_on_gpu(precision: str, digits_dir: Path, tmp_path: Path) -> None:
    trainer = {"accelerator": "gpu", "max_epochs": 5, "precision": precision}
    config = tiny_config(tmp_path, digits_dir, trainer=trainer)
    cli_main(["fit", "--config", str(config)])
    cli_main(["test", "--ckpt_path", str(run_dir(tmp_path, 0) / "checkpoints" / "best.ckpt")])
    metrics = json.loads((run_dir(tmp_path, 1) / "metrics.json").read_text())
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
    run_classifier("fit", "--config", str(config), *ddp, "--data.sampler", "balanced", cwd=tmp_path)
    best = run_dir(tmp_path, 0) / "checkpoints" / "best.ckpt"
    assert best.is_file() and (run_dir(tmp_path, 0) / "splits.csv").is_file()
    # the balanced sampler under DDP: each rank draws half of one epoch's worth, with replacement, other images
    train_rows = sum(row["split"] == "train" for row in read_csv(run_dir(tmp_path, 0) / "splits.csv"))
    drawn = [[row for batch in json.loads((tmp_path / "spy" / f"rank{rank}.json").read_text()) for row in batch["rows"]]
             for rank in (0, 1)]  # fmt: skip
    assert [len(rows) for rows in drawn] == [train_rows // 2 // 32 * 32] * 2  # full batches of this rank's half
    assert drawn[0] != drawn[1] and all(0 <= row < train_rows for row in drawn[0] + drawn[1])
    assert len(set(drawn[0] + drawn[1])) < len(drawn[0] + drawn[1])  # drawn with replacement

    cli_main(["test", "--ckpt_path", str(best)])
    run_classifier("test", "--ckpt_path", str(best), *ddp, cwd=tmp_path)
    single = json.loads((run_dir(tmp_path, 1) / "metrics.json").read_text())
    synced = json.loads((run_dir(tmp_path, 2) / "metrics.json").read_text())
    assert single.keys() == synced.keys()
    for name, value in single.items():
        # float32 sums accumulate in another order across ranks; a duplicated image shifts acc by 3%
        assert synced[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
    single_rows = (run_dir(tmp_path, 1) / "predictions.csv").read_text().splitlines()
    synced_rows = (run_dir(tmp_path, 2) / "predictions.csv").read_text().splitlines()
    assert len(synced_rows) == len(single_rows) == 32  # header + 31 test images, none twice
    for mine, theirs in zip(single_rows[1:], synced_rows[1:], strict=True):
        assert mine.split(",")[:3] == theirs.split(",")[:3]
