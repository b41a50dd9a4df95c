"""Helpers for tests: a tiny CPU config each test writes into its tmp_path, run-folder paths, a training spy, and the
`classifier` command run in the test's own process."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from lightning.pytorch import Callback
from PIL import Image

from classifier.cli.entry import main
from classifier.data.photos import write_photos as write_photos  # re-exported: the tests' photo-like images

REPO = Path(__file__).resolve().parents[2]


def tiny_config(tmp_path: Path, data_dir: Path, **overrides: dict) -> Path:
    """A config for `test_resnet` on 32 px images, logging under tmp_path/lightning_logs/tiny."""
    config = {
        "seed_everything": 7,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_epochs": 2,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "log_every_n_steps": 1,
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": str(tmp_path / "lightning_logs"), "name": "tiny"},
            },
        },
        "model": {"backbone": "test_resnet"},
        "data": {"data_dir": str(data_dir), "image_size": 32, "batch_size": 32, "num_workers": 0, "hflip": 0.0},
    }
    for group, values in overrides.items():
        config.setdefault(group, {}).update(values)
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_dir(tmp_path: Path, version: int) -> Path:
    return tmp_path / "lightning_logs" / "tiny" / f"version_{version}"


def save_image(path: Path, image: Image.Image, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def floats(data: object) -> list[float]:
    """Every float in a JSON document."""
    if isinstance(data, float):
        return [data]
    if isinstance(data, dict):
        data = list(data.values())
    return [value for item in data for value in floats(item)] if isinstance(data, list) else []


def rounded_for_people(data: object) -> bool:
    """Whether every float of a JSON document reads back from 6 significant digits (no 1.0000001192092896)."""
    return all(float(f"{value:.6g}") == value for value in floats(data))


class TrainingSpy(Callback):
    """Records what training did: each batch's targets, rows and images as the model got them, the targets its loss
    got (mixed by mixup and cutmix), the gradient norm after each optimizer step, and the dtype the model computed
    in per stage. With `output`, writes the batches to `output/rank<N>.json` (for runs in other processes)."""

    def __init__(self, output: str | None = None) -> None:
        self.output = output
        self.batches: list[dict] = []  # {"epoch", "targets", "rows"} per training batch
        self.images: dict[str, list[torch.Tensor]] = {"train": [], "validate": []}
        self.loss_targets: list[torch.Tensor] = []  # what the training loss compared the logits with, per batch
        self.grad_norms: list[float] = []
        self.dtypes: dict[str, set[torch.dtype]] = {}
        self._step = 0

    def setup(self, trainer, pl_module, stage: str) -> None:
        def record(module, inputs, output) -> None:
            self.dtypes.setdefault(trainer.state.stage.value, set()).add(output.dtype)

        def keep_targets(module, inputs) -> None:
            if trainer.training:
                self.loss_targets.append(inputs[1].detach().cpu())

        pl_module.register_forward_hook(record)
        pl_module.criterion.register_forward_pre_hook(keep_targets)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._step = trainer.global_step
        self.batches.append({"epoch": trainer.current_epoch, "targets": batch[1].tolist(), "rows": batch[2].tolist()})
        self.images["train"].append(batch[0].detach().cpu())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step != self._step:  # an optimizer step: the gradients it used are still there
            grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
            self.grad_norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if not trainer.sanity_checking:
            self.images["validate"].append(batch[0].detach().cpu())

    def on_train_end(self, trainer, pl_module) -> None:
        if self.output:
            Path(self.output).mkdir(parents=True, exist_ok=True)
            (Path(self.output) / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.batches))


def spy_of(trainer) -> TrainingSpy:
    """The trainer's TrainingSpy, added by a config's trainer.callbacks."""
    (spy,) = [callback for callback in trainer.callbacks if isinstance(callback, TrainingSpy)]
    return spy


def digit_subset(digits_dir: Path, root: Path, per_class: int, digits: str = "0123456789") -> Path:
    """The first `per_class` scans of each of `digits`, copied under root/<digit>/; returns root."""
    for digit in digits:
        (root / digit).mkdir(parents=True)
        for image in sorted((digits_dir / digit).iterdir())[:per_class]:
            shutil.copy(image, root / digit / image.name)
    return root


def classifier_here(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """`classifier ARGS` as its entry point runs it (errors on one line, the exit status of core.errors), in this
    process: the exit status and output a subprocess would give, without its 5 s of imports."""
    stdout, stderr, code = io.StringIO(), io.StringIO(), 0
    try:
        with contextlib.chdir(cwd), contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            main(list(args))
    except SystemExit as stopped:
        code = stopped.code if isinstance(stopped.code, int) else int(stopped.code is not None)
    return subprocess.CompletedProcess(["classifier", *args], code, stdout.getvalue(), stderr.getvalue())


def classifier_process(*args: str) -> subprocess.CompletedProcess:
    """`python -m classifier ARGS` in a process of its own, as a user runs it; it must succeed."""
    done = subprocess.run([sys.executable, "-m", "classifier", *args], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, f"classifier {' '.join(args)} failed:\n{done.stderr[-3000:]}"
    return done


def own_run(run: Path, tmp_path: Path) -> Path:
    """A copy of the run folder `run` under tmp_path, for a test that writes into it (test, predict, calibrate)."""
    return Path(shutil.copytree(run, tmp_path / run.name))
