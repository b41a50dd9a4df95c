"""What an evaluation leaves for a person: per-class report, confusion matrix, calibration and top losses.

Every function takes the same per-image predictions (targets and class probabilities), so each number in
each file can be recomputed from `predictions.csv`.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure  # no pyplot: files only, and the user's backend stays as it is
from matplotlib.ticker import MaxNLocator
from sklearn.metrics import confusion_matrix as sk_confusion_matrix
from sklearn.metrics import precision_recall_fscore_support
from torchmetrics.functional.classification import multiclass_calibration_error

from classifier.core.atomic import atomic_open
from classifier.core.figures import image_gallery_figure, save_figure

ECE_BINS = 15


def confusion_matrix(targets: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts, rows = true class, columns = predicted class."""
    return sk_confusion_matrix(targets, predicted, labels=np.arange(num_classes))


def classification_report(
    targets: np.ndarray, predicted: np.ndarray, classes: list[str]
) -> list[dict[str, float | str | int]]:
    """Per-class precision, recall, F1 and support, then macro and support-weighted averages over the classes the
    split holds or the model predicts (scikit-learn's)."""
    labels = np.arange(len(classes))
    per_class = precision_recall_fscore_support(targets, predicted, labels=labels, zero_division=0)
    rows = [
        {"class": name, "precision": float(p), "recall": float(r), "f1": float(f), "support": int(n)}
        for name, p, r, f, n in zip(classes, *per_class, strict=True)
    ]
    present = np.union1d(targets, predicted)  # scikit-learn's default, as metrics.json's macro F1: a class neither
    for average in ("macro", "weighted"):  # in the split nor predicted has no F1 to average in
        p, r, f, _ = precision_recall_fscore_support(targets, predicted, labels=present, average=average,
                                                     zero_division=0)  # fmt: skip
        rows.append({"class": f"{average} avg", "precision": float(p), "recall": float(r), "f1": float(f),
                     "support": len(targets)})  # fmt: skip
    return rows


def calibration_bins(targets: np.ndarray, probs: np.ndarray, bins: int = ECE_BINS) -> list[tuple[float, float, int]]:
    """(mean confidence, accuracy, count) per bin of `test/ece`: torchmetrics' `bins` equal-width bins [low, high) of
    the float32 confidence, and a last one for confidence exactly 1, which a float32 softmax often gives."""
    confidence, predicted = torch.from_numpy(probs).float().max(dim=1)
    correct = (predicted.numpy() == targets).astype(np.float64)
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float32)
    index = (torch.bucketize(confidence, edges, right=True) - 1).numpy()
    counts = np.bincount(index, minlength=bins + 1)
    sums = [np.bincount(index, weights=values, minlength=bins + 1) for values in (confidence.double().numpy(), correct)]
    return [
        (float(conf / count), float(right / count), int(count)) if count else (float("nan"), float("nan"), 0)
        for conf, right, count in zip(*sums, counts, strict=True)
    ]


def expected_calibration_error(targets: np.ndarray, probs: np.ndarray) -> float:
    """torchmetrics' ECE (15 equal-width bins, l1), the same number as `test/ece` in metrics.json."""
    return float(
        multiclass_calibration_error(
            torch.from_numpy(probs), torch.from_numpy(targets), probs.shape[1], n_bins=ECE_BINS, norm="l1"
        )
    )


def write_classification_report(rows: list[dict], path: Path) -> None:
    with atomic_open(path, newline="") as file:
        writer = csv.DictWriter(file, fieldnames=["class", "precision", "recall", "f1", "support"])
        writer.writeheader()
        for row in rows:
            writer.writerow({k: f"{v:.6f}" if isinstance(v, float) else v for k, v in row.items()})


def write_confusion_matrix_csv(matrix: np.ndarray, classes: list[str], path: Path) -> None:
    """A header of predicted class names, then one row per true class led by its name."""
    with atomic_open(path, newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["true \\ predicted", *classes])
        for name, row in zip(classes, matrix.tolist(), strict=True):
            writer.writerow([name, *row])


def confusion_matrix_figure(matrix: np.ndarray, classes: list[str], normalize: bool) -> Figure:
    """A heat map that stays legible from 2 to ~100 classes: it grows with the class count."""
    count = len(classes)
    values = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1) if normalize else matrix
    side = min(40.0, max(5.0, 0.28 * count + 2.5))  # inches
    cell = side * 0.75 * 72 / count  # points per cell, roughly
    figure = Figure(figsize=(side, side * 0.9), dpi=120, layout="constrained")
    axes = figure.subplots()
    image = axes.imshow(values, cmap="Blues", vmin=0, vmax=1 if normalize else max(1, values.max()))
    figure.colorbar(image, ax=axes, shrink=0.6)
    font = max(5.0, min(10.0, cell * 0.5))
    axes.set_xticks(range(count), classes, rotation=90, fontsize=font)
    axes.set_yticks(range(count), classes, fontsize=font)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title("confusion matrix" + (" (each row sums to 1)" if normalize else " (counts)"))
    threshold = values.max() / 2
    for i, j in zip(*np.nonzero(matrix), strict=True):
        text = f"{values[i, j]:.2f}" if normalize else str(matrix[i, j])
        color = "white" if values[i, j] > threshold else "black"
        axes.text(j, i, text, ha="center", va="center", fontsize=max(4.0, min(9.0, cell * (0.3 if normalize else 0.4))),
                  color=color)  # fmt: skip
    return figure


def reliability_figure(per_bin: list, ece: float) -> Figure:
    """Accuracy against confidence per bin of the ECE (`calibration_bins`); a calibrated model follows the diagonal.

    Opaque bars and an unfilled hatched gap, so no colour comes from two overlapping ones; each is in the legend. The
    images of confidence exactly 1 (a bin of their own in the ECE) are a diamond at 1.
    """
    figure = Figure(figsize=(6, 6), dpi=100, layout="constrained")
    axes = figure.subplots()
    *per_bin, (_, certain_accuracy, certain) = per_bin
    width = 1 / len(per_bin)
    centres = (np.arange(len(per_bin)) + 0.5) * width
    accuracy = np.array([a if count else 0.0 for _, a, count in per_bin])
    confidence = np.array([c if count else 0.0 for c, _, count in per_bin])  # an empty bin draws nothing
    axes.bar(centres, accuracy, width=width, color="tab:blue", edgecolor="black", label="accuracy")
    axes.bar(centres, confidence - accuracy, bottom=accuracy, width=width, fill=False, hatch="///",
             edgecolor="tab:red", label="gap to mean confidence")  # fmt: skip
    axes.plot([0, 1], [0, 1], "k--", label="perfect calibration")
    if certain:
        axes.plot([1.0], [certain_accuracy], "D", color="tab:blue", markeredgecolor="black", clip_on=False,
                  label=f"confidence 1: {certain} images")  # fmt: skip
    axes.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy")
    axes.set_title(f"reliability diagram, ECE = {ece:.4f}")
    axes.legend(loc="upper left")
    return figure


def top_losses_figure(
    paths: list[Path], targets: np.ndarray, probs: np.ndarray, classes: list[str], count: int = 16
) -> Figure:
    """The most confident mistakes, each tile with its image, true and predicted class, and confidence."""
    predicted, confidence = probs.argmax(axis=1), probs.max(axis=1)
    wrong = np.flatnonzero(predicted != targets)
    worst = wrong[np.argsort(-confidence[wrong], kind="stable")][:count]
    captions = [f"true: {classes[targets[i]]}\npredicted: {classes[predicted[i]]} ({confidence[i]:.2f})" for i in worst]
    shown = [paths[i] for i in worst]
    return image_gallery_figure(shown, captions, "most confident mistakes", "no misclassified images")


def training_curves_figure(history: list[dict[str, float]]) -> Figure:
    """Loss, accuracy (multi-label: mAP) and macro F1 per epoch, train against val."""
    figure = Figure(figsize=(15, 4.2), dpi=100, layout="constrained")
    grid = figure.subplots(1, 3)
    ranking = "map" if any("val/map" in row for row in history) else "acc"
    for axes, name in zip(grid, ("loss", ranking, "f1_macro"), strict=True):
        for stage in ("train", "val"):
            points = [(row["epoch"], row[f"{stage}/{name}"]) for row in history if f"{stage}/{name}" in row]
            if points:
                axes.plot(*zip(*points, strict=True), marker="o", label=stage)
        axes.set(title=name, xlabel="epoch")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.legend()
        axes.grid(alpha=0.3)
    return figure


def write_evaluation_report(
    run_dir: Path, paths: list[Path], targets: np.ndarray, probs: np.ndarray, classes: list[str]
) -> list[dict]:
    """classification_report.csv, confusion_matrix.csv/.png/_normalized.png, reliability_diagram.png, top_losses.png."""
    predicted = probs.argmax(axis=1)
    matrix = confusion_matrix(targets, predicted, len(classes))
    report = classification_report(targets, predicted, classes)
    write_classification_report(report, run_dir / "classification_report.csv")
    write_confusion_matrix_csv(matrix, classes, run_dir / "confusion_matrix.csv")
    save_figure(confusion_matrix_figure(matrix, classes, normalize=False), run_dir / "confusion_matrix.png")
    save_figure(confusion_matrix_figure(matrix, classes, normalize=True), run_dir / "confusion_matrix_normalized.png")
    ece = expected_calibration_error(targets, probs)
    save_figure(reliability_figure(calibration_bins(targets, probs), ece), run_dir / "reliability_diagram.png")
    save_figure(top_losses_figure(paths, targets, probs, classes), run_dir / "top_losses.png")
    return report
