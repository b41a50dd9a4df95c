"""The user's path: fit, then test/validate/predict from the checkpoint alone, through the `classifier` CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import yaml
from PIL import Image
from sklearn.datasets import load_digits

from classifier import ImageClassifier, cli_main
from classifier.cli.base import ClassifierCLI
from tests.helpers import REPO, read_csv, run_dir, spy_of, tiny_config

METRICS = {"acc", "balanced_acc", "f1_macro", "f1_weighted", "top5_acc", "ece", "loss"}


@pytest.fixture(scope="module")
def trained(small_digits: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny fit shared by the tests that only read its outputs."""
    tmp_path = tmp_path_factory.mktemp("trained")
    config = tiny_config(tmp_path, small_digits, data={"image_size": 24, "seed": 3, "val_fraction": 0.2})
    cli_main(["fit", "--config", str(config)])
    return tmp_path


def test_fit_writes_checkpoints_splits_and_reports_best(trained: Path, caplog: pytest.LogCaptureFixture) -> None:
    checkpoints = run_dir(trained, 0) / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["best.ckpt", "last.ckpt"]
    rows = read_csv(run_dir(trained, 0) / "splits.csv")
    assert len(rows) == 200 and list(rows[0]) == ["path", "label", "split", "fingerprint"]
    assert {row["split"] for row in rows} == {"train", "val", "test"}


def test_fit_prints_where_best_ckpt_is(small_digits: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = tiny_config(tmp_path, small_digits, trainer={"max_epochs": 1})
    with caplog.at_level("INFO", logger="classifier"):
        cli_main(["fit", "--config", str(config)])
    assert str(run_dir(tmp_path, 0) / "checkpoints" / "best.ckpt") in caplog.text


def test_test_from_checkpoint_alone_restores_model_and_data(
    trained: Path, small_digits: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(trained)  # no config in sight: everything must come from the checkpoint
    best = run_dir(trained, 0) / "checkpoints" / "best.ckpt"
    cli_main(["test", "--ckpt_path", str(best)])
    test_dir = run_dir(trained, 0) / "test"  # filed under the run of the checkpoint it evaluates
    metrics = json.loads((test_dir / "metrics.json").read_text())
    assert set(metrics) == {f"test/{name}" for name in METRICS}
    # data folder, seed, fractions and classes restored: the same test split as the fit run
    fit_splits = read_csv(run_dir(trained, 0) / "splits.csv")
    assert read_csv(test_dir / "splits.csv") == fit_splits
    config = yaml.safe_load((test_dir / "config.yaml").read_text())
    assert config["data"]["image_size"] == 24 and config["data"]["seed"] == 3
    assert config["data"]["classes"] == [str(d) for d in range(10)]
    hparams = yaml.safe_load((test_dir / "hparams.yaml").read_text())
    assert hparams["image_size"] == 24 and hparams["backbone"] == "test_resnet"
    predictions = read_csv(test_dir / "predictions.csv")
    test_paths = sorted(str(small_digits / row["path"]) for row in fit_splits if row["split"] == "test")
    assert sorted(row["path"] for row in predictions) == test_paths
    assert all(row["target"] == Path(row["path"]).parent.name for row in predictions)
    accuracy = sum(row["target"] == row["prediction"] for row in predictions) / len(predictions)
    assert accuracy == pytest.approx(metrics["test/acc"], abs=1e-6)


def test_command_line_flags_win_over_checkpoint(trained: Path, tmp_path: Path) -> None:
    best = run_dir(trained, 0) / "checkpoints" / "best.ckpt"
    out = tmp_path / "logs"
    cli_main(
        [
            "validate",
            "--ckpt_path",
            str(best),
            "--data.batch_size",
            "7",
            "--trainer.logger.class_path",
            "lightning.pytorch.loggers.CSVLogger",
            "--trainer.logger.init_args.save_dir",
            str(out),
        ]
    )
    version_dir = out / "lightning_logs" / "version_0"
    config = yaml.safe_load((version_dir / "config.yaml").read_text())
    assert config["data"]["batch_size"] == 7 and config["data"]["seed"] == 3
    metrics = json.loads((version_dir / "metrics.json").read_text())
    assert set(metrics) == {f"val/{name}" for name in METRICS}


def test_predict_matches_test_time_predictions(trained: Path, tmp_path: Path) -> None:
    best = run_dir(trained, 0) / "checkpoints" / "best.ckpt"
    cli_main(["test", "--ckpt_path", str(best)])
    tested = {Path(row["path"]).name: row for row in read_csv(run_dir(trained, 0) / "test" / "predictions.csv")}
    photos = tmp_path / "photos" / "nested"  # no labels, any depth
    photos.mkdir(parents=True)
    for row in read_csv(run_dir(trained, 0) / "test" / "predictions.csv"):
        shutil.copy(row["path"], photos / Path(row["path"]).name)
    output = tmp_path / "out" / "preds.csv"
    cli_main(
        [
            "predict",
            "--ckpt_path",
            str(best),
            "--data.predict_dir",
            str(tmp_path / "photos"),
            "--predictions.output",
            str(output),
        ]
    )
    predicted = read_csv(output)
    assert list(predicted[0])[:4] == ["path", "prediction", "confidence", "status"]
    assert len(predicted) == len(tested)
    for row in predicted:
        expected = tested[Path(row["path"]).name]
        assert row["prediction"] == expected["prediction"]
        assert float(row["confidence"]) == pytest.approx(float(expected["confidence"]), abs=1e-5)


def test_predict_writes_into_its_run_folder_by_default(trained: Path, small_digits: Path, tmp_path: Path) -> None:
    best = run_dir(trained, 0) / "checkpoints" / "best.ckpt"
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(small_digits / read_csv(run_dir(trained, 0) / "splits.csv")[0]["path"], photos)
    cli_main(["predict", "--ckpt_path", str(best), "--data.predict_dir", str(photos)])
    written = sorted((trained / "lightning_logs" / "tiny").glob("version_0/predict/*/predictions.csv"))
    rows = read_csv(max(written, key=lambda p: p.stat().st_mtime))
    assert len(rows) == 1 and rows[0]["prediction"] in [str(d) for d in range(10)]


def test_checkpoint_loads_with_weights_only(trained: Path) -> None:
    best = run_dir(trained, 0) / "checkpoints" / "best.ckpt"
    checkpoint = torch.load(best, weights_only=True)
    assert checkpoint["hyper_parameters"]["class_names"] == [str(d) for d in range(10)]
    assert checkpoint["datamodule_hyper_parameters"]["seed"] == 3
    model = ImageClassifier.load_from_checkpoint(best, map_location="cpu")
    assert model.net.backbone.fc.out_features == 10


def test_print_config_is_reusable_as_config(small_digits: Path, tmp_path: Path, capsys) -> None:
    config = tiny_config(tmp_path, small_digits)
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", str(config), "--model.drop_rate", "0.1", "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = tmp_path / "printed.yaml"
    printed.write_text(capsys.readouterr().out)
    assert yaml.safe_load(printed.read_text())["model"]["drop_rate"] == 0.1
    cli_main(["fit", "--config", str(printed), "--trainer.fast_dev_run", "1"])


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b0", "vit_small_patch16_224"])
def test_shipped_configs_build_and_run_one_step(name: str, small_digits: Path, tmp_path: Path) -> None:
    config = REPO / "configs" / f"{name}.yaml"
    overrides = {
        "data.data_dir": small_digits,
        "data.batch_size": 2,
        "data.num_workers": 0,
        "trainer.fast_dev_run": 1,
        "trainer.accelerator": "cpu",
        "trainer.logger.init_args.save_dir": tmp_path,
        "trainer.callbacks+": "tests.helpers.TrainingSpy",
    }
    cli = ClassifierCLI(["fit", "--config", str(config), *(f"--{key}={value}" for key, value in overrides.items())])
    shipped = yaml.safe_load(config.read_text())
    assert cli.model.net.backbone.pretrained_cfg["architecture"] == shipped["model"]["backbone"] == name
    size = shipped["data"].get("image_size") or timm.get_pretrained_cfg(name).input_size[-1]  # the backbone's own
    spy = spy_of(cli.trainer)
    assert [tuple(images.shape) for images in spy.images["train"]] == [(2, 3, size, size)]
    assert cli.trainer.global_step == 1 and len(spy.grad_norms) == 1 and 0 < spy.grad_norms[0] < float("inf")


def test_help_lists_every_command_on_its_own_line(capsys) -> None:
    """`classifier --help` as git and yolo list theirs: each command of the table, with what it does."""
    with pytest.raises(SystemExit) as exit_:
        cli_main(["--help"])
    assert exit_.value.code == 0
    listed = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.startswith("  ")}
    expected = ["fit", "validate", "test", "predict", "lr_find", "cv", "tune", "check-data", "shard", "explain"]
    expected += ["calibrate", "export", "serve", "push", "runs", "demo-data"]
    assert list(listed) == expected
    assert all(len(line.split()) > 2 for line in listed.values())  # each says what it does


def test_an_unknown_command_is_one_line_with_the_closest_names(capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli_main(["tets", "--ckpt_path", "x.ckpt"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: unknown command 'tets' (did you mean test?)",
        "`classifier --help` lists the commands.",
    ]


def test_demo_data_writes_the_bundled_digits_and_a_photo_set(tmp_path: Path) -> None:
    """`classifier demo-data digits|photos DIR`: sklearn's digits as they are, and photos the same seed rewrites."""
    cli_main(["demo-data", "digits", str(tmp_path / "digits")])
    digits = load_digits()
    assert sorted(path.name for path in (tmp_path / "digits").iterdir()) == [str(digit) for digit in range(10)]
    assert sum(1 for _ in (tmp_path / "digits").rglob("*.png")) == len(digits.images) == 1797
    first = np.asarray(Image.open(tmp_path / "digits" / str(digits.target[0]) / "0000.png"))
    np.testing.assert_array_equal(first, np.rint(digits.images[0] * 255 / 16).astype(np.uint8))

    for name in ("a", "b"):
        cli_main(["demo-data", "photos", str(tmp_path / name), "--per_class", "2", "--seed", "5"])
    written = sorted(path.relative_to(tmp_path / "a") for path in (tmp_path / "a").rglob("*.*"))
    assert [path.parent.name for path in written] == ["disc", "disc", "square", "square", "stripes", "stripes"]
    assert all((tmp_path / "a" / path).read_bytes() == (tmp_path / "b" / path).read_bytes() for path in written)
    assert min(Image.open(tmp_path / "a" / path).size[0] for path in written) >= 300  # the full-size set


def test_demo_data_without_a_set_is_one_line(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli_main(["demo-data"])
    assert exit_.value.code == 2
    assert "the following arguments are required: {digits,photos,scenes}" in capsys.readouterr().err
