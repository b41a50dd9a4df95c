"""What both predictors accept as images, the one loop that feeds them in chunks, and what `classify` decides from
their probabilities and scores; torch-free, for ONNX's sake."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image

ImageInput = str | Path | Image.Image | np.ndarray
Probabilities = TypeVar("Probabilities")  # a torch tensor or a numpy array
Thresholds = float | Sequence[float] | Mapping[str, float]  # one for every label, one per label, or some by name
MULTILABEL = "multilabel"
UNKNOWN = "unknown"  # what predictions.csv, serving and `Classification.prediction` say of a rejected image
Scored = tuple[np.ndarray, np.ndarray | None]  # (N, C) probabilities, (N,) scores (None: the model has none)


def predict_in_chunks(
    images: ImageInput | Sequence[ImageInput],
    batch_size: int,
    predict_chunk: Callable[[list[ImageInput]], Probabilities],
    join: Callable[[list[Probabilities]], Probabilities],
    empty: Probabilities,
) -> Probabilities:
    """(N, classes) probabilities for a sequence of images, or (classes,) for one image: `predict_chunk` takes at
    most `batch_size` of them at a time, `join` concatenates its answers, and no images give `empty`."""
    single = is_single(images)
    batch = [images] if single else list(images)
    if not batch:
        return empty
    probs = join([predict_chunk(batch[start : start + batch_size]) for start in range(0, len(batch), batch_size)])
    return probs[0] if single else probs


def is_single(images: ImageInput | Sequence[ImageInput]) -> bool:
    """Whether `images` is one image (answered alone) rather than a sequence of them (answered as a list)."""
    return isinstance(images, (str, Path, Image.Image, np.ndarray))


def join_scored(parts: list[Scored]) -> Scored:
    """Chunks of (probabilities, scores) as one: the scores are None if any chunk has none."""
    probabilities = np.concatenate([part[0] for part in parts])
    scores = [part[1] for part in parts]
    return probabilities, None if any(score is None for score in scores) else np.concatenate(scores)


@dataclass(frozen=True)
class Classification:
    """One image's decision.

    `labels`: the labels given (multi-label: every label at or over its threshold, in class order; single-label:
    the most probable class), none when the image is `unknown`. `probabilities`: every class's, also for an unknown
    image. `thresholds`: the labels' (multi-label only). `unknown`: the model's rejection (fitted by `classifier
    calibrate`) says the image is none of its classes: its `score` is below the threshold (multi-label: and no label
    reaches its own). `score`: how much the image looks like the training images (`classifier.model.ood`, higher
    is more familiar) that the rejection compares; None for a model without one (or an ONNX export older than it).
    """

    labels: list[str]
    probabilities: dict[str, float]
    thresholds: dict[str, float] | None = None
    unknown: bool = False
    score: float | None = None

    @property
    def prediction(self) -> str:
        """The decision as predictions.csv writes it: "unknown", or the labels `;`-joined (single-label: the class)."""
        return UNKNOWN if self.unknown else ";".join(self.labels)

    @property
    def probability(self) -> float:
        """The most probable class's probability: the given class's, for a single-label model's known image."""
        return max(self.probabilities.values())


def resolve_thresholds(
    class_names: list[str], own: np.ndarray | None, override: Thresholds | None = None
) -> np.ndarray | None:
    """The thresholds to decide with: the model's own (`own`, None for a single-label model), or `override` (one
    number for every label, a list of one per label, or {label: threshold} for some of them)."""
    if override is None:
        return own
    if own is None:
        raise ValueError("thresholds are for multi-label models; a single-label model gives its most probable class")
    chosen = np.array(own, dtype=np.float64)
    if isinstance(override, Mapping):
        unknown = sorted(set(override) - set(class_names))
        if unknown:
            raise ValueError(f"thresholds for unknown labels {', '.join(unknown)}: the labels are {class_names}")
        for name, value in override.items():
            chosen[class_names.index(name)] = value
    elif np.ndim(override) == 0:
        chosen[:] = override
    elif len(override) == len(class_names):
        chosen[:] = override
    else:
        raise ValueError(f"{len(override)} thresholds for {len(class_names)} labels: give one per label, or one")
    return chosen


def decide(probabilities: np.ndarray, thresholds: np.ndarray | None) -> np.ndarray:
    """The decisions as arrays: (N,) class indices (argmax), or multi-label (N, C) 0/1, each probability at or over
    its threshold."""
    if thresholds is None:
        return probabilities.argmax(axis=-1)
    return (np.asarray(probabilities, dtype=np.float64) >= thresholds).astype(np.int64)


def rejected(decisions: np.ndarray, scores: np.ndarray | None, rejection: Mapping | None) -> np.ndarray:
    """(N,) bools: which images are unknown, from `decide`'s decisions and their scores: a score below the rejection
    threshold (a tie is known); multi-label, only for images given no label. All False without a rejection."""
    if rejection is None or scores is None:
        return np.zeros(len(decisions), dtype=bool)
    low = np.asarray(scores) < rejection["threshold"]
    return low & ~decisions.any(axis=-1) if decisions.ndim == 2 else low


def classifications(
    probabilities: np.ndarray,
    class_names: list[str],
    thresholds: np.ndarray | None,
    scores: np.ndarray | None = None,
    rejection: Mapping | None = None,
) -> list[Classification]:
    """One `Classification` per row of (N, C) probabilities (and of (N,) scores, unknown below `rejection`'s
    threshold)."""
    chosen = decide(probabilities, thresholds)
    unknown = rejected(chosen, scores, rejection)
    given_thresholds = None if thresholds is None else dict(zip(class_names, thresholds.tolist(), strict=True))
    results = []
    for i, (row, decision) in enumerate(zip(probabilities, chosen, strict=True)):
        given = dict(zip(class_names, row.tolist(), strict=True))
        labels = [class_names[decision]] if thresholds is None else [class_names[j] for j in np.flatnonzero(decision)]
        score = None if scores is None else float(scores[i])
        results.append(Classification([] if unknown[i] else labels, given, given_thresholds, bool(unknown[i]), score))
    return results


class Classifies:
    """`classify` for a predictor that has `class_names`, `thresholds` (None but for multi-label), `rejection` (None
    unless calibrated with one) and `predict_scored`."""

    class_names: list[str]
    thresholds: np.ndarray | None
    rejection: dict | None
    predict_scored: Callable[[list[ImageInput]], Scored]  # (N, C) probabilities and (N,) scores of a list of images

    def classify(
        self, images: ImageInput | Sequence[ImageInput], thresholds: Thresholds | None = None, reject: bool = True
    ) -> Classification | list[Classification]:
        """The labels each image gets, with every class's probability and the image's score: multi-label, every
        label at or over its threshold (the model's, or `thresholds`: one for all, one per label, or {label:
        threshold}); single-label, the most probable class; none, and `unknown`, for an image the model's rejection
        says is none of its classes (`reject=False`: never). One `Classification` for one image, a list for a
        sequence."""
        chosen = resolve_thresholds(self.class_names, self.thresholds, thresholds)
        probabilities, scores = self.predict_scored([images] if is_single(images) else list(images))
        rejection = self.rejection if reject else None
        results = classifications(probabilities, self.class_names, chosen, scores, rejection)
        return results[0] if is_single(images) else results
