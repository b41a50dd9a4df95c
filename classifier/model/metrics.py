"""The torchmetrics each stage logs: one class per image (accuracy, F1, calibration) or a set of labels per image
(average precision, and F1, precision, recall, subset accuracy and Hamming loss at the decision thresholds)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassCalibrationError,
    MulticlassF1Score,
    MulticlassStatScores,
    MultilabelAveragePrecision,
    MultilabelExactMatch,
    MultilabelF1Score,
    MultilabelHammingDistance,
    MultilabelPrecision,
    MultilabelRecall,
)

FAST = {"validate_args": False}  # argument checks read values back to the host: a sync every step
# torchmetrics merges the states of metrics that are equal after the first update (compute groups): when the
# first batch is all right, top-5's state equals balanced accuracy's, and top-5 reports top-1 for the whole run
SEPARATE = {"compute_groups": False}
LOWER_IS_BETTER = ("loss", "ece", "hamming")
HIGHER_IS_BETTER = ("acc", "balanced_acc", "f1_macro", "f1_weighted", "top5_acc", "f1", "map", "ap", "f1_micro",
                    "precision", "recall", "subset_acc")  # fmt: skip


def metric_mode(name: str) -> Literal["min", "max"] | None:
    """The sense a logged metric improves in (`val/loss`: min, `val/f1/cat`: max); None for a name not logged here."""
    kind = name.split("/")[1] if name.count("/") else name
    return "min" if kind in LOWER_IS_BETTER else "max" if kind in HIGHER_IS_BETTER else None


class BalancedAccuracy(MulticlassStatScores):
    """scikit-learn's balanced accuracy: the mean recall of the classes the targets hold. torchmetrics' macro
    accuracy also averages in, at 0, a class that is only predicted (one absent from a small split or a fold)."""

    def __init__(self, num_classes: int, **kwargs: object) -> None:
        super().__init__(num_classes, average=None, **kwargs)

    def compute(self) -> Tensor:
        tp, _, _, fn = self._final_state()
        support = tp + fn
        present = support > 0
        return (tp[present] / support[present]).mean() if present.any() else torch.tensor(0.0)


class WeightedMean(Metric):
    """The mean of batch values, each counted `weight` times: a split's loss whatever its batches and ranks, when each
    batch's loss is a weighted mean over its images (class weights). torchmetrics' MeanMetric drops `weight` under
    nan_strategy="disable" (1.9), and its NaN check reads values back to the host every step."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("weight", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, value: Tensor, weight: Tensor) -> None:
        self.total += value.double() * weight
        self.weight += weight.double()

    def compute(self) -> Tensor:
        return (self.total / self.weight).float()


def classification_metrics(num_classes: int, prefix: str) -> MetricCollection:
    """acc, balanced_acc, f1_macro, f1_weighted, ece and, past 5 classes, top5_acc, named `{prefix}{name}`."""
    metrics = {
        "acc": MulticlassAccuracy(num_classes, average="micro", **FAST),
        "balanced_acc": BalancedAccuracy(num_classes, **FAST),
        "f1_macro": MulticlassF1Score(num_classes, average="macro", **FAST),
        "f1_weighted": MulticlassF1Score(num_classes, average="weighted", **FAST),
        "ece": MulticlassCalibrationError(num_classes, n_bins=15, norm="l1", **FAST),
    }
    if num_classes > 5:
        metrics["top5_acc"] = MulticlassAccuracy(num_classes, top_k=5, average="micro", **FAST)
    return MetricCollection(metrics, prefix=prefix, **SEPARATE)


def ranking_metrics(num_labels: int, prefix: str) -> MetricCollection:
    """map: the mean over labels of each label's average precision, from the scores (no threshold)."""
    average_precision = MultilabelAveragePrecision(num_labels, average="macro", **FAST)
    return MetricCollection({"map": average_precision}, prefix=prefix, **SEPARATE)


def decision_metrics(num_labels: int, prefix: str) -> MetricCollection:
    """Of the 0/1 decisions (scores at their thresholds): f1_micro, f1_macro, precision and recall (macro),
    subset_acc (every label of the image right) and hamming (the share of wrong labels)."""
    return MetricCollection(
        {
            "f1_micro": MultilabelF1Score(num_labels, average="micro", **FAST),
            "f1_macro": MultilabelF1Score(num_labels, average="macro", **FAST),
            "precision": MultilabelPrecision(num_labels, average="macro", **FAST),
            "recall": MultilabelRecall(num_labels, average="macro", **FAST),
            "subset_acc": MultilabelExactMatch(num_labels, **FAST),
            "hamming": MultilabelHammingDistance(num_labels, average="micro", **FAST),
        },
        prefix=prefix,
        **SEPARATE,
    )
