"""What keeps each training step cheap: memory layout, compilation, no host syncs, the GPU data path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ProgressBar
from PIL import Image
from timm.models import register_model
from torch import nn

from classifier import cli_main
from classifier.cli.base import ClassifierCLI
from tests.helpers import REPO, read_csv, run_dir, tiny_config

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


class CompileProbe(nn.Module):
    """The compiled model, as small as it gets with what compiling a real backbone meets: a convolution, BatchNorm
    (whose statistics a compiled training step updates and a compiled eval step reads: training and validation
    compile a graph each), dropout and timm's `fc` head. Inductor takes about a minute on 2 cores for test_resnet's
    50-odd kernels, a few seconds for these."""

    def __init__(self, num_classes: int = 1000, drop_rate: float = 0.0, **_: object) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.num_features = 8
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(8, num_classes) if num_classes else nn.Identity()

    def get_classifier(self) -> nn.Module:
        return self.fc

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(torch.relu(self.bn(self.conv(images))).mean((2, 3))))


default_cfgs = {"compile_probe": {"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.5,) * 3, "classifier": "fc"}}


@register_model
def compile_probe(pretrained: bool = False, **kwargs: object) -> nn.Module:
    """CompileProbe, as `--model.backbone compile_probe`."""
    return CompileProbe(**kwargs)


@pytest.fixture(scope="module")
def jpeg_digits(small_digits: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The small digits as JPEGs, which the GPU path decodes with nvJPEG."""
    root = tmp_path_factory.mktemp("jpeg") / "digits"
    for png in small_digits.rglob("*.png"):
        target = root / png.parent.name / f"{png.stem}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.open(png).convert("RGB").save(target, quality=95)
    return root


def fitted_model(config: Path, *flags: str) -> torch.nn.Module:
    """The LightningModule after `classifier fit`, for looking inside."""
    cli = ClassifierCLI(["fit", "--config", str(config), *flags])
    return cli.model


@pytest.mark.parametrize(("flag", "expected"), [(None, False), ("true", True)])
def test_channels_last_is_off_on_cpu_unless_asked(flag: str | None, expected: bool, small_digits: Path, tmp_path):
    config = tiny_config(tmp_path, small_digits, trainer={"fast_dev_run": 1})
    flags = ["--model.channels_last", flag] if flag else []
    weight = fitted_model(config, *flags).net.backbone.conv1[0].weight
    assert weight.is_contiguous(memory_format=torch.channels_last) is expected


@pytest.mark.slow
def test_compiled_backbone_trains_and_saves_plain_checkpoints(small_digits: Path, tmp_path: Path) -> None:
    from torch._dynamo.utils import counters

    counters.clear()
    config = tiny_config(tmp_path, small_digits, trainer={"max_epochs": 1, "limit_train_batches": 2})
    cli_main(["fit", "--config", str(config), "--model.backbone", "compile_probe", "--model.compile", "true"])
    assert counters["stats"]["unique_graphs"] > 0  # torch.compile really ran
    best = run_dir(tmp_path, 0) / "checkpoints" / "best.ckpt"
    state = torch.load(best, weights_only=True)["state_dict"]
    assert "net.backbone.fc.weight" in state and not any("_orig_mod" in key for key in state)
    cli_main(["test", "--ckpt_path", str(best), "--model.compile", "false"])
    metrics = json.loads((run_dir(tmp_path, 0) / "test" / "metrics.json").read_text())
    rows = read_csv(run_dir(tmp_path, 0) / "test" / "predictions.csv")
    assert len(rows) == 30 and metrics["test/acc"] == pytest.approx(
        sum(row["target"] == row["prediction"] for row in rows) / len(rows), abs=1e-6
    )  # the plain checkpoint tested every test image


class NoHostSyncs(Callback):
    """Turns any device-to-host sync inside a training step into an error, after the first two steps."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx >= 2:
            torch.cuda.set_sync_debug_mode("error")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        torch.cuda.set_sync_debug_mode("default")


@needs_cuda
@pytest.mark.parametrize("data", [{"decode": "cpu"}, {"decode": "gpu"}, {"cache": "ram", "color_jitter": 0.4}])
def test_training_steps_never_wait_for_the_gpu(data: dict, jpeg_digits: Path, tmp_path: Path) -> None:
    trainer = {"accelerator": "gpu", "max_epochs": 1, "precision": "bf16-mixed", "log_every_n_steps": 1000}
    config = tiny_config(tmp_path, jpeg_digits, trainer=trainer, data={"batch_size": 16, **data})
    cli = ClassifierCLI(["fit", "--config", str(config)], run=False)
    cli.trainer.callbacks.append(NoHostSyncs())
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 140 // 16


@needs_cuda
def test_gpu_data_path_defaults_on_cuda(jpeg_digits: Path, tmp_path: Path) -> None:
    config = tiny_config(tmp_path, jpeg_digits, trainer={"accelerator": "gpu", "fast_dev_run": 1})
    cli = ClassifierCLI(["fit", "--config", str(config)])
    assert cli.datamodule.gpu_decode and cli.model.memory_format == torch.channels_last


@pytest.mark.parametrize(
    ("flags", "refresh_rates"),
    [
        ([], [10]),
        (["--trainer.enable_progress_bar", "false"], []),
        (["--config", str(REPO / "configs" / "resnet18.yaml")], [10]),
    ],
)
def test_progress_bar_reads_metrics_back_every_10_steps_by_default(flags: list[str], refresh_rates: list[int]) -> None:
    cli = ClassifierCLI(flags, run=False)
    bars = [callback for callback in cli.trainer.callbacks if isinstance(callback, ProgressBar)]
    assert [bar.refresh_rate for bar in bars] == refresh_rates  # Lightning's own default bar reads back every step
