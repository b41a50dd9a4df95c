"""Class probabilities, and the labels they decide, from an exported ONNX model with numpy, Pillow and onnxruntime
only: no torch.

`OnnxPredictor` decodes, resizes and crops as `classifier predict` does (`classifier.core.imageio`,
`classifier.deploy.preprocess`), so its probabilities are those of the checkpoint the model was exported from, and
it decides labels as that checkpoint does (the task, thresholds and rejection stored with the export; the graph's
`ood_score` output is the score the rejection compares, so no logits are needed).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from classifier.core.imageio import as_rgb_image
from classifier.deploy.inputs import MULTILABEL, Classifies, ImageInput, Scored, join_scored, predict_in_chunks
from classifier.deploy.preprocess import (
    METADATA_KEY,
    PREPROCESS_FILE,
    checked,
    read_preprocess,
    resize_and_crop,
    to_chw_uint8,
)

SCORE_OUTPUT = "ood_score"  # the graph's second output (`classifier.deploy.export`), (N,) scores; older exports lack it


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float32, for models exported with `--softmax false`."""
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return (shifted / shifted.sum(axis=-1, keepdims=True)).astype(np.float32)


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """Element-wise sigmoid in float32, for multi-label models exported with `--softmax false`."""
    return (0.5 * (1 + np.tanh(0.5 * logits.astype(np.float64)))).astype(np.float32)  # exp would overflow


def probabilities_from_logits(logits: np.ndarray, task: str | None) -> np.ndarray:
    """What the checkpoint's `net.probabilities` computes: one sigmoid per label (multi-label), else softmax."""
    return sigmoid(logits) if task == MULTILABEL else softmax(logits)


class OnnxPredictor(Classifies):
    """An exported model with the preprocessing it was exported with, on onnxruntime."""

    def __init__(
        self, path: str | Path, providers: list[str] | None = None, threads: int | None = None, batch_size: int = 64
    ) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"ONNX model {self.path} does not exist")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(
                str(self.path), options, providers=providers or ort.get_available_providers()
            )
        except Exception as error:  # noqa: BLE001 - onnxruntime raises its own types for bad files
            raise ValueError(f"{self.path} is not a readable ONNX model: {str(error).splitlines()[0][:300]}") from error
        self.preprocessing = self._read_preprocessing()
        self.batch_size = batch_size
        (self.input,) = self.session.get_inputs()
        if self.input.type != "tensor(uint8)" or len(self.input.shape) != 4:
            raise ValueError(f"{self.path} takes {self.input.type} {self.input.shape}, not uint8 NCHW images")
        batch = self.input.shape[0]
        self.fixed_batch = batch if isinstance(batch, int) else None  # exported with --dynamic_batch false
        outputs = [output.name for output in self.session.get_outputs()]
        self.outputs = [outputs[0], *([SCORE_OUTPUT] if SCORE_OUTPUT in outputs[1:] else [])]

    def _read_preprocessing(self) -> dict:
        """The model's own metadata, else a preprocess.json beside it."""
        stored = self.session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
        if stored is not None:
            return checked(json.loads(stored), f"{self.path}'s metadata")
        beside = self.path.parent / PREPROCESS_FILE
        if beside.is_file():
            return read_preprocess(beside)
        raise ValueError(
            f"{self.path} carries no classifier preprocessing (no {METADATA_KEY!r} metadata, no {PREPROCESS_FILE} "
            "beside it): export the checkpoint with `classifier export`"
        )

    @property
    def class_names(self) -> list[str]:
        return list(self.preprocessing["class_names"])

    @property
    def task(self) -> str:
        """The task stored at export: multiclass or multilabel; exports older than multi-label are multiclass."""
        return self.preprocessing.get("task") or "multiclass"

    @property
    def thresholds(self) -> np.ndarray | None:
        """Multi-label: each label's decision threshold, stored at export; None otherwise."""
        return np.array(self.preprocessing["thresholds"], dtype=np.float64) if self.task == MULTILABEL else None

    @property
    def rejection(self) -> dict | None:
        """{"score", "threshold", "keep"} stored at export, when the checkpoint was calibrated with a rejection and the
        graph has its score (an older export has neither, and cannot reject)."""
        return self.preprocessing.get("rejection") if SCORE_OUTPUT in self.outputs else None

    def preprocess(self, image: ImageInput) -> np.ndarray:
        """One image (a path, a PIL image or an HWC/HW uint8 array) as the uint8 CHW array the model takes."""
        return to_chw_uint8(resize_and_crop(as_rgb_image(image), self.preprocessing))

    def predict_batch(self, images: np.ndarray) -> np.ndarray:
        """float32 (N, classes) probabilities for a preprocessed uint8 NCHW batch."""
        return self.scored_batch(images)[0]

    def scored_batch(self, images: np.ndarray) -> Scored:
        """`predict_batch`'s probabilities and the graph's float32 (N,) scores (None from an export without them)."""
        step = self.fixed_batch or len(images)
        feeds = [{self.input.name: images[i : i + step]} for i in range(0, len(images), step)]
        runs = [self.session.run(self.outputs, feed) for feed in feeds]
        output = np.concatenate([run[0] for run in runs]).astype(np.float32)
        scores = np.concatenate([run[1] for run in runs]).astype(np.float32) if len(self.outputs) > 1 else None
        if self.preprocessing.get("output") == "logits":
            output = probabilities_from_logits(output, self.task)
        return output, scores

    def predict(self, images: ImageInput | Sequence[ImageInput]) -> np.ndarray:
        """(N, classes) probabilities for a sequence of images, or (classes,) for one image."""
        empty = np.zeros((0, len(self.class_names)), dtype=np.float32)
        return predict_in_chunks(images, self.batch_size, self._predict_chunk, np.concatenate, empty)

    def _predict_chunk(self, images: list[ImageInput]) -> np.ndarray:
        return self.predict_batch(np.stack([self.preprocess(image) for image in images]))

    def predict_scored(self, images: list[ImageInput]) -> Scored:
        """(N, C) probabilities and (N,) scores (None from an export without them) of a list of images."""
        empty = (np.zeros((0, len(self.class_names)), dtype=np.float32), np.zeros(0, dtype=np.float32))
        return predict_in_chunks(images, self.batch_size, self._scored_chunk, join_scored, empty)

    def _scored_chunk(self, images: list[ImageInput]) -> Scored:
        return self.scored_batch(np.stack([self.preprocess(image) for image in images]))
