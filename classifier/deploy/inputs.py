"""What both predictors accept as images, and the one loop that feeds them in chunks; torch-free, for ONNX's sake."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image

ImageInput = str | Path | Image.Image | np.ndarray
Probabilities = TypeVar("Probabilities")  # a torch tensor or a numpy array


def predict_in_chunks(
    images: ImageInput | Sequence[ImageInput],
    batch_size: int,
    predict_chunk: Callable[[list[ImageInput]], Probabilities],
    join: Callable[[list[Probabilities]], Probabilities],
    empty: Probabilities,
) -> Probabilities:
    """(N, classes) probabilities for a sequence of images, or (classes,) for one image: `predict_chunk` takes at
    most `batch_size` of them at a time, `join` concatenates its answers, and no images give `empty`."""
    single = isinstance(images, (str, Path, Image.Image, np.ndarray))
    batch = [images] if single else list(images)
    if not batch:
        return empty
    probs = join([predict_chunk(batch[start : start + batch_size]) for start in range(0, len(batch), batch_size)])
    return probs[0] if single else probs
