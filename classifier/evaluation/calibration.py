"""The engine of `classifier calibrate`: one temperature that makes a checkpoint's probabilities mean what they say.

It is fitted on the frozen validation split the run held out (Guo et al., 2017, "On Calibration of Modern Neural
Networks"): the logits are computed once, then LBFGS minimises their negative log-likelihood over log T: of the
softmax, or of each label's sigmoid (binary cross-entropy) for a multi-label network, whose thresholds then move with
T so that every image keeps its labels. The new checkpoint carries T in its network, so test, predict, `Predictor`,
export and serving all use it.

Then, on the same validation images' calibrated logits, the rejection threshold (unless `reject` is off): the
`classifier.model.ood` score (energy, or msp) under which an image is unknown, the value that keeps `keep` of them
(numpy's `quantile(scores, 1 - keep, method="lower")`: one of their scores, so at least that share, and every tie,
scores at or above it, and stays known). It travels in the network as the temperature does.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from rich.table import Table
from torch import Tensor
from torchmetrics.functional.classification import binary_calibration_error

from classifier.core.atomic import write_json
from classifier.core.console import print_table
from classifier.data.datamodule import ImageFolderDataModule
from classifier.deploy.inputs import decide, rejected
from classifier.deploy.predictor import Predictor
from classifier.model.checkpoints import read_checkpoint, save_checkpoint
from classifier.model.devices import device_of
from classifier.model.module import classification_metrics
from classifier.model.ood import OOD_SCORES, ood_score

log = logging.getLogger(__name__)
SPLIT_NAMES = {"val": "validation", "test": "test"}
SHOWN = {  # (report key, column name) of the scores each task's table shows
    False: (("acc", "accuracy"), ("ece", "ECE"), ("nll", "NLL")),
    True: (("bce", "BCE"), ("ece", "ECE"), ("brier", "Brier")),
}
ECE_BINS = 15


def calibrate_checkpoint(
    ckpt_path: Path,
    output: Path,
    data_dir: str | None = None,
    num_workers: int | None = None,
    device: str = "cpu",
    reject: bool = True,
    keep: float = 0.95,
    score: str = "energy",
) -> Path:
    """Fit T, then the rejection threshold of `score` that keeps `keep` of the images (unless not `reject`), on the
    checkpoint's validation logits; write `output` and its `.json` report beside it."""
    started = time.perf_counter()
    check_rejection(score, keep)
    torch_device = device_of(device)
    checkpoint = read_checkpoint(ckpt_path)
    check_writable(output, ckpt_path)
    datamodule = frozen_datamodule(ckpt_path, checkpoint, data_dir, num_workers)
    predictor = Predictor.from_checkpoint(ckpt_path, torch_device, tta="none")
    before = predictor.net.temperature  # a checkpoint calibrated before: fitted again from the raw logits
    predictor.net.temperature = 1.0
    multilabel = predictor.net.multilabel
    logits = {split: split_logits(predictor, datamodule, split) for split in datamodule.datasets}
    temperature = fit_temperature(*logits["val"], multilabel=multilabel)
    report: dict[str, Any] = {"checkpoint": str(ckpt_path), "output": str(output), "temperature": temperature}
    for split, (raw, targets) in logits.items():
        report[split] = {
            "images": len(targets),
            "before": scores(raw / before, targets, multilabel),
            "after": scores(raw / temperature, targets, multilabel),
        }
    checkpoint = dict(checkpoint)
    if multilabel:
        thresholds = checkpoint["state_dict"]["net.thresholds"]
        moved = tempered_thresholds(thresholds, before, temperature)
        checkpoint["state_dict"] = {**checkpoint["state_dict"], "net.thresholds": moved}
        changes = {
            split: changed_labels(raw, thresholds, moved, before, temperature) for split, (raw, _) in logits.items()
        }
        report["thresholds"] = {
            "before": dict(zip(predictor.class_names, thresholds.tolist(), strict=True)),
            "after": dict(zip(predictor.class_names, moved.tolist(), strict=True)),
            "labels_changed": changes,
        }
    rejection = None
    if reject:  # a recalibrated checkpoint's earlier threshold belongs to its earlier temperature: fitted again too
        labels_at = checkpoint["state_dict"]["net.thresholds"] if multilabel else None
        rejection, report["rejection"] = rejection_threshold(logits, temperature, score, keep, labels_at)
    report["seconds"] = time.perf_counter() - started
    fitted = {"temperature": temperature, "rejection": rejection}
    checkpoint["net"] = {**checkpoint["net"], **fitted}
    checkpoint["hyper_parameters"] = {**checkpoint.get("hyper_parameters", {}), **fitted}
    checkpoint["calibration"] = report
    save_checkpoint(checkpoint, output)
    write_json(output.with_suffix(".json"), report)
    show(report, multilabel)
    if rejection:
        show_rejection(report)
    if checkpoint["hyper_parameters"].get("tta"):
        log.info(
            "Fitted and scored without test-time augmentation; `classifier test` with --model.tta %s averages the "
            "views' tempered probabilities, so its figures differ.",
            checkpoint["hyper_parameters"]["tta"],
        )
    fitted_text = f"temperature {temperature:.4g}"
    if rejection:
        fitted_text += f", unknown below {rejection['score']} {rejection['threshold']:.4g}"
    log.info(
        "Calibrated checkpoint (%s): %s\nReport: %s\nTest it with: classifier test --ckpt_path %s",
        fitted_text, output, output.with_suffix(".json"), output,
    )  # fmt: skip
    return output


def check_rejection(score: str, keep: float) -> None:
    """Fail before the work on options that cannot make a threshold."""
    if score not in OOD_SCORES:
        raise ValueError(f"--ood_score {score!r}: choose one of {', '.join(OOD_SCORES)}")
    if not 0 < keep <= 1:
        raise ValueError(f"--keep {keep:g}: the share of validation images to keep known is over 0 and at most 1")


def rejection_threshold(
    logits: dict[str, tuple[Tensor, Tensor]], temperature: float, score: str, keep: float, thresholds: Tensor | None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The rejection fitted on the validation split's calibrated logits, and its report, with the share of each
    split it marks unknown (multi-label: at the labels' `thresholds`)."""
    tempered = {split: raw.float() / temperature for split, (raw, _) in logits.items()}  # as the network divides them
    rejection = fit_rejection(tempered["val"], score, keep, thresholds is not None)
    return rejection, {**rejection, "unknown": unknown_shares(tempered, rejection, thresholds)}


def fit_rejection(logits: Tensor, score: str, keep: float, multilabel: bool = False) -> dict[str, Any]:
    """{"score", "threshold", "keep"}: the lowest score (of `score`'s kind, from calibrated validation logits) that
    still keeps `keep` of the images at or above it; numpy's lower quantile, so the threshold is one of their scores."""
    scores = ood_score(logits, score, multilabel).numpy()
    return {"score": score, "threshold": float(np.quantile(scores, 1 - keep, method="lower")), "keep": keep}


def unknown_shares(
    tempered: dict[str, Tensor], rejection: dict[str, Any], thresholds: Tensor | None = None
) -> dict[str, float]:
    """The share of each split's images marked unknown, from calibrated logits: under the rejection threshold, and
    multi-label (given the labels' `thresholds`), with no label at or over its own either."""
    shares, multilabel = {}, thresholds is not None
    for split, logits in tempered.items():
        probs = (logits.sigmoid() if multilabel else logits.softmax(dim=-1)).numpy()
        chosen = decide(probs, thresholds.double().numpy() if multilabel else None)
        scores = ood_score(logits, rejection["score"], multilabel).numpy()
        shares[split] = float(rejected(chosen, scores, rejection).mean())
    return shares


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


def fit_temperature(logits: Tensor, targets: Tensor, max_iter: int = 100, multilabel: bool = False) -> float:
    """The T > 0 that minimises the NLL of softmax(logits / T), or with `multilabel` the binary cross-entropy of
    sigmoid(logits / T) against the 0/1 targets: LBFGS over log T, which keeps T positive."""
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [log_t], lr=1.0, max_iter=max_iter, tolerance_grad=1e-12, tolerance_change=1e-15, line_search_fn="strong_wolfe"
    )

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = nll(logits / log_t.exp(), targets, multilabel)
        loss.backward()
        return loss

    optimizer.step(closure)
    temperature = float(log_t.detach().exp())
    if not math.isfinite(temperature):
        raise ValueError("the temperature fit diverged: are the validation logits finite?")
    return temperature


def nll(logits: Tensor, targets: Tensor, multilabel: bool) -> Tensor:
    """The mean negative log-likelihood: of the softmax, or of each label's sigmoid (binary cross-entropy)."""
    if multilabel:
        return F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype))
    return F.cross_entropy(logits, targets)


def scores(logits: Tensor, targets: Tensor, multilabel: bool = False) -> dict[str, float]:
    """Accuracy and ECE as `classifier test` computes them (torchmetrics, 15 bins), and the NLL; multi-label, the
    binary cross-entropy, the mean over labels of each one's ECE (of its sigmoid) and the Brier score."""
    if multilabel:
        probs = logits.sigmoid()
        per_label = zip(probs.T.contiguous(), targets.T.contiguous(), strict=True)
        ece = [binary_calibration_error(p, t, n_bins=ECE_BINS) for p, t in per_label]
        brier = (probs - targets).square().mean()
        return {"bce": float(nll(logits, targets, True)), "ece": float(torch.stack(ece).mean()), "brier": float(brier)}
    probs = logits.float().softmax(dim=-1)
    metrics = classification_metrics(logits.shape[-1], prefix="")
    computed = metrics(probs, targets)
    return {"acc": float(computed["acc"]), "ece": float(computed["ece"]), "nll": float(nll(logits, targets, False))}


def tempered_thresholds(thresholds: Tensor, before: float, temperature: float) -> Tensor:
    """Thresholds on sigmoid(raw / temperature) that keep every decision made at `thresholds` on
    sigmoid(raw / before): the same cut on the raw logit."""
    raw_cut = torch.special.logit(thresholds.double()) * before
    return (raw_cut / temperature).sigmoid().to(thresholds.dtype)


def changed_labels(raw: Tensor, thresholds: Tensor, moved: Tensor, before: float, temperature: float) -> int:
    """How many (image, label) decisions the new temperature and thresholds change: none, unless float32 rounding
    merges them (a temperature so large that every probability is about 1/2)."""
    kept = (raw / before).float().sigmoid() >= thresholds
    changed = int(((raw / temperature).float().sigmoid() >= moved).ne(kept).sum())
    if changed:
        log.warning(
            "%d label decisions change with T = %.4g: float32 cannot tell the tempered probabilities apart from their "
            "thresholds; the model's scores may carry little information (check its val/map)", changed, temperature,
        )  # fmt: skip
    return changed


def show(report: dict[str, Any], multilabel: bool = False) -> None:
    """Before and after, per split, as a table."""
    fitted_on = f"fitted on {report['val']['images']} validation images"
    table = Table(title=f"Temperature scaling: T = {report['temperature']:.4g}, {fitted_on}")
    table.add_column("split")
    table.add_column("images", justify="right")
    shown = SHOWN[multilabel]
    for _, metric in shown:
        table.add_column(f"{metric} before", justify="right")
        table.add_column(f"{metric} after", justify="right")
    for split, name in SPLIT_NAMES.items():
        if split in report:
            part = report[split]
            cells = [f"{part[when][key]:.4f}" for key, _ in shown for when in ("before", "after")]
            table.add_row(name, str(part["images"]), *cells)
    print_table(table)


def show_rejection(report: dict[str, Any]) -> None:
    """The rejection threshold, and the share of each split's images it keeps known and marks unknown."""
    rejection = report["rejection"]
    table = Table(title=f"Rejection: unknown below {rejection['score']} {rejection['threshold']:.4g}")
    for column in ("split", "images", "known", "unknown"):
        table.add_column(column, justify="left" if column == "split" else "right")
    for split, name in SPLIT_NAMES.items():
        if split in rejection["unknown"]:
            unknown = rejection["unknown"][split]
            table.add_row(name, str(report[split]["images"]), f"{1 - unknown:.1%}", f"{unknown:.1%}")
    print_table(table)
