"""The user's path: fit, then test/validate/predict from the checkpoint alone, through the `classifier` CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from classifier import ImageClassifier, cli_main
from tests.helpers import REPO, read_csv, run_dir, tiny_config

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
    }
    cli_main(["fit", "--config", str(config), *(f"--{key}={value}" for key, value in overrides.items())])


def test_help_names_every_command(capsys) -> None:
    with pytest.raises(SystemExit):
        cli_main(["--help"])
    printed = capsys.readouterr().out
    assert "{fit,validate,test,predict,lr_find}" in printed and "classifier cv" in printed
