"""The model behind the server: a checkpoint through PyTorch, or an `.onnx` file through ONNX Runtime (which never
imports torch). Both take decoded images and uint8 NCHW batches as numpy arrays, and give the probabilities (and,
for a model that rejects, each image's OOD score) as numpy arrays."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from classifier.deploy.preprocess import PARITY_FILE, file_sha256


class Backend(Protocol):
    name: str
    path: Path
    class_names: list[str]
    preprocessing: dict
    test_metrics: dict | None
    task: str  # "multiclass" or "multilabel"
    thresholds: np.ndarray | None  # a multi-label model's, one per class
    rejection: dict | None  # {"score", "threshold", "keep"}: below it an image is unknown; None: never

    def preprocess(self, image: Image.Image) -> np.ndarray: ...

    def predict_batch(self, images: np.ndarray) -> np.ndarray: ...

    def scored_batch(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


class CheckpointBackend:
    """A `classifier fit` checkpoint, through `classifier.deploy.predictor.Predictor` on the CPU."""

    name = "pytorch"

    def __init__(self, path: Path, reject: bool = True) -> None:
        import torch

        from classifier.deploy.predictor import Predictor
        from classifier.deploy.run_metrics import run_test_metrics

        self._torch = torch
        self.path = path
        self.predictor = Predictor.from_checkpoint(path)
        self.class_names = self.predictor.class_names
        self.preprocessing = self.predictor.preprocessing
        self.test_metrics = run_test_metrics(path)
        self.task, self.thresholds = self.predictor.task, self.predictor.thresholds
        self.rejection = self.predictor.rejection if reject else None

    def preprocess(self, image: Image.Image) -> np.ndarray:
        return self.predictor.preprocess(image).numpy()

    def predict_batch(self, images: np.ndarray) -> np.ndarray:
        return self.predictor.predict_batch(self._torch.from_numpy(images)).numpy()

    def scored_batch(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        probabilities, scores = self.predictor.scored_batch(self._torch.from_numpy(images))
        return probabilities.numpy(), scores.numpy()


class OnnxBackend:
    """An exported `.onnx` file with the preprocessing stored in it, through ONNX Runtime: torch is never imported."""

    name = "onnxruntime"

    def __init__(self, path: Path, reject: bool = True) -> None:
        from classifier.deploy.onnx_predictor import OnnxPredictor

        self.path = path
        self.predictor = OnnxPredictor(path)
        self.class_names = self.predictor.class_names
        self.preprocessing = self.predictor.preprocessing
        self.test_metrics = self.preprocessing.get("test_metrics")
        self.task, self.thresholds = self.predictor.task, self.predictor.thresholds
        self.rejection = self.predictor.rejection if reject else None  # None from an export older than the score

    def preprocess(self, image: Image.Image) -> np.ndarray:
        return self.predictor.preprocess(image)

    def predict_batch(self, images: np.ndarray) -> np.ndarray:
        return self.predictor.predict_batch(images)

    def scored_batch(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.predictor.scored_batch(images)


def load_backend(path: str | Path, allow_failed_parity: bool = False, reject: bool = True) -> Backend:
    """The backend for a model file: ONNX Runtime for `.onnx`, PyTorch for anything else (a checkpoint). An export
    whose parity.json says it failed its check is refused, unless `allow_failed_parity`. Without `reject`, the
    model's rejection is ignored: every image gets its classes."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--model {path} does not exist")
    if path.suffix.lower() != ".onnx":
        return CheckpointBackend(path, reject)
    report = path.with_name(PARITY_FILE)
    parity = json.loads(report.read_text()) if report.is_file() and not allow_failed_parity else {}
    if parity.get("passed") is False:
        raise ValueError(
            f"--model {path} failed its parity check ({parity.get('failure', 'see the report')}; {report}): "
            "re-export it, or pass --allow_failed_parity to serve it anyway"
        )
    return OnnxBackend(path, reject)


def describe(backend: Backend) -> dict[str, Any]:
    """What `/info` says about the model: with its task, a multi-label model's threshold of each label, and the
    rejection it applies (None: it never answers unknown)."""
    thresholds = backend.thresholds
    return {
        "backend": backend.name,
        "model": backend.path.name,
        "model_sha256": file_sha256(backend.path),
        "class_names": backend.class_names,
        "task": backend.task,
        "thresholds": None if thresholds is None else dict(zip(backend.class_names, thresholds.tolist(), strict=True)),
        "rejection": backend.rejection,
        "preprocessing": backend.preprocessing,
        "test_metrics": backend.test_metrics,
    }
