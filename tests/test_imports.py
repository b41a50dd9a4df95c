"""Importing the package leaves the user's session as it was."""

from __future__ import annotations

import subprocess
import sys


def test_importing_classifier_keeps_the_matplotlib_backend() -> None:
    code = (
        "import matplotlib; matplotlib.use('svg'); "
        "import classifier, classifier.evaluation.reports, classifier.training.lr_find; "
        "assert matplotlib.get_backend() == 'svg', matplotlib.get_backend()"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_the_entry_point_and_its_help_load_no_torch() -> None:
    """`classifier --help` reads the table of commands alone; `from classifier import OnnxPredictor` works where torch
    is not installed at all (importing it fails, as on a serving machine without it)."""
    code = (
        "import sys; sys.modules['torch'] = None; "  # as if not installed: importing it raises ModuleNotFoundError
        "from classifier import OnnxPredictor; print(OnnxPredictor.__module__); "
        "from classifier.cli.entry import main; sys.argv = ['classifier', '--help']; main()"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert lines[0] == "classifier.deploy.onnx_predictor"
    assert "  demo-data   write the bundled digits, photos or multi-label scenes" in lines


def test_the_public_names_import_from_the_package_root() -> None:
    from classifier import ClassifierNet, ImageClassifier, ImageFolderDataModule, OnnxPredictor, Predictor

    homes = {cls.__name__: cls.__module__ for cls in (ClassifierNet, ImageClassifier, ImageFolderDataModule)}
    homes |= {cls.__name__: cls.__module__ for cls in (OnnxPredictor, Predictor)}
    assert homes == {
        "ClassifierNet": "classifier.model.net",
        "ImageClassifier": "classifier.model.module",
        "ImageFolderDataModule": "classifier.data.datamodule",
        "OnnxPredictor": "classifier.deploy.onnx_predictor",
        "Predictor": "classifier.deploy.predictor",
    }
