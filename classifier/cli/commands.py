"""The one table of `classifier` commands: the dispatcher, `classifier --help` and the missing-extra hint read it.

A new command is one module in `classifier/commands/` with a function that takes the arguments after its name,
and one row here. Torch-free: the table is read before any command's module is imported, so `classifier serve
model.onnx` and `classifier --help` load no torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib import import_module

# the top-level modules each optional extra installs: a command that misses one names the extra to install
EXTRAS = {
    "export": ("onnx", "onnxruntime", "onnxscript"),
    "serve": ("fastapi", "uvicorn", "prometheus_client", "multipart", "starlette", "onnxruntime"),
    "explain": ("pytorch_grad_cam",),
    "tune": ("optuna",),
    "mlflow": ("mlflow",),
    "shards": ("litdata",),
}


@dataclass(frozen=True)
class Command:
    """A row of the table: the name typed, the function run, and the line `classifier --help` shows."""

    name: str
    target: str  # "module:function"; the function takes the arguments after the command's name
    summary: str
    extra: str | None = None  # the extra whose packages the command needs

    def load(self) -> Callable[[list[str]], object]:
        """The command's function, its module imported now (and its extra's packages with it)."""
        module, _, function = self.target.partition(":")
        return getattr(import_module(module), function)


COMMANDS = (
    Command("fit", "classifier.commands.train:fit", "train a model (--ckpt_path last resumes the newest run)"),
    Command("validate", "classifier.commands.train:validate", "evaluate a checkpoint on its validation split"),
    Command("test", "classifier.commands.train:test", "evaluate a checkpoint on its frozen test split, with reports"),
    Command("predict", "classifier.commands.train:predict", "predict a folder of images with a checkpoint"),
    Command("lr_find", "classifier.commands.train:lr_find", "find a learning rate for a config"),
    Command("cv", "classifier.commands.cv:cross_validate", "k-fold cross-validation, with the folds' ensemble"),
    Command("tune", "classifier.commands.tune:tune", "search fit's options with Optuna", "tune"),
    Command("check-data", "classifier.commands.check_data:check_data", "audit the data before a run"),
    Command(
        "shard", "classifier.commands.shard:shard", "write a split as LitData shards, for fit --data.shards", "shards"
    ),
    Command("explain", "classifier.commands.explain:explain", "class activation maps and embeddings", "explain"),
    Command("calibrate", "classifier.commands.calibrate:calibrate", "fit a temperature and an unknown threshold"),
    Command(
        "export", "classifier.commands.export:export", "export a checkpoint to ONNX & co., parity checked", "export"
    ),
    Command("serve", "classifier.commands.serve:serve", "serve a checkpoint or an ONNX file over HTTP", "serve"),
    Command("push", "classifier.commands.push:push", "a checkpoint as a Hugging Face model repo timm loads", "export"),
    Command("runs", "classifier.commands.runs:list_runs", "list the training runs under a folder"),
    Command(
        "demo-data", "classifier.commands.demo_data:demo_data", "write the bundled digits, photos or multi-label scenes"
    ),
)
BY_NAME = {command.name: command for command in COMMANDS}


def extra_of(module: str, command: Command | None) -> str | None:
    """The extra that installs `module`: the command's own first (onnxruntime is export's and serve's)."""
    root = module.partition(".")[0]
    if command is not None and command.extra and root in EXTRAS[command.extra]:
        return command.extra
    return next((extra for extra, modules in EXTRAS.items() if root in modules), None)


def usage() -> str:
    """`classifier --help`: every command on its own line, as git and yolo list theirs."""
    width = max(len(command.name) for command in COMMANDS)
    rows = "\n".join(f"  {command.name:<{width}}  {command.summary}" for command in COMMANDS)
    return (
        "usage: classifier COMMAND [options]\n\n"
        "Train, evaluate and ship image classifiers on folders of images.\n\n"
        f"commands:\n{rows}\n\n"
        "`classifier COMMAND --help` lists a command's options. Add --debug anywhere for every warning and the\n"
        "traceback of an error. A second `--config configs/loggers/mlflow.yaml` also tracks a run in MLflow.\n"
    )
