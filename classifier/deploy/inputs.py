"""What both predictors accept as images, the one loop that feeds them in chunks, and what `classify` decides from
their probabilities; torch-free, for ONNX's sake."""

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


@dataclass(frozen=True)
class Classification:
    """One image's decision: the labels given (multi-label: every label at or over its threshold, in class order;
    single-label: the most probable class), every class's probability, and the thresholds used (multi-label only)."""

    labels: list[str]
    probabilities: dict[str, float]
    thresholds: dict[str, float] | None = None


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


def classifications(
    probabilities: np.ndarray, class_names: list[str], thresholds: np.ndarray | None
) -> list[Classification]:
    """One `Classification` per row of (N, C) probabilities."""
    chosen = decide(probabilities, thresholds)
    results = []
    for row, decision in zip(probabilities, chosen, strict=True):
        given = dict(zip(class_names, row.tolist(), strict=True))
        if thresholds is None:
            results.append(Classification([class_names[decision]], given))
        else:
            labels = [class_names[i] for i in np.flatnonzero(decision)]
            results.append(Classification(labels, given, dict(zip(class_names, thresholds.tolist(), strict=True))))
    return results


class Classifies:
    """`classify` for a predictor that has `class_names`, `thresholds` (None but for multi-label) and `predict`."""

    class_names: list[str]
    thresholds: np.ndarray | None

    def classify(
        self, images: ImageInput | Sequence[ImageInput], thresholds: Thresholds | None = None
    ) -> Classification | list[Classification]:
        """The labels each image gets, with every class's probability: multi-label, every label at or over its
        threshold (the model's, or `thresholds`: one for all, one per label, or {label: threshold}); single-label,
        the most probable class. One `Classification` for one image, a list for a sequence."""
        chosen = resolve_thresholds(self.class_names, self.thresholds, thresholds)
        probabilities = np.asarray(self.predict(images)).reshape(-1, len(self.class_names))
        results = classifications(probabilities, self.class_names, chosen)
        return results[0] if is_single(images) else results
