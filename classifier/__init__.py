"""Train, evaluate and ship image classifiers on folders of images, with Lightning and timm.

The names below are imported on first use, so that the torch-free parts (`classifier.runtime`, ONNX serving)
can be imported without loading torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ClassifierNet": "classifier.net",
    "ImageClassifier": "classifier.module",
    "ImageFolderDataModule": "classifier.data",
    "Predictor": "classifier.predictor",
    "cli_main": "classifier.cli",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'classifier' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
