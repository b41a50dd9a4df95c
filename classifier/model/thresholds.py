"""Per-label decision thresholds for multi-label models, tuned on validation scores: the threshold that maximises
each label's F1, or the lowest one whose precision reaches a target."""

from __future__ import annotations

import logging

import numpy as np
from sklearn.metrics import precision_recall_curve

log = logging.getLogger(__name__)

DEFAULT = 0.5  # a label's threshold when validation cannot tune it (no image has it)


def tune_thresholds(
    probs: np.ndarray, targets: np.ndarray, classes: list[str], target_precision: float | None = None
) -> np.ndarray:
    """One threshold per label (column): an image gets the label when its probability is at least that.

    Each threshold sits halfway between the lowest score it keeps and the next lower score, so it does not hang on
    one validation image's exact score.
    """
    chosen = np.full(probs.shape[1], DEFAULT)
    for label in range(probs.shape[1]):
        truth, scores = targets[:, label], probs[:, label]
        if truth.sum() == 0 or truth.sum() == len(truth):
            continue  # nothing to tell apart
        precision, recall, cuts = precision_recall_curve(truth, scores)
        precision, recall = precision[:-1], recall[:-1]  # the last point has no threshold
        if target_precision is None:
            f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
            best = int(np.argmax(f1))
        elif (precision >= target_precision).any():
            best = int(np.flatnonzero(precision >= target_precision)[0])  # the lowest: the most recall
        else:
            best = int(np.argmax(precision))
            log.warning(
                "no threshold of %s reaches precision %.3g on validation (at most %.3g): it gets the most precise one",
                classes[label], target_precision, precision[best],
            )  # fmt: skip
        below = scores[scores < cuts[best]]
        chosen[label] = (cuts[best] + below.max()) / 2 if len(below) else cuts[best]
    return chosen


def decisions(probs: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """0/1 labels: each probability at or over its label's threshold."""
    return (probs >= thresholds).astype(np.int64)
