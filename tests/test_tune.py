"""`classifier tune`: trials that are real fits, a resumed study that runs only the missing trials, pruned, failed and
killed trials, best.yaml that fits as is, and bad input stopped before any training."""

from __future__ import annotations

import fcntl
import json
import shutil
import signal
from pathlib import Path
from types import SimpleNamespace

import mlflow
import optuna
import pytest
import yaml
from optuna.distributions import FloatDistribution
from optuna.pruners import BasePruner
from PIL import Image

from classifier.cli.entry import cli_main, main
from classifier.commands.tune import tune
from classifier.tune.trial import TrialPruning
from tests.helpers import REPO, read_csv, tiny_config

SEARCH = """\
model.optimizer.init_args.lr: {type: float, low: 1e-3, high: 3.0e-2, log: true}
model.label_smoothing: {type: float, low: 0.0, high: 0.2}
data.batch_size: {type: categorical, choices: [8, 16]}
"""
PARAMS = ("model.optimizer.init_args.lr", "model.label_smoothing", "data.batch_size")


@pytest.fixture(scope="module")
def digits3(digits_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 classes of 60 real digit scans."""
    root = tmp_path_factory.mktemp("digits3") / "digits"
    for digit in ("0", "1", "2"):
        (root / digit).mkdir(parents=True)
        for image in sorted((digits_dir / digit).iterdir())[:60]:
            shutil.copy(image, root / digit / image.name)
    return root


def setup_study(tmp_path: Path, data_dir: Path, search: str, max_epochs: int = 1) -> tuple[Path, Path, Path]:
    """(config, search file, study folder) of a tiny 16 px study logging under tmp_path."""
    config = tiny_config(tmp_path, data_dir, trainer={"max_epochs": max_epochs}, data={"image_size": 16})
    (tmp_path / "search.yaml").write_text(search)
    return config, tmp_path / "search.yaml", tmp_path / "lightning_logs" / "tiny" / "tune"


def config_value(run: Path, key: str) -> object:
    """An option's value in the config.yaml that Lightning wrote for a run."""
    value = yaml.safe_load((run / "config.yaml").read_text())
    for part in key.split("."):
        value = value[part]
    return value


@pytest.fixture(scope="module")
def study(digits3: Path, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A study of 2 trials, then resumed to 3; with the first session's trials.csv and files."""
    tmp_path = tmp_path_factory.mktemp("tune")
    config, search, folder = setup_study(tmp_path, digits3, SEARCH)
    mlflow = REPO / "configs" / "loggers" / "mlflow.yaml"
    args = ["tune", "--config", str(config), "--config", str(mlflow), "--search", str(search)]
    cli_main([*args, "--trials", "2", "--pruner", "none"])
    first_rows = read_csv(folder / "trials.csv")
    first_files = {path: path.stat().st_mtime_ns for path in (folder / "trials").rglob("*") if path.is_file()}
    cli_main([*args, "--trials", "3", "--pruner", "hyperband"])
    return SimpleNamespace(
        tmp_path=tmp_path, config=config, args=args, folder=folder, first_rows=first_rows, first_files=first_files
    )


@pytest.mark.slow
def test_each_trial_is_an_mlflow_run_of_the_study_in_the_fits_store(study: SimpleNamespace) -> None:
    client = mlflow.MlflowClient(f"sqlite:///{study.tmp_path / 'lightning_logs' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tiny-tune")
    runs = {run.info.run_name: run for run in client.search_runs([experiment.experiment_id])}
    assert sorted(runs) == ["trial_0", "trial_1", "trial_2"]
    for row in read_csv(study.folder / "trials.csv"):
        logged = runs[f"trial_{row['number']}"].data
        assert float(logged.params["model.optimizer.init_args.lr"]) == pytest.approx(float(row[PARAMS[0]]))
        assert logged.metrics["hp/best_val_f1_macro"] == pytest.approx(float(row["value"]))


@pytest.mark.slow
def test_resume_runs_only_the_missing_trials(study: SimpleNamespace) -> None:
    rows = read_csv(study.folder / "trials.csv")
    assert [row["number"] for row in study.first_rows] == ["0", "1"]
    assert [row["number"] for row in rows] == ["0", "1", "2"]
    assert rows[:2] == study.first_rows  # recorded once, not rerun
    assert sorted(path.name for path in (study.folder / "trials").iterdir()) == ["trial_0", "trial_1", "trial_2"]
    assert all(path.stat().st_mtime_ns == mtime for path, mtime in study.first_files.items())


@pytest.mark.slow
def test_each_row_is_the_fit_its_run_folder_holds(study: SimpleNamespace) -> None:
    for row in read_csv(study.folder / "trials.csv"):
        run = Path(row["run"])
        assert run == study.folder / "trials" / f"trial_{row['number']}"
        assert row["state"] == "COMPLETE" and not row["error"] and float(row["duration_s"]) > 0
        # the best checkpoint's score, as the fit's own summary.json has it (rounded there to 6 digits)
        summary = json.loads((run / "summary.json").read_text())
        assert float(row["value"]) == pytest.approx(summary["best_value"], rel=5e-6)
        assert summary["best_checkpoint"] == str(run / "checkpoints" / "best.ckpt")
        # the parameters, exactly as the trial's fit was given them
        assert float(row[PARAMS[0]]) == config_value(run, PARAMS[0])
        assert float(row[PARAMS[1]]) == config_value(run, PARAMS[1])
        assert int(row[PARAMS[2]]) == config_value(run, PARAMS[2])


@pytest.mark.slow
def test_best_params_are_the_best_rows(study: SimpleNamespace) -> None:
    rows = read_csv(study.folder / "trials.csv")
    best_row = max(rows, key=lambda row: float(row["value"]))
    best = json.loads((study.folder / "best_params.json").read_text())
    assert best["trial"] == int(best_row["number"]) and best["metric"] == "val/f1_macro"
    assert best["value"] == float(best_row["value"])
    assert best["params"] == {key: yaml.safe_load(best_row[key]) for key in PARAMS}
    importance = json.loads((study.folder / "importance.json").read_text())
    assert sorted(importance["importance"]) == sorted(PARAMS)
    assert sum(importance["importance"].values()) == pytest.approx(1.0, abs=1e-5)
    for figure in ("history.png", "importance.png"):
        assert Image.open(study.folder / figure).format == "PNG"


@pytest.mark.slow
def test_best_yaml_fits_as_is_with_the_best_params(study: SimpleNamespace) -> None:
    best = json.loads((study.folder / "best_params.json").read_text())
    tensorboard, mlflow = yaml.safe_load((study.folder / "best.yaml").read_text())["trainer"]["logger"]
    logger = tensorboard["init_args"]
    assert (logger["save_dir"], logger["name"], logger["version"]) == (
        str(study.tmp_path / "lightning_logs"),
        "tiny",
        None,
    )
    assert mlflow["class_path"] == "classifier.training.tracking.MLFlowLogger"  # the user's, not the trials' experiment
    assert (mlflow["init_args"]["experiment_name"], mlflow["init_args"]["tracking_uri"]) == (None, None)
    cli_main(["fit", "--config", str(study.folder / "best.yaml")])
    run = study.tmp_path / "lightning_logs" / "tiny" / "version_0"
    assert {key: config_value(run, key) for key in PARAMS} == best["params"]
    # the same config and seed: the same training, so the same best score as the trial's
    summary = json.loads((run / "summary.json").read_text())
    assert summary["best_value"] == pytest.approx(best["value"], rel=5e-6)


class PruneTheSecondTrial(BasePruner):
    """Prunes trial 1 at its first report; a test's pruner, through the Python API."""

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        return trial.number == 1


@pytest.mark.slow
def test_a_pruned_trial_stops_and_is_recorded_as_pruned(digits3: Path, tmp_path: Path) -> None:
    search = "model.label_smoothing: {type: float, low: 0.0, high: 0.2}\n"
    config, search_file, folder = setup_study(tmp_path, digits3, search, max_epochs=2)
    tune(["--config", str(config), "--search", str(search_file), "--trials", "2"], pruner=PruneTheSecondTrial())
    rows = read_csv(folder / "trials.csv")
    assert [(row["number"], row["state"]) for row in rows] == [("0", "COMPLETE"), ("1", "PRUNED")]
    summaries = [json.loads((Path(row["run"]) / "summary.json").read_text()) for row in rows]
    assert [summary["epochs"] for summary in summaries] == [2, 1]  # pruned after its first of 2 epochs
    assert float(rows[1]["value"]) == pytest.approx(summaries[1]["best_value"], rel=5e-6)  # its one report
    assert json.loads((folder / "best_params.json").read_text())["trial"] == 0  # a pruned trial is never the best


@pytest.mark.slow
def test_a_failing_trial_is_recorded_and_a_killed_one_runs_again(digits3: Path, tmp_path: Path) -> None:
    search = "model.label_smoothing: {type: float, low: 0.0, high: 2.0}\n"
    config, search_file, folder = setup_study(tmp_path, digits3, search)
    folder.mkdir(parents=True)
    study = optuna.create_study(storage=f"sqlite:///{folder / 'tune.db'}", study_name="tiny", direction="maximize")
    study.enqueue_trial({"model.label_smoothing": 0.05})
    study.ask({"model.label_smoothing": FloatDistribution(0.0, 2.0)})  # trial 0, left running as a kill -9 leaves it
    study.enqueue_trial({"model.label_smoothing": 1.5})  # trial 1: torch refuses it at the first training step
    cli_main(["tune", "--config", str(config), "--search", str(search_file), "--trials", "1"])
    rows = read_csv(folder / "trials.csv")
    assert [(row["number"], row["state"]) for row in rows] == [("0", "FAIL"), ("1", "FAIL"), ("2", "COMPLETE")]
    assert rows[0]["error"] == "interrupted: its session ended while it ran"
    assert rows[1]["error"] == "RuntimeError: label_smoothing must be between 0.0 and 1.0. Got: 1.5"
    assert (rows[2]["model.label_smoothing"], rows[2]["retry_of"]) == ("0.05", "0")  # the killed trial, again
    assert config_value(Path(rows[2]["run"]), "model.label_smoothing") == 0.05


@pytest.mark.slow
def test_a_trial_stopped_by_ctrl_c_runs_again_at_the_next_session(
    digits3: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config, search_file, folder = setup_study(
        tmp_path, digits3, "model.label_smoothing: {type: float, low: 0, high: 0.2}\n"
    )
    args = ["tune", "--config", str(config), "--search", str(search_file), "--trials", "1"]

    def ctrl_c(*_) -> None:
        raise KeyboardInterrupt

    handler = signal.getsignal(signal.SIGINT)  # Lightning ignores Ctrl-C once it has stopped a run for one
    with monkeypatch.context() as patch, pytest.raises(SystemExit):  # Lightning's answer to Ctrl-C
        patch.setattr(TrialPruning, "on_validation_end", ctrl_c)
        cli_main(args)
    signal.signal(signal.SIGINT, handler)
    cli_main(args)
    rows = read_csv(folder / "trials.csv")
    assert [(row["number"], row["state"], row["retry_of"]) for row in rows] == [
        ("0", "FAIL", ""),
        ("1", "COMPLETE", "0"),
    ]
    assert rows[0]["error"] == "interrupted: the session was stopped (SystemExit)"
    assert rows[1]["model.label_smoothing"] == rows[0]["model.label_smoothing"]


def test_a_second_session_of_a_running_study_is_refused(digits3: Path, tmp_path: Path, capsys) -> None:
    config, search_file, folder = setup_study(tmp_path, digits3, SEARCH)
    folder.mkdir(parents=True)
    with open(folder / "tune.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as the running session holds it
        with pytest.raises(SystemExit) as exit_info:
            main(["tune", "--config", str(config), "--search", str(search_file)])
    assert exit_info.value.code == 2
    assert f"another classifier tune is running the study in {folder}" in capsys.readouterr().err
    assert sorted(path.name for path in folder.iterdir()) == ["tune.lock"]  # no study, no trial


@pytest.mark.slow
def test_a_study_whose_every_trial_fails_stops_naming_the_first_failure(
    digits3: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    config, search_file, folder = setup_study(
        tmp_path, digits3, "model.label_smoothing: {type: float, low: 1.5, high: 2.0}\n"
    )
    with pytest.raises(SystemExit) as exit_info:
        main(["tune", "--config", str(config), "--search", str(search_file), "--trials", "5"])
    assert exit_info.value.code == 1
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert "3 trials in a row failed" in line
    assert "trial 0 (model.label_smoothing=" in line and "label_smoothing must be between 0.0 and 1.0" in line
    assert [row["state"] for row in read_csv(folder / "trials.csv")] == ["FAIL"] * 3


BAD_INPUT = {
    "unknown key": ("model.lrr: {type: float, low: 0.1, high: 0.2}", [], "model.lrr is not an option of fit"),
    "link target": ("data.backbone: {type: categorical, choices: [a, b]}", [], "data.backbone changes nothing"),
    "refused value": ("data.batch_size: {type: categorical, choices: [16, 1.5]}", [], "data.batch_size 1.5: --data."
                      "batch_size 1.5: expected int"),
    "bad bounds": ("model.label_smoothing: {type: float, low: 0.3, high: 0.2}", [], "label_smoothing: `low <= high`"),
    "bad pruner": (SEARCH, ["--pruner", "medain"], "argument --pruner: invalid choice: 'medain'"),
    "metric not logged": (SEARCH, ["--metric", "val/f1_mcro"], "--metric val/f1_mcro is not a metric fit logs"),
    "ddp": (SEARCH, ["--trainer.devices", "2"], "--trainer.devices 2"),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_input_stops_before_any_training_with_one_line(
    case: str, digits3: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    search, flags, message = BAD_INPUT[case]
    config, search_file, folder = setup_study(tmp_path, digits3, search + "\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["tune", "--config", str(config), "--search", str(search_file), *flags])
    assert exit_info.value.code == 2
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert message in line
    assert not folder.exists()  # no study, no trial


@pytest.mark.slow
def test_a_study_refuses_another_metric_and_keeps_its_files(
    study: SimpleNamespace, capsys: pytest.CaptureFixture
) -> None:
    files = {name: (study.folder / name).read_bytes() for name in ("tune.db", "trials.csv", "best.yaml")}
    with pytest.raises(SystemExit) as exit_info:
        main([*study.args, "--trials", "4", "--metric", "val/loss", "--direction", "minimize"])
    assert exit_info.value.code == 2
    assert "--metric val/loss: study tiny scores its trials by val/f1_macro" in capsys.readouterr().err
    assert {name: (study.folder / name).read_bytes() for name in files} == files


@pytest.mark.parametrize(
    ("config", "logger_name"),
    [
        ("configs/resnet18.yaml", "resnet18"),
        ("configs/recipes/cifar_vit.yaml", "cifar_vit"),
        ("configs/recipes/speedrun_digits.yaml", "speedrun_digits"),
    ],
)
def test_each_shipped_search_space_fits_its_config(
    config: str, logger_name: str, digits3: Path, tmp_path: Path
) -> None:
    logs = tmp_path / "logs"
    search = REPO / "configs" / "search" / f"{logger_name}.yaml"
    cli_main(["tune", "--config", str(REPO / config), "--search", str(search), "--data.data_dir", str(digits3),
              "--trainer.logger.init_args.save_dir", str(logs), "--timeout", "0"])  # fmt: skip
    folder = logs / logger_name / "tune"  # <save_dir>/<logger name>/tune
    assert (folder / "tune.db").is_file() and read_csv(folder / "trials.csv") == []
    assert not (folder / "trials").exists()  # --timeout 0: no trial started
