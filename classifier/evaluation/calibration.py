"""The engine of `classifier calibrate`: one temperature that makes a checkpoint's probabilities mean what they say.

It is fitted on the frozen validation split the run held out (Guo et al., 2017, "On Calibration of Modern Neural
Networks"): the logits are computed once, then LBFGS minimises their negative log-likelihood over log T.
The new checkpoint carries T in its network, so test, predict, `Predictor`, export and serving all use it.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.table import Table
from torch import Tensor

from classifier.core.atomic import write_json
from classifier.core.console import print_table
from classifier.data.datamodule import ImageFolderDataModule
from classifier.deploy.predictor import Predictor
from classifier.model.checkpoints import read_checkpoint, save_checkpoint
from classifier.model.devices import device_of
from classifier.model.module import classification_metrics

log = logging.getLogger(__name__)
SPLIT_NAMES = {"val": "validation", "test": "test"}


def calibrate_checkpoint(
    ckpt_path: Path,
    output: Path,
    data_dir: str | None = None,
    num_workers: int | None = None,
    device: str = "cpu",
) -> Path:
    """Fit T on the checkpoint's validation logits; write `output` and its `.json` report beside it."""
    started = time.perf_counter()
    torch_device = device_of(device)
    checkpoint = read_checkpoint(ckpt_path)
    check_writable(output, ckpt_path)
    datamodule = frozen_datamodule(ckpt_path, checkpoint, data_dir, num_workers)
    predictor = Predictor.from_checkpoint(ckpt_path, torch_device, tta="none")
    before = predictor.net.temperature  # a checkpoint calibrated before: fitted again from the raw logits
    predictor.net.temperature = 1.0
    logits = {split: split_logits(predictor, datamodule, split) for split in datamodule.datasets}
    temperature = fit_temperature(*logits["val"])
    report: dict[str, Any] = {"checkpoint": str(ckpt_path), "output": str(output), "temperature": temperature}
    for split, (raw, targets) in logits.items():
        report[split] = {
            "images": len(targets),
            "before": scores(raw / before, targets),
            "after": scores(raw / temperature, targets),
        }
    report["seconds"] = time.perf_counter() - started
    checkpoint = dict(checkpoint)
    checkpoint["net"] = {**checkpoint["net"], "temperature": temperature}
    checkpoint["hyper_parameters"] = {**checkpoint.get("hyper_parameters", {}), "temperature": temperature}
    checkpoint["calibration"] = report
    save_checkpoint(checkpoint, output)
    write_json(output.with_suffix(".json"), report)
    show(report)
    if checkpoint["hyper_parameters"].get("tta"):
        log.info(
            "Fitted and scored without test-time augmentation; `classifier test` with --model.tta %s averages the "
            "views' tempered probabilities, so its figures differ.",
            checkpoint["hyper_parameters"]["tta"],
        )
    log.info(
        "Calibrated checkpoint (temperature %.4g): %s\nReport: %s\nTest it with: classifier test --ckpt_path %s",
        temperature, output, output.with_suffix(".json"), output,
    )  # fmt: skip
    return output


def check_writable(output: Path, ckpt_path: Path) -> None:
    """Fail before the work, not after it: the output must be a new file in a folder this process can write."""
    if output.resolve() == ckpt_path.resolve():
        raise ValueError(f"--output {output} is the checkpoint being calibrated; give the calibrated one another name")
    folder = output.parent
    if not folder.is_dir():
        raise FileNotFoundError(f"--output {output}: its folder {folder} does not exist or is not a folder")
    if not os.access(folder, os.W_OK):
        raise PermissionError(f"--output {output}: this user cannot write into {folder}")


def frozen_datamodule(
    ckpt_path: Path, checkpoint: dict[str, Any], data_dir: str | None, num_workers: int | None
) -> ImageFolderDataModule:
    """The run's own validation and test images, from the split table its checkpoint froze, as `validate` sees them."""
    saved = checkpoint.get("datamodule_hyper_parameters") or {}
    if "net" not in checkpoint or not saved:
        raise ValueError(f"--ckpt_path {ckpt_path} holds no network or data description: was it written by fit?")
    if not (checkpoint.get(ImageFolderDataModule.__qualname__) or {}).get("splits"):
        raise ValueError(
            f"--ckpt_path {ckpt_path} records no frozen split (it predates split tables), so the images its run "
            "validated on are unknown; calibrating on others could fit on training images. Retrain, then calibrate."
        )
    datamodule = ImageFolderDataModule.from_checkpoint(ckpt_path, data_dir, num_workers=num_workers)
    held_out = set(datamodule.splits.split.tolist())
    if "val" not in held_out:
        raise ValueError(
            f"--ckpt_path {ckpt_path}: its run held out no validation images, so there is nothing to fit on"
        )
    datamodule.setup("validate")
    if "test" in held_out:
        datamodule.setup("test")
    return datamodule


@torch.no_grad()  # not inference_mode: the fit differentiates through these logits
def split_logits(predictor: Predictor, datamodule: ImageFolderDataModule, split: str) -> tuple[Tensor, Tensor]:
    """(float64 logits, targets) of one split, from the eval transform every evaluation renders."""
    loader = {"val": datamodule.val_dataloader, "test": datamodule.test_dataloader}[split]()
    logits, targets = [], []
    for images, labels, _ in loader:
        images = (images.to(predictor.device).float() - predictor.mean) / predictor.std
        logits.append(predictor.net(images).double().cpu())
        targets.append(labels)
    return torch.cat(logits), torch.cat(targets)


def fit_temperature(logits: Tensor, targets: Tensor, max_iter: int = 100) -> float:
    """The T > 0 that minimises the NLL of softmax(logits / T): LBFGS over log T, which keeps T positive."""
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [log_t], lr=1.0, max_iter=max_iter, tolerance_grad=1e-12, tolerance_change=1e-15, line_search_fn="strong_wolfe"
    )

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), targets)
        loss.backward()
        return loss

    optimizer.step(closure)
    temperature = float(log_t.detach().exp())
    if not math.isfinite(temperature):
        raise ValueError("the temperature fit diverged: are the validation logits finite?")
    return temperature


def scores(logits: Tensor, targets: Tensor) -> dict[str, float]:
    """Accuracy and ECE as `classifier test` computes them (torchmetrics, 15 bins), and the NLL."""
    probs = logits.float().softmax(dim=-1)
    metrics = classification_metrics(logits.shape[-1], prefix="")
    computed = metrics(probs, targets)
    nll = F.cross_entropy(logits, targets)
    return {"acc": float(computed["acc"]), "ece": float(computed["ece"]), "nll": float(nll)}


def show(report: dict[str, Any]) -> None:
    """Before and after, per split, as a table."""
    fitted_on = f"fitted on {report['val']['images']} validation images"
    table = Table(title=f"Temperature scaling: T = {report['temperature']:.4g}, {fitted_on}")
    table.add_column("split")
    table.add_column("images", justify="right")
    for metric in ("accuracy", "ECE", "NLL"):
        table.add_column(f"{metric} before", justify="right")
        table.add_column(f"{metric} after", justify="right")
    for split, name in SPLIT_NAMES.items():
        if split in report:
            part = report[split]
            cells = [f"{part[when][key]:.4f}" for key in ("acc", "ece", "nll") for when in ("before", "after")]
            table.add_row(name, str(part["images"]), *cells)
    print_table(table)
