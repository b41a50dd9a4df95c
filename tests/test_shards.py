"""Shards: `classifier shard` writes a run's frozen split as LitData chunks, and fit, test, calibrate, export and serve
work from them as from the folder: the same eval pixels, the same checkpoint contract, exact resume after kill -9,
and equal batches under DDP."""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback
from litdata import StreamingDataset
from PIL import Image

from classifier.data.datamodule import ImageFolderDataModule
from classifier.data.scenes import write_scenes
from classifier.data.shard_meta import META_FILE, read_meta
from classifier.data.shards import read_rows
from classifier.data.splits import SPLITS
from classifier.deploy.onnx_predictor import OnnxPredictor
from classifier.model.checkpoints import read_checkpoint
from tests.conftest import built_once
from tests.helpers import classifier_here, classifier_process, read_csv, run_dir, save_image, tiny_config
from tests.helpers.faults import (
    STEPS_PER_EPOCH,
    assert_same_weights,
    digits_config,
    last_of,
    read_sample_log,
    run,
)
from tests.helpers.serving import served


class RankSampleLog(Callback):
    """Appends `epoch step row row ...` per training batch to PATH.<rank>: each DDP rank's own log."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        rows = " ".join(str(row) for row in batch[2].tolist())
        with open(f"{self.path}.{trainer.global_rank}", "a") as file:
            file.write(f"{trainer.current_epoch} {trainer.global_step} {rows}\n")


def shard(config: Path, output: Path, *options: str) -> None:
    classifier_process("shard", "--config", str(config), "--output", str(output), "--chunk_bytes", "64kb", *options)


@pytest.fixture(scope="session")
def digit_shards(digits_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 1,797 digits' split, as `classifier shard` writes it with the fault tests' config."""
    folder = built_once(tmp_path_factory, "digit-shards", lambda f: shard(digits_config(f, digits_dir), f / "shards"))
    return folder / "shards"


@pytest.fixture(scope="session")
def streamed_run(digits_dir: Path, digit_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted run of 3 epochs streamed from the shards by 2 loader workers, each batch's rows logged."""

    def fit(folder: Path) -> None:
        config = digits_config(folder, digits_dir)
        flags = ["--data.shards", str(digit_shards), "--data.num_workers", "2"]
        code, stderr = run(["fit", "--config", str(config), *flags], folder / "samples.log")
        assert code == 0, stderr

    return built_once(tmp_path_factory, "streamed-run", fit)


def test_shards_hold_each_split_as_the_original_files_bytes(few_digits: Path, tmp_path: Path) -> None:
    config = tiny_config(tmp_path, few_digits)
    done = classifier_here("shard", "--config", str(config), "--output", str(tmp_path / "shards"))
    assert done.returncode == 0, done.stderr

    meta = read_meta(str(tmp_path / "shards"))
    rows = [line.split(",") for line in meta.split_table.strip().splitlines()[1:]]
    assert meta.classes == ["0", "1", "2"] and meta.task == "multiclass" and meta.skipped == []
    for name in SPLITS:
        listed = [(path, label, fingerprint) for path, label, split, fingerprint in rows if split == name]
        assert meta.counts[name] == len(listed) > 0
        samples = sorted((s for s in StreamingDataset(str(tmp_path / "shards" / name))), key=lambda s: s["row"])
        assert [s["row"] for s in samples] == list(range(len(listed)))
        for sample, (path, label, fingerprint) in zip(samples, listed, strict=True):
            assert sample["path"] == path and sample["fingerprint"] == fingerprint
            assert sample["image"] == (few_digits / path).read_bytes()  # the file itself, not decoded pixels
            assert meta.classes[sample["target"]] == label


def test_a_streamed_split_gives_the_folders_eval_pixels_in_its_order(small_digits: Path, tmp_path: Path) -> None:
    config = tiny_config(tmp_path, small_digits)
    assert classifier_here("shard", "--config", str(config), "--output", str(tmp_path / "shards")).returncode == 0
    settings = {"backbone": "test_resnet", "image_size": [24, 40], "resize_mode": "letterbox", "num_workers": 0}
    folder = ImageFolderDataModule(data_dir=str(small_digits), **settings)
    streamed = ImageFolderDataModule(shards=str(tmp_path / "shards"), **settings)
    for stage, name in (("validate", "val"), ("test", "test")):
        folder.setup(stage)
        streamed.setup(stage)
        expected = list(folder._loader(name))
        got = list(streamed._loader(name))
        assert streamed.paths(name) == folder.paths(name)  # the same files, in the same row order
        assert len(got) == len(expected)
        for (images, targets, rows), (want_images, want_targets, want_rows) in zip(got, expected, strict=True):
            assert images.dtype == torch.uint8 and images.shape[1:] == (3, 24, 40)
            assert torch.equal(rows, want_rows) and torch.equal(targets, torch.as_tensor(want_targets))
            assert torch.equal(images, want_images)
    assert streamed.class_names == folder.class_names and streamed.task == "multiclass"
    secret = ImageFolderDataModule(shards=str(tmp_path / "shards"), shard_storage_options={"credential": "s3cr3t"})
    assert "s3cr3t" not in str(dict(secret.hparams))  # what checkpoints and config files keep
    assert streamed.split_csv == folder.split_csv  # what the checkpoint records

    streamed.setup("fit")  # training: shuffled anew each epoch, each sample once
    loader = streamed._loader("train")
    epochs = [list(loader) for _ in range(2)]
    orders = [[row for _, _, rows in epoch for row in rows.tolist()] for epoch in epochs]
    assert orders[0] != orders[1] and all(len(order) == len(set(order)) > 100 for order in orders)

    rows = [5, 0, 7]  # what export's parity check reads of a streamed run: a few rows, in one pass
    pixels = read_rows(streamed.shard_meta, "test", rows, folder.transform(False), None)
    assert all(torch.equal(pixels[i], folder.datasets["test"][row][0]) for i, row in enumerate(rows))

    # a URL: LitData's remote path, the chunks copied into --data.shard_cache
    url = ImageFolderDataModule(shards=f"file://{tmp_path / 'shards'}", shard_cache=str(tmp_path / "cache"), **settings)
    url.setup("test")
    assert all(torch.equal(a[0], b[0]) for a, b in zip(url._loader("test"), folder._loader("test"), strict=True))
    assert list((tmp_path / "cache").rglob("*.bin"))


def test_every_training_batch_from_shards_mixes_the_classes_as_the_folders_do(digit_shards: Path) -> None:
    """The split table lists the digits class by class, and LitData shuffles chunks, then samples within a window of
    256: written in that order, a batch would hold 2 or 3 digits (test accuracy halved, on the same data)."""
    streamed = ImageFolderDataModule(shards=str(digit_shards), backbone="test_resnet", image_size=32, num_workers=0)
    streamed.setup("fit")
    classes = [len(set(targets.tolist())) for _, targets, _ in streamed._loader("train")]
    assert len(classes) == 19 and min(classes) >= 8  # 1,248 digits in batches of 64, of the 10 classes


def test_multi_label_shards_keep_each_images_label_set(tmp_path: Path) -> None:
    scenes = write_scenes(tmp_path / "scenes", count=40, sizes=(40, 56))
    data = {"manifest": str(scenes / "labels.csv"), "label_delimiter": ";", "data_dir": None}
    config = tiny_config(tmp_path, scenes, data=data)
    assert classifier_here("shard", "--config", str(config), "--output", str(tmp_path / "shards")).returncode == 0
    settings = {"backbone": "test_resnet", "image_size": 32, "num_workers": 0}
    folder = ImageFolderDataModule(manifest=str(scenes / "labels.csv"), label_delimiter=";", **settings)
    streamed = ImageFolderDataModule(shards=str(tmp_path / "shards"), **settings)
    assert streamed.task == "multilabel" and streamed.class_names == folder.class_names
    folder.setup("test")
    streamed.setup("test")
    (images, targets, rows), *_ = streamed._loader("test")
    (want_images, want_targets, want_rows), *_ = folder._loader("test")
    assert targets.dtype == want_targets.dtype and torch.equal(targets, want_targets)  # 0/1 rows, one per label
    assert torch.equal(rows, want_rows) and torch.equal(images, want_images)
    assert 0 < targets.sum() < targets.numel()


def test_bad_shards_and_bad_files_end_with_errors_that_name_them(few_digits: Path, tmp_path: Path) -> None:
    data = tmp_path / "digits"
    shutil.copytree(few_digits, data)
    broken = save_image(data / "1" / "broken.png", Image.new("RGB", (8, 8)))
    broken.write_bytes(broken.read_bytes()[:40])  # a cut-short PNG
    config = tiny_config(tmp_path, data)

    refused = classifier_here("shard", "--config", str(config), "--output", str(tmp_path / "refused"))
    assert refused.returncode != 0 and "broken.png" in refused.stderr and "skip_bad_images" in refused.stderr
    assert not (tmp_path / "refused").exists()  # nothing half written

    output = tmp_path / "skipped"
    skipped = classifier_here(
        "shard", "--config", str(config), "--output", str(output), "--data.skip_bad_images", "true"
    )
    assert skipped.returncode == 0, skipped.stderr
    meta = json.loads((output / META_FILE).read_text())
    assert meta["skipped"] == ["1/broken.png"]
    assert sum(meta["counts"].values()) == 24  # the 24 readable digits

    again = classifier_here("shard", "--config", str(config), "--output", str(output))
    assert again.returncode != 0 and str(output) in again.stderr and "not empty" in again.stderr

    for flags, words in (
        (["--data.shards", str(tmp_path / "none")], [str(tmp_path / "none"), META_FILE]),
        (["--data.shards", str(output), "--data.cache", "ram"], ["--data.shards", "--data.cache none"]),
        (["--data.shards", str(output), "--data.splits", str(tmp_path / "x.csv")], ["--data.splits", "shard"]),
        (["--data.shards", str(output), "--data.num_folds", "3", "--data.fold", "1"], ["--data.fold 1", "no folds"]),
        (["--data.shards", "hf://datasets/me/digits"], ["hf://datasets/me/digits", "Parquet"]),
    ):
        failed = classifier_here("fit", "--config", str(config), *flags)
        assert failed.returncode != 0
        assert all(word in failed.stderr for word in words), failed.stderr
        assert "Traceback" not in failed.stderr


@pytest.mark.slow
def test_a_run_from_shards_tests_predicts_exports_and_serves_as_any_other(
    streamed_run: Path, digits_dir: Path, tmp_path: Path
) -> None:
    run_folder = run_dir(streamed_run, 0)
    checkpoint = run_folder / "checkpoints" / "best.ckpt"
    recorded = read_checkpoint(checkpoint)
    assert recorded["datamodule_hyper_parameters"]["shards"].endswith("shards")

    classifier_process("test", "--ckpt_path", str(checkpoint), "--trainer.default_root_dir", str(tmp_path))
    metrics = json.loads((run_folder / "test" / "metrics.json").read_text())
    predictions = read_csv(run_folder / "test" / "predictions.csv")
    test_split = [row["path"] for row in read_csv(run_folder / "splits.csv") if row["split"] == "test"]
    assert sorted(Path(row["path"]).relative_to(digits_dir).as_posix() for row in predictions) == sorted(test_split)
    right = sum(row["prediction"] == row["target"] for row in predictions) / len(predictions)
    assert metrics["test/acc"] == pytest.approx(right, abs=1e-6) and right > 0.3  # 10 classes: chance is 0.1

    photos = tmp_path / "photos"
    for digit in "37":
        save_image(photos / f"{digit}.png", Image.open(sorted((digits_dir / digit).iterdir())[0]))
    predicted = classifier_process(
        "predict",
        "--ckpt_path",
        str(checkpoint),
        "--data.predict_dir",
        str(photos),
        "--trainer.default_root_dir",
        str(tmp_path),
    )
    assert predicted.returncode == 0

    exported = tmp_path / "export"
    classifier_process("export", "--ckpt_path", str(checkpoint), "--output", str(exported))
    parity = json.loads((exported / "parity.json").read_text())
    assert parity["passed"] and "test split" in parity["images"]
    model, image = exported / "model.onnx", photos / "3.png"
    expected = OnnxPredictor(model).classify(image)
    result = served(checkpoint, image)
    assert result["top"][0]["class"] == expected.prediction
    assert result["top"][0]["probability"] == pytest.approx(expected.probability, abs=1e-4)


@pytest.mark.slow
def test_a_kill_inside_a_streamed_epoch_resumes_to_the_uninterrupted_weights(
    streamed_run: Path, digits_dir: Path, digit_shards: Path, tmp_path: Path
) -> None:
    config, log = digits_config(tmp_path, digits_dir), tmp_path / "samples.log"
    streaming = ["--data.shards", str(digit_shards), "--data.num_workers", "2"]
    kill = ["--trainer.callbacks+=tests.helpers.faults.KillAt", "--trainer.callbacks.step=51"]
    code, _ = run(["fit", "--config", str(config), *streaming, "--checkpoint.every_n_train_steps", "10", *kill], log)
    assert code == -signal.SIGKILL
    saved = read_checkpoint(last_of(tmp_path))
    assert (saved["epoch"], saved["global_step"]) == (1, 50)  # inside epoch 1, which began at step 39
    before = [entry for entry in read_sample_log(log) if entry[1] < 50]
    log.unlink()

    code, stderr = run(["fit", "--config", str(config), *streaming, "--ckpt_path", "last"], log)

    assert code == 0, stderr
    reference = read_sample_log(streamed_run / "samples.log")
    after = read_sample_log(log)
    seen = [row for e, _, rows in before + after if e == 1 for row in rows]
    assert len(seen) == len(set(seen)) == STEPS_PER_EPOCH * 32  # one pass: each sample once, none twice
    assert [(e, s) for e, s, _ in before + after] == [(e, s) for e, s, _ in reference]
    assert [rows for *_, rows in before + after] == [rows for *_, rows in reference]  # in the same order
    assert_same_weights(last_of(tmp_path), last_of(streamed_run))


@pytest.mark.slow
def test_ddp_from_shards_gives_each_rank_equal_batches_of_other_samples(
    digits_dir: Path, digit_shards: Path, tmp_path: Path
) -> None:
    config, log = digits_config(tmp_path, digits_dir, max_epochs=2), tmp_path / "samples.log"
    ddp = ["--trainer.devices", "2", "--trainer.strategy", "ddp", "--data.num_workers", "1"]
    logged = ["--trainer.callbacks+=tests.test_shards.RankSampleLog", f"--trainer.callbacks.path={log}"]
    args = ["fit", "--config", str(config), "--data.shards", str(digit_shards), *ddp, *logged]
    code, stderr = run([*args, "--checkpoint.every_n_train_steps", "5", "--trainer.max_steps", "25"])
    assert code == 0, stderr

    ranks = [read_sample_log(Path(f"{log}.{rank}")) for rank in range(2)]
    for epoch in (0, 1):
        batches = [[rows for e, _, rows in entries if e == epoch] for entries in ranks]
        assert len(batches[0]) == len(batches[1]) > 0  # equal batch counts: no rank waits for the other
        rows = [row for share in batches for batch in share for row in batch]
        assert len(rows) == len(set(rows))  # no sample twice within the epoch, across the ranks
        if epoch == 0:
            assert len(batches[0]) == STEPS_PER_EPOCH // 2  # 1,248 samples in batches of 32 over 2 ranks
    saved = read_checkpoint(last_of(tmp_path))
    assert saved["global_step"] == 25 and "stream" in saved["ImageFolderDataModule"]

    one = classifier_here("fit", "--config", str(config), "--data.shards", str(digit_shards), "--ckpt_path", "last")
    assert one.returncode != 0 and "streamed from shards by 2 processes, and this run has 1" in one.stderr, one.stderr
