"""MLflow beside TensorBoard (configs/loggers/mlflow.yaml): what real fits, resumes, evaluations and a cv leave in
the store, read back through MLflow's client; TensorBoard's HPARAMS; where the store is; bad stores."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from lightning.pytorch.loggers import TensorBoardLogger
from mlflow import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

from classifier import cli_main
from classifier.cli.base import ClassifierCLI
from classifier.cli.entry import main
from classifier.core.console import DEBUG_HINT
from tests.helpers import REPO, digit_subset, read_csv, run_dir, tiny_config

MLFLOW_CONFIG = str(REPO / "configs" / "loggers" / "mlflow.yaml")
ENV = "MLFLOW_TRACKING_URI"
ROUNDED = {"rel": 1e-5, "abs": 1e-6}  # the run folder's JSON files keep 6 significant digits


@pytest.fixture(scope="module")
def digits3(digits_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 images of each of three digits."""
    return digit_subset(digits_dir, tmp_path_factory.mktemp("digits3") / "digits", per_class=24, digits="012")


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder whose lightning_logs/ every test's runs share, and so their default store, which MLflow sets up
    once (2-8 s)."""
    return tmp_path_factory.mktemp("tracked")


def store_of(root: Path) -> str:
    return f"sqlite:///{root / 'lightning_logs' / 'mlflow.db'}"


def config_for(root: Path, data: Path, name: str) -> Path:
    """A tiny 1-epoch config whose TensorBoard logger is `name` under root/lightning_logs."""
    logger = {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": str(root / "lightning_logs"), "name": name},
    }
    return tiny_config(root / name, data, trainer={"max_epochs": 1, "logger": logger})


def runs_named(client: MlflowClient, experiment: str) -> dict[str, object]:
    """The runs of an experiment by run name."""
    found = client.get_experiment_by_name(experiment)
    return {run.info.run_name: run for run in client.search_runs([found.experiment_id])} if found else {}


def artifacts(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    files = set()
    for item in client.list_artifacts(run_id, path):
        files |= artifacts(client, run_id, item.path) if item.is_dir else {item.path}
    return files


def steps_per_epoch(run_folder: Path) -> int:
    """Training batches of 32 in a run's train split, the last partial one dropped."""
    return sum(row["split"] == "train" for row in read_csv(run_folder / "splits.csv")) // 32


def git_repo(folder: Path) -> str:
    """Make `folder` a git repository with one commit; its SHA."""
    folder.mkdir(parents=True, exist_ok=True)
    git = ["git", "-C", str(folder), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "start"], check=True)
    return subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture(scope="module")
def fitted(root: Path, digits3: Path) -> tuple[Path, str]:
    """A 1-epoch fit with MLflow and log_checkpoint, run from inside a git repository: (run folder, its SHA)."""
    project = root / "project"
    sha = git_repo(project)
    config = config_for(root, digits3, "fitted")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(project)
        patch.delenv(ENV, raising=False)
        cli_main(["fit", "--config", str(config), "--config", MLFLOW_CONFIG, "--trainer.logger.log_checkpoint", "true"])
    return root / "lightning_logs" / "fitted" / "version_0", sha


@pytest.mark.slow
def test_a_fit_logs_its_config_metrics_files_and_commit(fitted: tuple[Path, str], root: Path) -> None:
    run_folder, sha = fitted
    client = MlflowClient(store_of(root))
    runs = runs_named(client, "fitted")  # experiment: the TensorBoard logger's name; run: the run folder's
    assert list(runs) == ["version_0"]
    run = runs["version_0"]
    assert json.loads((run_folder / "mlflow.json").read_text()) == {
        "tracking_uri": store_of(root),
        "experiment_id": run.info.experiment_id,
        "run_id": run.info.run_id,
    }
    assert run.info.status == "FINISHED"
    assert run.info.artifact_uri == (root / "lightning_logs" / "mlartifacts").as_uri() + f"/{run.info.run_id}/artifacts"
    summary = json.loads((run_folder / "summary.json").read_text())
    assert run.data.metrics["val/f1_macro"] == pytest.approx(summary["best_value"], **ROUNDED)  # one epoch: the best
    assert run.data.metrics["hp/best_val_f1_macro"] == pytest.approx(summary["best_value"], **ROUNDED)
    assert run.data.metrics["hp/best_epoch"] == summary["best_epoch"] == 0
    history = client.get_metric_history(run.info.run_id, "train/loss_step")
    assert [point.step for point in history] == list(range(steps_per_epoch(run_folder)))  # every step logged
    config = yaml.safe_load((run_folder / "config.yaml").read_text())
    params = run.data.params
    assert params["model.backbone"] == config["model"]["backbone"] == "test_resnet"
    assert params["data.batch_size"] == "32" and params["data.image_size"] == "32"
    assert params["trainer.max_epochs"] == "1" and params["seed_everything"] == "7"
    assert params["model.optimizer.init_args.lr"] == str(config["model"]["optimizer"]["init_args"]["lr"])
    assert params["trainer.logger.0.init_args.name"] == "fitted"
    assert "backbone" not in params and "ckpt_path" not in params  # no unprefixed hparams, no per-session keys
    assert artifacts(client, run.info.run_id) == {
        "config.yaml",
        "splits.csv",
        "summary.json",
        "training_curves.png",
        "checkpoints/best.ckpt",
    }
    copy = Path(client.download_artifacts(run.info.run_id, "summary.json", str(root / "downloaded")))
    assert copy.read_bytes() == (run_folder / "summary.json").read_bytes()
    assert run.data.tags["mlflow.source.git.commit"] == sha  # the working directory's, checked by git itself
    assert not (root / "project" / "mlruns").exists() and not (root / "project" / "mlflow.db").exists()


@pytest.mark.slow
def test_tensorboard_hparams_compare_runs_by_config_and_best_metrics(fitted: tuple[Path, str]) -> None:
    run_folder, _ = fitted
    events = EventAccumulator(str(run_folder), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    assert "hp_metric" not in events.Tags()["scalars"]  # Lightning's placeholder -1
    summary = json.loads((run_folder / "summary.json").read_text())
    (best,) = events.Scalars("hp/best_val_f1_macro")
    assert best.value == pytest.approx(summary["best_value"], **ROUNDED)
    plugin = {tag: HParamsPluginData.FromString(data) for tag, data in events.PluginTagToContent("hparams").items()}
    metrics = {info.name.tag for info in plugin["_hparams_/experiment"].experiment.metric_infos}
    assert {"hp/best_val_f1_macro", "hp/best_val_acc", "hp/best_val_loss", "hp/best_epoch"} <= metrics
    hparams = plugin["_hparams_/session_start_info"].session_start_info.hparams
    assert hparams["model.backbone"].string_value == "test_resnet"
    assert hparams["data.batch_size"].number_value == 32


@pytest.mark.slow
def test_a_resumed_fit_continues_its_run_and_a_test_adds_to_it(
    root: Path, digits3: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.chdir(root)  # no git repository here
    config = config_for(root, digits3, "resumed")
    cli_main(["fit", "--config", str(config), "--config", MLFLOW_CONFIG])
    run_folder = root / "lightning_logs" / "resumed" / "version_0"
    first = json.loads((run_folder / "mlflow.json").read_text())["run_id"]
    assert ENV not in os.environ  # MLflow's client sets it; the next run in this process must not take this store
    resume = ["--ckpt_path", "last", "--trainer.max_epochs", "2"]
    cli_main(["fit", "--config", str(config), "--config", MLFLOW_CONFIG, *resume])
    client = MlflowClient(store_of(root))
    runs = runs_named(client, "resumed")
    assert list(runs) == ["version_0"] and runs["version_0"].info.run_id == first
    assert [point.value for point in client.get_metric_history(first, "epoch")][-1] == 1
    f1 = client.get_metric_history(first, "val/f1_macro")
    steps = steps_per_epoch(run_folder)
    assert [point.step for point in f1] == [steps - 1, 2 * steps - 1]  # each epoch's validation, the first kept
    summary = json.loads((run_folder / "summary.json").read_text())
    assert runs["version_0"].data.metrics["hp/best_val_f1_macro"] == pytest.approx(summary["best_value"], **ROUNDED)
    assert max(point.value for point in f1) == pytest.approx(summary["best_value"], **ROUNDED)
    assert not any(tag.startswith("mlflow.source.git") for tag in runs["version_0"].data.tags)  # no repository
    best = run_folder / "checkpoints" / "best.ckpt"
    store = ["--trainer.logger.tracking_uri", store_of(root)]  # a logger's option, not another logger
    cli_main(["test", "--config", str(config), "--config", MLFLOW_CONFIG, "--ckpt_path", str(best), *store])
    assert sorted(path.name for path in run_folder.parent.iterdir()) == ["version_0"]  # filed under its run
    run = client.get_run(first)
    tested = json.loads((run_folder / "test" / "metrics.json").read_text())
    assert {name: run.data.metrics[name] for name in tested} == pytest.approx(tested, **ROUNDED)
    assert {"test/metrics.json", "test/predictions.csv", "test/confusion_matrix.png"} <= artifacts(client, first)
    assert not any(path.startswith("checkpoints") for path in artifacts(client, first))  # log_checkpoint is off
    assert list(runs_named(client, "resumed")) == ["version_0"]  # and no run of its own


@pytest.mark.slow
def test_cv_makes_a_parent_run_over_the_fold_runs(root: Path, digits3: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.chdir(root)
    config = config_for(root, digits3, "cv")
    cli_main(["cv", "--config", str(config), "--config", MLFLOW_CONFIG, "--data.num_folds", "2"])
    cv_dir = root / "lightning_logs" / "cv" / "cv_0"
    summary = json.loads((cv_dir / "cv_summary.json").read_text())
    ensemble = json.loads((cv_dir / "ensemble" / "metrics.json").read_text())
    client = MlflowClient(store_of(root))
    runs = runs_named(client, "cv")
    assert set(runs) == {"version_0", "version_1", "cv_0"}  # the evaluations of the folds add no runs
    parent = runs["cv_0"]
    assert json.loads((cv_dir / "mlflow.json").read_text())["run_id"] == parent.info.run_id
    for fold in (0, 1):
        child = runs[f"version_{fold}"]
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.data.params["data.fold"] == str(fold) and child.data.params["data.num_folds"] == "2"
    metrics = parent.data.metrics
    assert {name: metrics[f"mean/{name}"] for name in summary["mean"]} == pytest.approx(summary["mean"], **ROUNDED)
    assert {name: metrics[f"std/{name}"] for name in summary["std"]} == pytest.approx(summary["std"], **ROUNDED)
    assert {name: metrics[f"ensemble/{name}"] for name in ensemble} == pytest.approx(ensemble, **ROUNDED)
    assert parent.data.params["model.backbone"] == "test_resnet" and "data.fold" not in parent.data.params
    assert artifacts(client, parent.info.run_id) == {"cv_summary.json", "oof_predictions.csv"}
    assert parent.info.status == "FINISHED"


def test_mlflow_tracking_uri_wins_over_the_default_store(
    root: Path, digits3: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV, store_of(root))  # the shared store; the default would be tmp_path/lightning_logs/mlflow.db
    monkeypatch.chdir(tmp_path)
    config = tiny_config(tmp_path, digits3, trainer={"max_epochs": 1})
    cli_main(["fit", "--config", str(config), "--config", MLFLOW_CONFIG, "--trainer.limit_train_batches", "1"])
    assert not (tmp_path / "lightning_logs" / "mlflow.db").exists() and not (tmp_path / "mlflow.db").exists()
    recorded = json.loads((run_dir(tmp_path, 0) / "mlflow.json").read_text())
    assert recorded["tracking_uri"] == store_of(root)
    assert MlflowClient(store_of(root)).get_run(recorded["run_id"]).info.run_name == "version_0"


def test_the_config_appends_mlflow_after_the_config_before_it(
    root: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    resnet18 = str(REPO / "configs" / "resnet18.yaml")
    with pytest.raises(SystemExit):
        cli_main(["fit", "--config", resnet18, "--config", MLFLOW_CONFIG, "--print_config"])
    loggers = yaml.safe_load(capsys.readouterr().out)["trainer"]["logger"]
    assert [logger["class_path"] for logger in loggers] == [
        "lightning.pytorch.loggers.TensorBoardLogger",
        "classifier.training.tracking.MLFlowLogger",
    ]
    assert loggers[0]["init_args"]["name"] == "resnet18"  # the first config's logger, kept whole
    # a config without a logger: Lightning's default TensorBoard logger goes first, and names the experiment
    monkeypatch.setenv(ENV, store_of(root))
    bare = tmp_path / "bare.yaml"
    bare.write_text(yaml.safe_dump({"trainer": {"default_root_dir": str(tmp_path)}}))
    cli = ClassifierCLI(args=["--config", str(bare), "--config", MLFLOW_CONFIG], run=False)
    tensorboard, mlflow = cli.trainer.loggers
    assert isinstance(tensorboard, TensorBoardLogger) and tensorboard.root_dir == str(tmp_path / "lightning_logs")
    assert mlflow._experiment_name == "lightning_logs" and mlflow._run_name == "version_0"


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize(
    ("option", "env", "named"),
    [
        ("http://127.0.0.1:{port}", None, "trainer.logger's tracking_uri"),
        (None, "nosuchscheme://store", f"${ENV}"),
    ],
)
def test_an_unusable_store_is_one_line_before_training(
    option: str | None,
    env: str | None,
    named: str,
    digits3: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    uri = (option or env).format(port=closed_port())
    if env:
        monkeypatch.setenv(ENV, env)
    config = tiny_config(tmp_path, digits3)
    args = ["fit", "--config", str(config), "--config", MLFLOW_CONFIG]
    with pytest.raises(SystemExit) as stopped:
        main(args + (["--trainer.logger.tracking_uri", uri] if option else []))
    assert stopped.value.code == 2
    line, hint = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: MLflow tracking URI {uri} ({named}) cannot be used: ") and hint == DEBUG_HINT
    assert not (tmp_path / "lightning_logs").exists()  # nothing trained, no run folder
    assert os.environ.get(ENV) == env


def test_without_mlflow_the_command_names_the_extra(
    digits3: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in [name for name in sys.modules if name.partition(".")[0] == "mlflow"]:
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed: importing it raises ModuleNotFoundError
    with pytest.raises(SystemExit) as stopped:
        main(["fit", "--config", str(tiny_config(tmp_path, digits3)), "--config", MLFLOW_CONFIG])
    assert stopped.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: mlflow is not installed: pip install 'classifier[mlflow]'",
        DEBUG_HINT,
    ]
    assert not (tmp_path / "lightning_logs").exists()
