"""How well a model says "unknown": `classifier test --data.ood_dir FOLDER` scores a folder of images of none of the
classes against the test split.

Both sides get the checkpoint's score (`net.rejection["score"]`, energy when it has none; see `classifier.model.ood`)
from the logits the test loop computes. The test images are the positives, so OOD AUROC is the chance that a test
image scores above a folder image (ties count half: scikit-learn's `roc_auc_score`), and FPR at 95% TPR the share of
folder images scored at or above the highest score that keeps 95% of the test images. With a rejection threshold
(`classifier calibrate`), the share of each side marked unknown: below the threshold, and under multi-label, with no
label at or over its own threshold either (an image with a label is never unknown). `ood_scores.csv` lists every
image's score, so each number can be recomputed from it.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningModule, Trainer
from matplotlib.figure import Figure  # no pyplot: files only, and the user's backend stays as it is
from rich.table import Table
from torch import Tensor

from classifier.core.atomic import atomic_open, write_json
from classifier.core.console import print_table
from classifier.core.figures import save_figure
from classifier.deploy.inputs import rejected
from classifier.evaluation.ranks import gathered_by_row
from classifier.model.ood import plain_scores, score_kind

log = logging.getLogger(__name__)
TPR = 0.95  # the share of test images the FPR's threshold keeps
HISTOGRAM_BINS = 40


class UnknownImages:
    """The test split's scores as the test loop yields its logits, then the folder's, and their report."""

    def __init__(self) -> None:
        self._test: list[tuple[Tensor, Tensor, Tensor]] = []  # (rows, scores, labelled) per batch

    def collect(self, trainer: Trainer, pl_module: LightningModule, logits: Tensor, batch: Any) -> None:
        """Keep a test batch's scores, when test has a --data.ood_dir to compare them with."""
        if "ood" in trainer.datamodule.datasets:
            self._test.append((batch[2].cpu(), *image_scores(pl_module, batch[0], logits)))

    def report(self, trainer: Trainer, pl_module: LightningModule, run_dir: Path) -> None:
        """Score the folder, then add its figures to metrics.json (written by then) and write its report files.
        Under DDP each rank scores its share of the folder, as of the test split."""
        if "ood" not in trainer.datamodule.datasets:
            return
        test, self._test = _gathered(self._test), []
        ood = _gathered(folder_scores(trainer, pl_module))
        if not trainer.is_global_zero:
            return
        datamodule = trainer.datamodule
        kind = score_kind(pl_module.net.rejection)
        threshold = (pl_module.rejection or {}).get("threshold")  # none under --model.reject false
        metrics = ood_metrics(test[1], ood[1], threshold, test[2], ood[2])
        earlier = json.loads((run_dir / "metrics.json").read_text())  # the test split's, written just before
        write_json(run_dir / "metrics.json", earlier | metrics)
        paths = [datamodule.paths("test")[row] for row in test[0].tolist()]
        paths += [datamodule.paths("ood")[row] for row in ood[0].tolist()]
        sides = ["test"] * len(test[0]) + ["ood"] * len(ood[0])
        scores, labelled = np.concatenate([test[1], ood[1]]), np.concatenate([test[2], ood[2]])
        write_scores(run_dir / "ood_scores.csv", paths, sides, scores, unknown(scores, threshold, labelled), kind)
        figure = score_histogram_figure(test[1], ood[1], kind, threshold, metrics["ood/auroc"])
        save_figure(figure, run_dir / "ood_scores.png")
        show_ood_report(metrics, kind)
        log.info("Unknown images of %s: metrics.json (ood/...), ood_scores.csv and ood_scores.png in %s",
                 datamodule.hparams.ood_dir, run_dir)  # fmt: skip
        if threshold is None:
            log.info("The checkpoint has no rejection threshold, so no image is marked unknown: `classifier "
                     "calibrate` fits one on the validation split")  # fmt: skip


def image_scores(pl_module: LightningModule, images: Tensor, logits: Tensor) -> tuple[Tensor, Tensor]:
    """(scores, labelled) of a batch: the checkpoint's score of each image itself, as predict scores it
    (`classifier.model.ood.plain_scores`: without TTA, whose combined logits have no energy), and whether it has a
    label at or over its threshold in `logits` (multi-label; a single-label image is never labelled this way)."""
    net = pl_module.net
    scores = plain_scores(pl_module, images, logits, pl_module.hparams.tta, net.rejection, net.multilabel)
    scores = scores.detach().cpu()
    if not net.multilabel:
        return scores, torch.zeros(len(scores), dtype=torch.bool)
    return scores, (net.probabilities(logits.detach()) >= net.thresholds).any(-1).cpu()


@torch.inference_mode()
def folder_scores(trainer: Trainer, pl_module: LightningModule) -> list[tuple[Tensor, Tensor, Tensor]]:
    """(rows, scores, labelled) of each batch of --data.ood_dir, computed as the test split's are."""
    datamodule, device = trainer.datamodule, pl_module.device
    parts = []
    with trainer.precision_plugin.test_step_context():
        for batch in datamodule.ood_dataloader():
            batch = datamodule.transfer_batch_to_device(batch, device, 0)
            images, _, rows = datamodule.on_after_batch_transfer(batch, 0)
            parts.append((rows.cpu(), *image_scores(pl_module, images, pl_module.predict_logits(images))))
    return parts


def _gathered(parts: list[tuple[Tensor, Tensor, Tensor]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every rank's (rows, scores, labelled), concatenated and ordered by row, as numpy arrays."""
    columns = gathered_by_row(parts)
    if columns is None:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32), np.zeros(0, dtype=bool)
    rows, scores, labelled = (column.numpy() for column in columns)
    return rows, scores, labelled


def auroc(known: np.ndarray, ood: np.ndarray) -> float:
    """The chance that a known image scores above an OOD one, ties counting half (Mann-Whitney U over n·m)."""
    ood = np.sort(ood.astype(np.float64))
    known = known.astype(np.float64)
    below = np.searchsorted(ood, known, side="left")
    tied = np.searchsorted(ood, known, side="right") - below
    return float((below + tied / 2).sum() / (len(known) * len(ood)))


def score_keeping(scores: np.ndarray, share: float) -> float:
    """The highest score that keeps at least `share` of `scores` (those at or above it)."""
    kept = math.ceil(round(share * len(scores), 9))  # 0.95 * 100 is 95, not 95.00000000000001
    return float(np.sort(scores)[len(scores) - kept])


def unknown(scores: np.ndarray, threshold: float | None, labelled: np.ndarray) -> np.ndarray:
    """Which images are unknown, as predict decides (`classifier.deploy.inputs.rejected`): below the threshold (a tie
    is known) and given no label; none without a threshold."""
    return rejected(labelled[:, None], scores, None if threshold is None else {"threshold": threshold})


def ood_metrics(
    test: np.ndarray,
    ood: np.ndarray,
    threshold: float | None,
    test_labelled: np.ndarray,
    ood_labelled: np.ndarray,
) -> dict[str, float | int]:
    """The `ood/...` figures of metrics.json: AUROC, FPR at 95% TPR, the counts, and with a rejection threshold the
    share of each side marked unknown."""
    at_tpr = score_keeping(test, TPR)
    metrics = {
        "ood/auroc": auroc(test, ood),
        "ood/fpr_at_95_tpr": float((ood >= at_tpr).mean()),
        "ood/score_at_95_tpr": at_tpr,
        "ood/images_test": len(test),
        "ood/images_ood": len(ood),
    }
    if threshold is not None:
        test_unknown, ood_unknown = unknown(test, threshold, test_labelled), unknown(ood, threshold, ood_labelled)
        metrics |= {
            "ood/threshold": float(threshold),
            "ood/unknown_test": int(test_unknown.sum()),
            "ood/unknown_ood": int(ood_unknown.sum()),
            "ood/unknown_share_test": float(test_unknown.mean()),
            "ood/unknown_share_ood": float(ood_unknown.mean()),
        }
    return metrics


def write_scores(
    path: Path, paths: list[Path], sides: list[str], scores: np.ndarray, unknowns: np.ndarray, kind: str
) -> None:
    """One row per image: path, split (`test` or `ood`), its score (the column named after the kind) and unknown."""
    with atomic_open(path, newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["path", "split", kind, "unknown"])
        for row in zip(paths, sides, scores.tolist(), unknowns.tolist(), strict=True):
            writer.writerow([str(row[0]), row[1], f"{row[2]:.7g}", int(row[3])])


def score_histogram_figure(
    test: np.ndarray, ood: np.ndarray, kind: str, threshold: float | None, auroc_value: float
) -> Figure:
    """Each side's share of images per score bin, on the same bins, with the rejection threshold as a line."""
    figure = Figure(figsize=(7, 4.5), dpi=100, layout="constrained")
    axes = figure.subplots()
    edges = np.histogram_bin_edges(np.concatenate([test, ood]), bins=HISTOGRAM_BINS)
    for scores, name, colour in ((test, "test split", "tab:blue"), (ood, "--data.ood_dir", "tab:red")):
        weights = np.full(len(scores), 1 / max(1, len(scores)))
        axes.hist(scores, bins=edges, weights=weights, color=colour, alpha=0.5, label=f"{name} ({len(scores)})")
    if threshold is not None:
        axes.axvline(threshold, color="black", linestyle="--", label=f"rejection threshold {threshold:.4g}")
    axes.set(xlabel=f"{kind} score (higher: more like the training data)", ylabel="share of the side's images")
    axes.set_title(f"{kind} scores, OOD AUROC = {auroc_value:.4f}")
    axes.legend()
    return figure


def show_ood_report(metrics: dict[str, float | int], kind: str) -> None:
    """The figures as a table: AUROC, FPR at 95% TPR and, with a threshold, each side's images marked unknown."""
    table = Table(title=f"Unknown images ({kind} score)")
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_row("images", f"{metrics['ood/images_test']} test, {metrics['ood/images_ood']} from --data.ood_dir")
    table.add_row("OOD AUROC", f"{metrics['ood/auroc']:.4f}")
    table.add_row("FPR at 95% TPR", f"{metrics['ood/fpr_at_95_tpr']:.4f}")
    if "ood/threshold" in metrics:
        table.add_row("rejection threshold", f"{metrics['ood/threshold']:.4g}")
        for side, name in (("test", "test images"), ("ood", "folder images")):
            count, total = int(metrics[f"ood/unknown_{side}"]), int(metrics[f"ood/images_{side}"])
            table.add_row(f"{name} marked unknown", f"{count} of {total} ({metrics[f'ood/unknown_share_{side}']:.1%})")
    print_table(table)
