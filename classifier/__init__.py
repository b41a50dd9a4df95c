"""Train, evaluate and ship image classifiers on folders of images, with Lightning and timm.

The names below are imported on first use, so that the torch-free parts (`OnnxPredictor`, ONNX serving) can be
imported without loading torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from classifier.core.moved import install

_EXPORTS = {
    "ClassifierNet": "classifier.model.net",
    "ImageClassifier": "classifier.model.module",
    "ImageFolderDataModule": "classifier.data.datamodule",
    "Predictor": "classifier.deploy.predictor",
    "OnnxPredictor": "classifier.deploy.onnx_predictor",
    "cli_main": "classifier.cli.entry",
}

__all__ = sorted(_EXPORTS)

install()  # the module paths of 0.1 (`classifier.tracking.MLFlowLogger` in a config) still import


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'classifier' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
