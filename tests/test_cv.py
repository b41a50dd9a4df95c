"""`classifier cv`: folds, out-of-fold predictions, summary statistics, the ensemble, and aggregation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from classifier import cli_main
from classifier.commands.cv import evaluation_args
from tests.helpers import read_csv, rounded_for_people, run_dir, tiny_config

FOLDS = 3


@pytest.fixture(scope="module")
def cross_validated(few_digits: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp_path = tmp_path_factory.mktemp("cv")
    config = tiny_config(tmp_path, few_digits, trainer={"max_epochs": 2})
    cli_main(["cv", "--config", str(config), "--data.num_folds", str(FOLDS)])
    return tmp_path


def test_every_fold_trains_in_its_own_run_folder(cross_validated: Path) -> None:
    for fold in range(FOLDS):
        splits = read_csv(run_dir(cross_validated, fold) / "splits.csv")
        assert {row["fold"] for row in splits if row["split"] == "val"} == {str(fold)}
        assert (run_dir(cross_validated, fold) / "checkpoints" / "best.ckpt").is_file()


def test_out_of_fold_predictions_cover_each_non_test_image_once(cross_validated: Path, few_digits: Path) -> None:
    splits = read_csv(run_dir(cross_validated, 0) / "splits.csv")
    fold_of = {str(few_digits / row["path"]): row["fold"] for row in splits if row["split"] != "test"}
    oof = read_csv(cross_validated / "lightning_logs" / "tiny" / "cv_0" / "oof_predictions.csv")
    assert sorted(row["path"] for row in oof) == sorted(fold_of)
    assert all(row["fold"] == fold_of[row["path"]] for row in oof)  # predicted by the model that held it out
    probs = np.array([[float(v) for k, v in row.items() if k.startswith("prob_")] for row in oof])
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)


def test_summary_mean_and_std_are_those_of_the_folds(cross_validated: Path) -> None:
    cv_dir = cross_validated / "lightning_logs" / "tiny" / "cv_0"
    summary = json.loads((cv_dir / "cv_summary.json").read_text())
    per_fold = [
        json.loads((cv_dir / f"fold_{fold}" / "validate" / "metrics.json").read_text()) for fold in range(FOLDS)
    ]
    # each fold's validation of its best checkpoint scores what the fit recorded as best
    fit_best = [json.loads((run_dir(cross_validated, fold) / "summary.json").read_text()) for fold in range(FOLDS)]
    assert [metrics["val/f1_macro"] for metrics in per_fold] == pytest.approx(
        [fit["best_value"] for fit in fit_best], abs=1e-6
    )
    assert set(summary["mean"]) == set(per_fold[0]) and "val/f1_macro" in summary["mean"]
    assert rounded_for_people(summary) and rounded_for_people(per_fold)
    for name, mean in summary["mean"].items():
        values = [metrics[name] for metrics in per_fold]
        assert mean == pytest.approx(np.mean(values), rel=5e-6, abs=1e-12), name  # 6 significant digits
        assert summary["std"][name] == pytest.approx(np.std(values), rel=5e-6, abs=1e-12), name
    for fold, metrics in enumerate(summary["folds"]):
        oof = read_csv(cross_validated / "lightning_logs" / "tiny" / "cv_0" / "oof_predictions.csv")
        rows = [row for row in oof if row["fold"] == str(fold)]
        accuracy = np.mean([row["target"] == row["prediction"] for row in rows])
        assert metrics["val/acc"] == pytest.approx(accuracy, abs=1e-6)


def test_fold_ensemble_averages_probabilities_on_the_test_split(cross_validated: Path) -> None:
    cv_dir = cross_validated / "lightning_logs" / "tiny" / "cv_0"
    per_fold = [read_csv(cv_dir / f"fold_{fold}" / "test" / "predictions.csv") for fold in range(FOLDS)]
    classes = [k.removeprefix("prob_") for k in per_fold[0][0] if k.startswith("prob_")]
    averaged = np.mean([[[float(row[f"prob_{c}"]) for c in classes] for row in rows] for rows in per_fold], axis=0)
    ensemble = read_csv(cv_dir / "ensemble" / "predictions.csv")
    written = np.array([[float(row[f"prob_{c}"]) for c in classes] for row in ensemble])
    np.testing.assert_allclose(written, averaged, atol=1e-6)
    metrics = json.loads((cv_dir / "ensemble" / "metrics.json").read_text())
    targets = [classes.index(row["target"]) for row in ensemble]
    assert metrics["test/acc"] == pytest.approx(np.mean(averaged.argmax(axis=1) == targets), abs=1e-6)
    assert (cv_dir / "ensemble" / "confusion_matrix.png").is_file()


@pytest.fixture(scope="module")
def two_folds(few_digits: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run folders of two folds trained apart, fold 1 first (version_0), as a SLURM array may: each test copies
    them."""
    tmp_path = tmp_path_factory.mktemp("two_folds")
    config = tiny_config(tmp_path, few_digits, trainer={"max_epochs": 1})
    for fold in (1, 0):
        cli_main(["fit", "--config", str(config), "--data.num_folds", "2", "--data.fold", str(fold)])
    return tmp_path / "lightning_logs" / "tiny"


def test_folds_trained_apart_are_aggregated(
    two_folds: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    shutil.copytree(two_folds, tmp_path / "lightning_logs" / "tiny")  # folds 1 and 0, in that order
    monkeypatch.setenv("COLUMNS", "80")  # what rich assumes when output goes to a file
    capsys.readouterr()
    cli_main(["cv", "--aggregate", str(tmp_path / "lightning_logs" / "tiny")])
    summary = json.loads((tmp_path / "lightning_logs" / "tiny" / "cv_0" / "cv_summary.json").read_text())
    assert summary["runs"] == [str(run_dir(tmp_path, 1)), str(run_dir(tmp_path, 0))]  # fold order
    printed = capsys.readouterr().out
    (header,) = [line for line in printed.splitlines() if line.startswith("┃ fold")]  # one line, none cut short
    assert [cell.strip() for cell in header.split("┃")[1:-1]] == ["fold"] + [
        name.removeprefix("val/") for name in summary["mean"] if name != "val/loss"
    ] + ["loss"]
    assert "…" not in printed


def test_aggregate_takes_the_newest_run_of_each_fold(two_folds: Path, few_digits: Path, tmp_path: Path) -> None:
    shutil.copytree(two_folds, tmp_path / "lightning_logs" / "tiny")  # folds 1 and 0, in that order
    config = tiny_config(tmp_path, few_digits, trainer={"max_epochs": 1})
    # fold 0 retrained after a change: version_2 replaces version_1
    cli_main(["fit", "--config", str(config), "--data.num_folds", "2", "--data.fold", "0"])
    cli_main(["cv", "--aggregate", str(tmp_path / "lightning_logs" / "tiny")])
    summary = json.loads((tmp_path / "lightning_logs" / "tiny" / "cv_0" / "cv_summary.json").read_text())
    assert summary["runs"] == [str(run_dir(tmp_path, 2)), str(run_dir(tmp_path, 0))]


def test_aggregate_names_the_missing_folds(few_digits: Path, tmp_path: Path) -> None:
    config = tiny_config(tmp_path, few_digits, trainer={"max_epochs": 1})
    cli_main(["fit", "--config", str(config), "--data.num_folds", "3", "--data.fold", "1"])
    with pytest.raises(ValueError, match=r"no finished run \(checkpoints/best.ckpt\) for folds \[0, 2\]"):
        cli_main(["cv", "--aggregate", str(tmp_path / "lightning_logs" / "tiny")])


def test_cv_without_folds_is_refused_before_training(few_digits: Path, tmp_path: Path) -> None:
    config = tiny_config(tmp_path, few_digits)
    with pytest.raises(ValueError, match="classifier cv needs --data.num_folds K"):
        cli_main(["cv", "--config", str(config)])
    assert not (tmp_path / "lightning_logs").exists()


@pytest.mark.slow
def test_validate_and_test_runs_get_the_users_trainer_flags(few_digits: Path, tmp_path: Path) -> None:
    """From --config (limit_val_batches) and from the command line (limit_test_batches); model and data settings
    still come from each fold's checkpoint (batch_size 3). Each fold validates on 10 images and tests on 4."""
    config = tiny_config(tmp_path, few_digits, trainer={"max_epochs": 1, "limit_val_batches": 2},
                         data={"batch_size": 3})  # fmt: skip
    cli_main(["cv", "--config", str(config), "--data.num_folds", "2", "--trainer.limit_test_batches", "1"])
    cv_dir = tmp_path / "lightning_logs" / "tiny" / "cv_0"
    for fold in range(2):
        assert len(read_csv(cv_dir / f"fold_{fold}" / "validate" / "predictions.csv")) == 2 * 3
        assert len(read_csv(cv_dir / f"fold_{fold}" / "test" / "predictions.csv")) == 1 * 3


@pytest.mark.slow
def test_cv_folders_are_never_reused(two_folds: Path, tmp_path: Path) -> None:
    root = shutil.copytree(two_folds, tmp_path / "tiny")
    (root / "cv_1").mkdir()  # cv_0 and cv_1 were made, then cv_0 deleted
    (root / "cv_1" / "notes.txt").write_text("mine")
    cli_main(["cv", "--aggregate", str(root)])
    assert (root / "cv_2" / "cv_summary.json").is_file()
    assert [path.name for path in (root / "cv_1").iterdir()] == ["notes.txt"]


@pytest.mark.slow
def test_only_rank_zero_aggregates(two_folds: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = shutil.copytree(two_folds, tmp_path / "tiny")
    (root / "cv_0").mkdir()  # made by rank 0 before its first trainer started this rank
    monkeypatch.setattr(rank_zero_only, "rank", 1)  # what Lightning's strategies set on the other ranks
    cli_main(["cv", "--aggregate", str(root)])
    assert sorted(path.name for path in root.glob("cv_*")) == ["cv_0"]  # rank 0's folder, no new one
    assert (root / "cv_0" / "fold_1" / "validate").is_dir()  # this rank took part in the evaluations
    assert not (root / "cv_0" / "cv_summary.json").exists() and not (root / "cv_0" / "ensemble").exists()


def test_evaluation_runs_keep_the_machine_settings_but_not_the_models(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"trainer": {"max_epochs": 3}, "model": {"drop_rate": 0.2, "compile": True},
                                      "data": {"fold": 1, "num_workers": 2, "cache": "ram"}}))  # fmt: skip
    flags = ["-c", str(config), "--data.fold", "1", "--data.num_workers=3", "--data.decode", "cpu",
             "--model.drop_rate", "0.1", "--trainer.precision", "bf16-mixed"]  # fmt: skip
    kept = evaluation_args(flags)
    assert kept[2:] == ["--data.num_workers=3", "--data.decode", "cpu", "--trainer.precision", "bf16-mixed"]
    assert kept[0] == "--config" and yaml.safe_load(kept[1]) == {
        "trainer": {"max_epochs": 3},
        "model": {"compile": True},
        "data": {"num_workers": 2, "cache": "ram"},
    }
