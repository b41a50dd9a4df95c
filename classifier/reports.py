"""What an evaluation leaves for a person: per-class report, confusion matrix, calibration and top losses.

Every function takes the same per-image predictions (targets and class probabilities), so each number in
each file can be recomputed from `predictions.csv`.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from torchmetrics.functional.classification import multiclass_calibration_error  # noqa: E402

from classifier.images import load_rgb  # noqa: E402

ECE_BINS = 15


def confusion_matrix(targets: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts, rows = true class, columns = predicted class."""
    return np.bincount(targets * num_classes + predicted, minlength=num_classes**2).reshape(num_classes, -1)


def classification_report(matrix: np.ndarray, classes: list[str]) -> list[dict[str, float | str | int]]:
    """Per-class precision, recall, F1 and support, then macro and support-weighted averages (as scikit-learn)."""
    true_positives = np.diag(matrix).astype(float)
    support = matrix.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.nan_to_num(true_positives / matrix.sum(axis=0))
        recall = np.nan_to_num(true_positives / support)
        f1 = np.nan_to_num(2 * precision * recall / (precision + recall))
    rows = [
        {"class": name, "precision": precision[i], "recall": recall[i], "f1": f1[i], "support": int(support[i])}
        for i, name in enumerate(classes)
    ]
    total = int(support.sum())
    weights = support / max(total, 1)
    for name, average in (("macro avg", np.mean), ("weighted avg", lambda v: float(np.sum(v * weights)))):
        rows.append(
            {"class": name, "precision": average(precision), "recall": average(recall), "f1": average(f1),
             "support": total}
        )  # fmt: skip
    return rows


def calibration_bins(targets: np.ndarray, probs: np.ndarray, bins: int = ECE_BINS) -> list[tuple[float, float, int]]:
    """(mean confidence, accuracy, count) per equal-width confidence bin, for the reliability diagram."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == targets
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    return [
        (float(confidence[which == b].mean()), float(correct[which == b].mean()), int((which == b).sum()))
        if (which == b).any()
        else (float("nan"), float("nan"), 0)
        for b in range(bins)
    ]


def expected_calibration_error(targets: np.ndarray, probs: np.ndarray) -> float:
    """torchmetrics' ECE (15 equal-width bins, l1), the same number as `test/ece` in metrics.json."""
    return float(
        multiclass_calibration_error(
            torch.from_numpy(probs), torch.from_numpy(targets), probs.shape[1], n_bins=ECE_BINS, norm="l1"
        )
    )


def write_classification_report(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=["class", "precision", "recall", "f1", "support"])
        writer.writeheader()
        for row in rows:
            writer.writerow({k: f"{v:.6f}" if isinstance(v, float) else v for k, v in row.items()})


def write_confusion_matrix_csv(matrix: np.ndarray, classes: list[str], path: Path) -> None:
    """A header of predicted class names, then one row per true class led by its name."""
    with open(path, "w", newline="") as file:
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
    figure, axes = plt.subplots(figsize=(side, side * 0.9), dpi=120, layout="constrained")
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
    """Accuracy against confidence per bin; a calibrated model follows the diagonal."""
    figure, axes = plt.subplots(figsize=(6, 6), dpi=100, layout="constrained")
    width = 1 / len(per_bin)
    centres = (np.arange(len(per_bin)) + 0.5) * width
    accuracy = [a if count else 0.0 for _, a, count in per_bin]
    axes.bar(centres, accuracy, width=width, edgecolor="black", color="tab:blue", label="accuracy")
    confidence = [c if count else 0.0 for c, _, count in per_bin]  # an empty bin draws nothing
    axes.bar(centres, np.array(confidence) - np.array(accuracy), bottom=accuracy, width=width, color="tab:red",
             alpha=0.3, edgecolor="tab:red", label="gap to confidence")  # fmt: skip
    axes.plot([0, 1], [0, 1], "k--", label="perfect calibration")
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
    columns = min(4, max(1, len(worst)))
    rows = max(1, math.ceil(len(worst) / columns))
    figure, grid = plt.subplots(rows, columns, figsize=(3 * columns, 3.4 * rows), dpi=100, squeeze=False,
                                layout="constrained")  # fmt: skip
    for axes in grid.flat:
        axes.axis("off")
    if not len(worst):
        grid[0, 0].text(0.5, 0.5, "no misclassified images", ha="center", va="center")
    for axes, i in zip(grid.flat, worst, strict=False):
        axes.imshow(load_rgb(paths[i]), interpolation="nearest")
        axes.set_title(
            f"true: {classes[targets[i]]}\npredicted: {classes[predicted[i]]} ({confidence[i]:.2f})", fontsize=9
        )
    figure.suptitle("most confident mistakes")
    return figure


def training_curves_figure(history: list[dict[str, float]]) -> Figure:
    """Loss, accuracy and macro F1 per epoch, train against val."""
    figure, grid = plt.subplots(1, 3, figsize=(15, 4.2), dpi=100, layout="constrained")
    for axes, name in zip(grid, ("loss", "acc", "f1_macro"), strict=True):
        for stage in ("train", "val"):
            points = [(row["epoch"], row[f"{stage}/{name}"]) for row in history if f"{stage}/{name}" in row]
            if points:
                axes.plot(*zip(*points, strict=True), marker="o", label=stage)
        axes.set(title=name, xlabel="epoch")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.legend()
        axes.grid(alpha=0.3)
    return figure


def save_figure(figure: Figure, path: Path) -> None:
    figure.savefig(path)
    plt.close(figure)


def figure_to_array(figure: Figure) -> np.ndarray:
    """HWC uint8 RGB, for TensorBoard."""
    figure.canvas.draw()
    array = np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()
    plt.close(figure)
    return array


def write_evaluation_report(
    run_dir: Path, paths: list[Path], targets: np.ndarray, probs: np.ndarray, classes: list[str]
) -> list[dict]:
    """classification_report.csv, confusion_matrix.csv/.png/_normalized.png, reliability_diagram.png, top_losses.png."""
    matrix = confusion_matrix(targets, probs.argmax(axis=1), len(classes))
    report = classification_report(matrix, classes)
    write_classification_report(report, run_dir / "classification_report.csv")
    write_confusion_matrix_csv(matrix, classes, run_dir / "confusion_matrix.csv")
    save_figure(confusion_matrix_figure(matrix, classes, normalize=False), run_dir / "confusion_matrix.png")
    save_figure(confusion_matrix_figure(matrix, classes, normalize=True), run_dir / "confusion_matrix_normalized.png")
    ece = expected_calibration_error(targets, probs)
    save_figure(reliability_figure(calibration_bins(targets, probs), ece), run_dir / "reliability_diagram.png")
    save_figure(top_losses_figure(paths, targets, probs, classes), run_dir / "top_losses.png")
    return report
