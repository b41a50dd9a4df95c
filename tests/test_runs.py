"""Run folders: each version_N is a training run, evaluations and lr_find live apart, `classifier runs` lists fits."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from PIL import Image

from classifier import cli_main
from tests.helpers import read_csv, run_dir, tiny_config

FAST = {"max_epochs": 2, "limit_train_batches": 2, "limit_val_batches": 2}
STAMP = re.compile(r"\d{8}-\d{6}(-\d+)?")


@pytest.fixture(scope="module")
def logs(small_digits: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two fits, then what a user does with the first: test, validate, predict twice, and an lr_find."""
    tmp_path = tmp_path_factory.mktemp("logs")
    config = tiny_config(tmp_path, small_digits, trainer=FAST)
    cli_main(["fit", "--config", str(config)])
    cli_main(["fit", "--config", str(config), "--trainer.max_epochs", "1"])
    best = str(run_dir(tmp_path, 0) / "checkpoints" / "best.ckpt")
    photos = tmp_path / "photos"
    photos.mkdir()
    for row in read_csv(run_dir(tmp_path, 0) / "splits.csv")[:3]:
        shutil.copy(small_digits / row["path"], photos / Path(row["path"]).name)
    cli_main(["test", "--ckpt_path", best])
    cli_main(["validate", "--config", str(config), "--ckpt_path", best])  # the config's logger too
    for _ in range(2):  # most likely within the same second
        cli_main(["predict", "--ckpt_path", best, "--data.predict_dir", str(photos)])
    cli_main(["lr_find", "--config", str(config), "--num_training", "5"])
    return tmp_path


def test_only_training_runs_are_version_folders(logs: Path) -> None:
    root = logs / "lightning_logs" / "tiny"
    assert sorted(path.name for path in root.iterdir()) == ["lr_find", "version_0", "version_1"]


def test_evaluations_are_filed_under_the_run_of_their_checkpoint(logs: Path) -> None:
    run = run_dir(logs, 0)
    for stage, prefix in (("test", "test/"), ("validate", "val/")):
        metrics = json.loads((run / stage / "metrics.json").read_text())
        assert metrics and all(name.startswith(prefix) for name in metrics)
        assert (run / stage / "predictions.csv").is_file() and (run / stage / "confusion_matrix.png").is_file()
    predictions = sorted((run / "predict").iterdir())
    assert len(predictions) == 2 and all(STAMP.fullmatch(path.name) for path in predictions)
    assert all(len(read_csv(path / "predictions.csv")) == 3 for path in predictions)
    assert not (run / "metrics.json").exists()  # the fit's own files are left alone


def test_lr_find_has_a_folder_of_its_own(logs: Path) -> None:
    """The sweep's plot and config under lr_find/<time>/, no checkpoints, and nothing of it in the training runs."""
    (sweep,) = (logs / "lightning_logs" / "tiny" / "lr_find").iterdir()
    assert STAMP.fullmatch(sweep.name)
    files = sorted(path.name for path in sweep.iterdir() if not path.name.startswith("events.out.tfevents."))
    # the sweep's points and plot; no checkpoints/ of a sweep
    assert files == ["config.yaml", "hparams.yaml", "lr_find.csv", "lr_find.png", "splits.csv"]
    config = yaml.safe_load((sweep / "config.yaml").read_text())
    assert config["num_training"] == 5 and config["trainer"]["logger"]["init_args"]["version"] == sweep.name
    assert Image.open(sweep / "lr_find.png").size[0] > 300
    assert not list((logs / "lightning_logs" / "tiny").glob("version_*/lr_find.png"))


def test_evaluating_again_replaces_the_files_and_says_so(logs: Path, caplog: pytest.LogCaptureFixture) -> None:
    best = run_dir(logs, 1) / "checkpoints" / "best.ckpt"
    with caplog.at_level("INFO", logger="classifier"):
        cli_main(["test", "--ckpt_path", str(best)])
    assert f"report files: {run_dir(logs, 1) / 'test'}" in caplog.text
    caplog.clear()
    with caplog.at_level("INFO", logger="classifier"):
        cli_main(["test", "--ckpt_path", str(best), "--data.batch_size", "8", "--trainer.limit_test_batches", "1"])
    assert f"report files (replacing the earlier run's): {run_dir(logs, 1) / 'test'}" in caplog.text
    assert len(read_csv(run_dir(logs, 1) / "test" / "predictions.csv")) == 8  # one batch: the new run's


def test_a_checkpoint_outside_a_run_folder_is_filed_by_its_name(
    logs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    copied = tmp_path / "models" / "digits.ckpt"
    copied.parent.mkdir()
    shutil.copy(run_dir(logs, 0) / "checkpoints" / "best.ckpt", copied)
    monkeypatch.chdir(tmp_path)
    cli_main(["test", "--ckpt_path", str(copied)])
    assert (tmp_path / "lightning_logs" / "evaluations" / "digits" / "test" / "metrics.json").is_file()
    assert sorted(path.name for path in (tmp_path / "lightning_logs").iterdir()) == ["evaluations"]


def table_rows(printed: str) -> dict[str, list[str]]:
    """A rich table's body rows, keyed by their first cell."""
    rows = [[cell.strip() for cell in line.split("│")[1:-1]] for line in printed.splitlines() if line.startswith("│")]
    return {row[0]: row[1:] for row in rows}


def test_runs_lists_exactly_the_fits(logs: Path, small_digits: Path, capsys: pytest.CaptureFixture) -> None:
    capsys.readouterr()
    cli_main(["runs", str(logs / "lightning_logs")])
    rows = table_rows(capsys.readouterr().out)
    assert list(rows) == [str(run_dir(logs, 0)), str(run_dir(logs, 1))]
    for version, epochs in ((0, 2), (1, 1)):
        summary = json.loads((run_dir(logs, version) / "summary.json").read_text())
        name, data_dir, monitor, best, listed_epochs, _, status = rows[str(run_dir(logs, version))]
        assert (name, data_dir, monitor) == ("tiny", str(small_digits), "val/f1_macro")
        assert (best, listed_epochs, status) == (f"{summary['best_value']:.4f}", str(epochs), "finished")


def test_an_unfinished_run_shows_its_best_checkpoints_score(
    logs: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run = Path(shutil.copytree(run_dir(logs, 0), tmp_path / "tiny" / "version_0"))
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").unlink()  # as while it trains
    capsys.readouterr()
    cli_main(["runs", str(tmp_path)])
    (row,) = table_rows(capsys.readouterr().out).values()
    assert row[2:5] + row[6:] == ["val/f1_macro", f"{summary['best_value']:.4f}", "2", "unfinished"]
