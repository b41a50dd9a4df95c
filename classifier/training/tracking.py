"""MLflow beside TensorBoard: Lightning's MLFlowLogger on a local SQLite store, named after the run folder of the
logger it follows, continuing that folder's MLflow run on resume and evaluation, uploading its files at the end; and
the parent run of a cross-validation. mlflow (the [mlflow] extra) is imported only once a run uses it."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from jsonargparse import Namespace
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.loggers import mlflow as lightning_mlflow
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from classifier.core.atomic import write_json

log = logging.getLogger(__name__)

TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
TENSORBOARD = "lightning.pytorch.loggers.TensorBoardLogger"
FILE_LOGGERS = ("TensorBoardLogger", "CSVLogger")  # Lightning's loggers whose log_dir is save_dir/name/version
RUN_FILE = "mlflow.json"  # in a run folder: the store and the id of its MLflow run, for resumes, evaluations and cv
ARTIFACTS = ("config.yaml", "summary.json", "metrics.json", "*.png", "*.csv")  # a run folder's files, uploaded at end
GIT_TAGS = ("mlflow.source.git.commit", "mlflow.source.git.branch", "mlflow.source.git.repoURL")
PARENT_RUN_TAG = "mlflow.parentRunId"
RUN_NAME_TAG = "mlflow.runName"
# the store is checked once before training, failing in seconds; MLflow's own default retries a server for minutes
FAIL_FAST = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


class MLFlowLogger(lightning_mlflow.MLFlowLogger):
    """Lightning's MLflow logger, second after the TensorBoard (or CSV) logger whose run folder it follows: the
    experiment is that logger's name, the run that folder's (version_N), and the store by default a SQLite file
    beside the folders, `<save_dir>/mlflow.db`, with the artifacts in `<save_dir>/mlartifacts`.

    Its params are the CLI's whole config, flattened (`log_config`, called by
    `classifier.training.hparams.ConfigLogger`);
    Lightning's model and data hparams, a part of it under other names, are not logged a second time.
    """

    def __init__(
        self,
        experiment_name: str | None = None,
        run_name: str | None = None,
        tracking_uri: str | None = None,
        tags: dict[str, Any] | None = None,
        log_checkpoint: bool = False,
        run_id: str | None = None,
    ) -> None:
        """
        Args:
            experiment_name: The MLflow experiment; by default the TensorBoard logger's name (resnet18, ...).
            run_name: The MLflow run's name; by default the run folder's (version_N).
            tracking_uri: The store or server. By default $MLFLOW_TRACKING_URI, else
                sqlite:///<the TensorBoard logger's save_dir>/mlflow.db.
            tags: More tags for the run.
            log_checkpoint: Also upload checkpoints/best.ckpt at the end of fit.
            run_id: Continue this MLflow run. `--ckpt_path` sets it to the run of the checkpoint's run folder.
        """
        # Lightning's __init__ opens the store, which is known only with the run folder: `follow` calls it
        self._options = {"experiment_name": experiment_name, "run_name": run_name, "tags": tags, "run_id": run_id}
        self._given_uri = tracking_uri
        self.log_checkpoint = log_checkpoint
        self._run_dir: Path | None = None
        self._artifact_path = ""  # where this folder's files go among the run's artifacts: `test` for a test
        self._best_checkpoint = ""
        self._initialized = False  # Lightning's: no run opened yet

    def follow(self, trainer: Trainer) -> None:
        """Take the names, the store and the run from the trainer's first logger's run folder, and check the store
        (before any training): an error names the URI and where it came from. On rank 0 only: the other ranks log
        nothing (Lightning's MLflow logger is rank-zero only) and leave the store alone."""
        if rank_zero_only.rank != 0:
            return
        run_logger = trainer.loggers[0]
        if not isinstance(run_logger, (TensorBoardLogger, CSVLogger)):
            raise ValueError(
                f"{type(self).__name__} follows the run folder of a TensorBoardLogger or CSVLogger listed before it "
                f"in trainer.logger; the first logger is a {type(run_logger).__name__}"
            )
        self._run_dir = Path(run_logger.log_dir)
        options = self._options
        # the MLflow run recorded in this run folder (a resumed fit), or above it (an evaluation given its run_id)
        folders = (self._run_dir, *self._run_dir.parents) if options["run_id"] else (self._run_dir,)
        home = next((folder for folder in folders if (folder / RUN_FILE).is_file()), None)
        record = recorded_run(home) if home is not None else None
        if record is not None and options["run_id"] in (None, record["run_id"]):
            run_id, recorded = record["run_id"], (record["tracking_uri"], str(home / RUN_FILE))
            self._artifact_path = self._run_dir.relative_to(home).as_posix() if home != self._run_dir else ""
        else:
            run_id, recorded = options["run_id"], None
        uri, source = tracking_uri(self._given_uri, recorded, Path(run_logger.save_dir))
        store = sqlite_folder(uri)
        name = run_logger.name or Path(run_logger.save_dir).resolve().name
        tags = {**(options["tags"] or {}), **git_tags()}  # imports mlflow: without it, the CLI names the extra
        try:
            super().__init__(
                experiment_name=options["experiment_name"] or name,
                run_name=options["run_name"] or self._run_dir.name,
                tracking_uri=uri,
                tags=tags,
                artifact_location=(store / "mlartifacts").as_uri() if store else None,
                run_id=run_id,
            )
            with environment(FAIL_FAST):  # one request, failing in seconds
                self._mlflow_client.search_experiments(max_results=1)
        except Exception as error:  # the store's, sqlalchemy's, requests' or the OS's: all say the URI is unusable
            reason = " ".join(str(error).split("\n")[0].split())[:300]
            raise ValueError(
                f"MLflow tracking URI {uri} ({source}) cannot be used: {reason}. Start that server, fix the URI, or "
                f"leave tracking_uri and ${TRACKING_URI_ENV} unset for a local SQLite file"
            ) from error
        self._open(source if recorded else "run_id")

    def _open(self, named_by: str) -> None:
        """Find the run to continue, or make the experiment with its artifact location."""
        from mlflow.exceptions import MlflowException

        if self._run_id is None:
            if self._mlflow_client.get_experiment_by_name(self._experiment_name) is None:
                self._mlflow_client.create_experiment(self._experiment_name, self._artifact_location)
            return
        try:
            self._mlflow_client.get_run(self._run_id)
        except MlflowException as error:
            raise ValueError(
                f"MLflow run {self._run_id} ({named_by}) is not in {self._tracking_uri} ({error.error_code}): remove "
                f"{RUN_FILE} from the run folder to start a new MLflow run"
            ) from error

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        """Lightning's MlflowClient; creating the run also records it in the run folder's mlflow.json."""
        if self._run_dir is None:
            raise RuntimeError(f"{type(self).__name__}.follow(trainer) first: the run folder names the MLflow run")
        new = not self._initialized and self._run_id is None
        with environment({TRACKING_URI_ENV: None}):  # mlflow.set_tracking_uri sets it: the next run would inherit it
            client = super().experiment
        if new:
            record = {"tracking_uri": self._tracking_uri, "experiment_id": self._experiment_id, "run_id": self._run_id}
            self._run_dir.mkdir(parents=True, exist_ok=True)
            write_json(self._run_dir / RUN_FILE, record)
        return client

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        """Not logged: the run's params are the whole config (`log_config`), which holds these under other names."""

    @rank_zero_only
    def log_config(self, params: dict[str, Any]) -> None:
        """Log the flattened CLI config as the run's params; a continued run keeps the values it has (MLflow's params
        cannot change), and a warning names those given differently now."""
        values = {key: str(value)[:250] for key, value in params.items()}  # Lightning's truncation
        logged = self.experiment.get_run(self.run_id).data.params
        changed = sorted(key for key, value in values.items() if key in logged and logged[key] != value)
        if changed:
            log.warning("MLflow run %s keeps its first values of %s (params cannot change)", self.run_id, changed)
        super().log_hyperparams({key: value for key, value in values.items() if key not in logged})

    def after_save_checkpoint(self, checkpoint_callback: ModelCheckpoint) -> None:
        if checkpoint_callback.monitor and checkpoint_callback.best_model_path:
            self._best_checkpoint = checkpoint_callback.best_model_path

    @rank_zero_only
    def finalize(self, status: str = "success") -> None:
        """Upload the run folder's files (and best.ckpt with log_checkpoint) once it ended well; then Lightning's."""
        if self._initialized and status == "success":
            files = sorted({path for pattern in ARTIFACTS for path in self._run_dir.glob(pattern) if path.is_file()})
            for path in files:
                self.experiment.log_artifact(self.run_id, str(path), self._artifact_path or None)
            if self.log_checkpoint and self._best_checkpoint and Path(self._best_checkpoint).is_file():
                self.experiment.log_artifact(self.run_id, self._best_checkpoint, "checkpoints")
        super().finalize(status)


def tracking_uri(given: str | None, recorded: tuple[str, str] | None, save_dir: Path) -> tuple[str, str]:
    """(the URI, where it came from): the option, else that of the run continued (`recorded`: its URI and the file
    that says so), else $MLFLOW_TRACKING_URI, else a SQLite file in `save_dir`."""
    if given:
        return given, "trainer.logger's tracking_uri"
    if recorded:
        return recorded
    if os.environ.get(TRACKING_URI_ENV):
        return os.environ[TRACKING_URI_ENV], f"${TRACKING_URI_ENV}"
    return f"sqlite:///{(save_dir / 'mlflow.db').resolve()}", "the default, beside the TensorBoard logs"


def sqlite_folder(uri: str) -> Path | None:
    """The folder of a SQLite store's file, where its artifacts go too; None for servers and other databases."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix) or uri == f"{prefix}:memory:":
        return None
    return Path(uri[len(prefix) :]).resolve().parent


def git_tags() -> dict[str, str]:
    """MLflow's git tags (commit, branch, remote URL) of the working directory, which win over MLflow's own guess
    from the folder of the script that runs (its repository, unless git ignores that folder, as a .venv's); none
    outside a git repository."""
    from mlflow.utils.git_utils import get_git_branch, get_git_commit, get_git_repo_url

    found = (get_git_commit(os.getcwd()), get_git_branch(os.getcwd()), get_git_repo_url(os.getcwd()))
    return {tag: value for tag, value in zip(GIT_TAGS, found, strict=True) if value} if found[0] else {}


@contextmanager
def environment(values: dict[str, str | None]) -> Iterator[None]:
    """Environment variables set for the length of a block (None: left as is), and all restored after it."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update({name: value for name, value in values.items() if value is not None})
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def recorded_run(folder: Path) -> dict[str, str] | None:
    """A run folder's mlflow.json: {tracking_uri, experiment_id, run_id}, or None."""
    path = folder / RUN_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def is_tracker(logger: Any) -> bool:
    """Whether a parsed logger entry is this module's MLFlowLogger."""
    return isinstance(logger, Namespace) and logger.get("class_path") == f"{__name__}.{MLFlowLogger.__name__}"


def evaluation_trackers(loggers: list[Namespace], run: Path | None) -> list[Namespace]:
    """The parsed loggers of an evaluation of a checkpoint in `run`: the MLflow loggers add to the MLflow run that
    `run` recorded (`run_id`), or go where there is none (and for lr_find, whose `run` is None)."""
    recorded = recorded_run(run) if run is not None else None
    for logger in filter(is_tracker, loggers):
        logger.init_args.run_id = logger.init_args.get("run_id") or (recorded or {}).get("run_id")
    return [logger for logger in loggers if not is_tracker(logger) or logger.init_args.run_id]


def file_loggers(loggers: list[Any]) -> list[Any]:
    """The TensorBoard and CSV loggers of a parsed logger list (namespaces or dicts), in order: Lightning names the
    run folder after the first logger, so the first of these is the one whose folder a run is filed in."""
    return [logger for logger in loggers if (logger.get("class_path") or "").endswith(FILE_LOGGERS)]


def run_folder_logger_first(loggers: Any, default_root_dir: str | None) -> Any:
    """A logger list with an MLflow logger first gets its file logger moved before it, or Lightning's default
    TensorBoard logger: Lightning names the run folder after the first logger, which for MLflow is no folder."""
    if not isinstance(loggers, list) or not loggers or not is_tracker(loggers[0]):
        return loggers
    files = file_loggers(loggers)
    if files:
        first = files[0]
    else:
        tensorboard = Namespace(save_dir=default_root_dir or ".", name="lightning_logs")
        first = Namespace(class_path=TENSORBOARD, init_args=tensorboard)
    return [first, *(logger for logger in loggers if logger is not first)]


def log_cross_validation(runs: list[Path], cv_dir: Path, summary: dict, ensemble: dict[str, float]) -> str | None:
    """The parent MLflow run of the folds' runs (those recorded in their folders): the folds' mean and std as
    `mean/<metric>` and `std/<metric>`, the test ensemble's as `ensemble/<metric>`, the params all folds share, and
    cv_summary.json and oof_predictions.csv; each fold's run gets its `mlflow.parentRunId`. Returns its id."""
    recorded = [record for record in map(recorded_run, runs) if record is not None]
    if not recorded:
        return None
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param
    from mlflow.tracking.context.registry import resolve_tags

    uri, experiment_id = recorded[0]["tracking_uri"], recorded[0]["experiment_id"]
    client = MlflowClient(uri)
    tags = resolve_tags({RUN_NAME_TAG: cv_dir.name, **git_tags()})  # as Lightning's MLFlowLogger resolves them
    parent = client.create_run(experiment_id, tags=tags).info.run_id
    children = [record["run_id"] for record in recorded if record["tracking_uri"] == uri]
    if len(children) < len(runs):
        missing = len(runs) - len(children)
        log.warning("%d of %d folds have no MLflow run in %s: not under the parent run", missing, len(runs), uri)
    folds = [client.get_run(child).data.params for child in children]
    shared = {key: value for key, value in folds[0].items() if all(params.get(key) == value for params in folds)}
    values = {f"{kind}/{name}": value for kind in ("mean", "std") for name, value in summary[kind].items()}
    values |= {f"ensemble/{name}": value for name, value in ensemble.items()}
    now = int(time.time() * 1000)
    metrics = [Metric(key, float(value), now, 0) for key, value in values.items()]
    params = [Param(key, value) for key, value in shared.items()]
    for start in range(0, max(len(metrics), len(params)), 100):  # MLflow takes 100 params per batch
        client.log_batch(parent, metrics=metrics[start : start + 100], params=params[start : start + 100])
    for name in ("cv_summary.json", "oof_predictions.csv"):
        client.log_artifact(parent, str(cv_dir / name))
    for child in children:
        client.set_tag(child, PARENT_RUN_TAG, parent)
    client.set_terminated(parent)
    write_json(cv_dir / RUN_FILE, {"tracking_uri": uri, "experiment_id": experiment_id, "run_id": parent})
    log.info("MLflow: cross-validation run %s (%s) with %d fold runs under it", parent, cv_dir.name, len(children))
    return parent
