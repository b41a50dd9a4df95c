"""What a multi-label evaluation leaves for a person: each label's average precision and its scores at its decision
threshold, precision-recall curves, how often the labels come together, and the images the model got most wrong.

Every number comes from the per-image probabilities of `predictions.csv` and the checkpoint's thresholds, through
scikit-learn, so it can be recomputed from those two; a confusion matrix has no meaning when an image has several
labels, so there is none.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure  # no pyplot: files only, and the user's backend stays as it is
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    f1_score,
    hamming_loss,
    precision_recall_curve,
    precision_recall_fscore_support,
    precision_score,
    recall_score,
)

from classifier.core.atomic import atomic_open, write_json
from classifier.core.figures import image_gallery_figure, save_figure
from classifier.data.splits import LABEL_SEPARATOR
from classifier.model.thresholds import decisions

REPORT_COLUMNS = ["class", "threshold", "precision", "recall", "f1", "support", "predicted", "average_precision"]


def label_sets(matrix: np.ndarray, classes: list[str]) -> list[str]:
    """Each row of a 0/1 matrix as its labels, `;`-joined ("" for none), as splits.csv writes them."""
    return [LABEL_SEPARATOR.join(classes[c] for c in np.flatnonzero(row)) for row in matrix]


def multilabel_scores(targets: np.ndarray, probs: np.ndarray, thresholds: np.ndarray) -> dict[str, float]:
    """The numbers `test` logs, under the same names: map from the scores, the rest from the decisions at the
    thresholds (precision and recall are macro averages; a label with nothing to count scores 0, as in torchmetrics)."""
    predicted = decisions(probs, thresholds)
    return {
        "map": float(average_precision_score(targets, probs, average="macro")),
        "f1_micro": float(f1_score(targets, predicted, average="micro", zero_division=0)),
        "f1_macro": float(f1_score(targets, predicted, average="macro", zero_division=0)),
        "precision": float(precision_score(targets, predicted, average="macro", zero_division=0)),
        "recall": float(recall_score(targets, predicted, average="macro", zero_division=0)),
        "subset_acc": float(accuracy_score(targets, predicted)),
        "hamming": float(hamming_loss(targets, predicted)),
    }


def label_report(
    targets: np.ndarray, probs: np.ndarray, thresholds: np.ndarray, classes: list[str]
) -> list[dict[str, float | str | int | None]]:
    """Per label: its threshold, the precision, recall and F1 there, its images (support), those it is given
    (predicted) and its average precision; then the micro and macro averages."""
    predicted = decisions(probs, thresholds)
    labels = np.arange(len(classes))
    per_class = precision_recall_fscore_support(targets, predicted, labels=labels, zero_division=0)
    average_precision = average_precision_score(targets, probs, average=None)
    rows: list[dict[str, float | str | int | None]] = [
        {"class": name, "threshold": float(t), "precision": float(p), "recall": float(r), "f1": float(f),
         "support": int(n), "predicted": int(k), "average_precision": float(ap)}
        for name, t, p, r, f, n, k, ap in zip(classes, thresholds, *per_class, predicted.sum(axis=0),
                                              average_precision, strict=True)
    ]  # fmt: skip
    for average in ("micro", "macro"):
        p, r, f, _ = precision_recall_fscore_support(targets, predicted, average=average, zero_division=0)
        rows.append({"class": f"{average} avg", "threshold": None, "precision": float(p), "recall": float(r),
                     "f1": float(f), "support": int(targets.sum()), "predicted": int(predicted.sum()),
                     "average_precision": float(average_precision_score(targets, probs, average=average))})  # fmt: skip
    return rows


def cooccurrence(targets: np.ndarray) -> np.ndarray:
    """How many images carry both label i and label j; the diagonal counts each label's images."""
    return targets.T.astype(np.int64) @ targets.astype(np.int64)


def image_losses(targets: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Each image's binary cross-entropy, averaged over its labels (the loss bce trains on)."""
    clipped = np.clip(probs.astype(np.float64), 1e-7, 1 - 1e-7)
    return -(targets * np.log(clipped) + (1 - targets) * np.log1p(-clipped)).mean(axis=1)


def write_label_report(rows: list[dict], path: Path) -> None:
    with atomic_open(path, newline="") as file:
        writer = csv.DictWriter(file, fieldnames=REPORT_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if v is None else f"{v:.6f}" if isinstance(v, float) else v for k, v in row.items()})


def pr_curves_figure(targets: np.ndarray, probs: np.ndarray, thresholds: np.ndarray, classes: list[str]) -> Figure:
    """Each label's precision-recall curve, with a dot where its threshold puts it; a label no image has draws none."""
    figure = Figure(figsize=(7, 6), dpi=100, layout="constrained")
    axes = figure.subplots()
    colours = [f"C{i % 10}" for i in range(len(classes))]
    for label, (name, colour) in enumerate(zip(classes, colours, strict=True)):
        truth, scores = targets[:, label], probs[:, label]
        if not truth.any():
            continue
        precision, recall, _ = precision_recall_curve(truth, scores)
        ap = average_precision_score(truth, scores)
        axes.step(recall, precision, where="post", color=colour, label=f"{name} (AP {ap:.3f})")
        kept = scores >= thresholds[label]
        precision_there = truth[kept].mean() if kept.any() else 1.0  # scikit-learn's end point: nothing kept
        axes.plot(truth[kept].sum() / truth.sum(), precision_there, "o", color=colour, markeredgecolor="black")
    axes.set(xlim=(0, 1.02), ylim=(0, 1.02), xlabel="recall", ylabel="precision")
    axes.set_title("precision-recall per label (dot: its threshold)")
    if axes.get_legend_handles_labels()[0]:
        axes.legend(loc="lower left", fontsize=8)
    axes.grid(alpha=0.3)
    return figure


def cooccurrence_figure(matrix: np.ndarray, classes: list[str]) -> Figure:
    """The co-occurrence counts as a heat map that grows with the label count."""
    count = len(classes)
    side = min(40.0, max(5.0, 0.28 * count + 2.5))  # inches
    cell = side * 0.75 * 72 / count  # points per cell, roughly
    figure = Figure(figsize=(side, side * 0.9), dpi=120, layout="constrained")
    axes = figure.subplots()
    image = axes.imshow(matrix, cmap="Blues", vmin=0, vmax=max(1, matrix.max()))
    figure.colorbar(image, ax=axes, shrink=0.6)
    font = max(5.0, min(10.0, cell * 0.5))
    axes.set_xticks(range(count), classes, rotation=90, fontsize=font)
    axes.set_yticks(range(count), classes, fontsize=font)
    axes.set_title("images with both true labels\n(diagonal: images with each)")
    for i, j in zip(*np.nonzero(matrix), strict=True):
        colour = "white" if matrix[i, j] > matrix.max() / 2 else "black"
        axes.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=max(4.0, min(9.0, cell * 0.4)),
                  color=colour)  # fmt: skip
    return figure


def top_losses_figure(
    paths: list[Path], targets: np.ndarray, probs: np.ndarray, thresholds: np.ndarray, classes: list[str],
    count: int = 16,
) -> Figure:  # fmt: skip
    """The images with the highest binary cross-entropy, each with its true and predicted labels."""
    losses = image_losses(targets, probs)
    wrong = np.flatnonzero((decisions(probs, thresholds) != targets).any(axis=1))
    worst = wrong[np.argsort(-losses[wrong], kind="stable")][:count]
    truth, predicted = label_sets(targets[worst], classes), label_sets(decisions(probs[worst], thresholds), classes)
    captions = [
        f"true: {t or '-'}\npredicted: {p or '-'}\nBCE {losses[i]:.2f}"
        for i, t, p in zip(worst, truth, predicted, strict=True)
    ]
    return image_gallery_figure([paths[i] for i in worst], captions, "highest losses", "no image with a wrong label")


def write_multilabel_report(
    run_dir: Path, paths: list[Path], targets: np.ndarray, probs: np.ndarray, classes: list[str], thresholds: np.ndarray
) -> list[dict]:
    """multilabel_report.json (the scores, per-label AP and thresholds, co-occurrence), classification_report.csv
    (per label at its threshold), pr_curves.png, label_cooccurrence.png, top_losses.png; returns the per-label rows."""
    rows = label_report(targets, probs, thresholds, classes)
    matrix = cooccurrence(targets)
    report = {
        "images": len(targets),
        "classes": classes,
        **multilabel_scores(targets, probs, thresholds),
        "average_precision": {row["class"]: row["average_precision"] for row in rows[: len(classes)]},
        "thresholds": {name: float(t) for name, t in zip(classes, thresholds, strict=True)},
        "labels": rows,
        "cooccurrence": matrix.tolist(),
    }
    write_json(run_dir / "multilabel_report.json", report)
    write_label_report(rows, run_dir / "classification_report.csv")
    save_figure(pr_curves_figure(targets, probs, thresholds, classes), run_dir / "pr_curves.png")
    save_figure(cooccurrence_figure(matrix, classes), run_dir / "label_cooccurrence.png")
    save_figure(top_losses_figure(paths, targets, probs, thresholds, classes), run_dir / "top_losses.png")
    return rows
