"""Shared fixtures: real digit images on disk."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from classifier.digits import write_digits


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """All 1,797 scikit-learn digits as PNG class folders."""
    return write_digits(tmp_path_factory.mktemp("digits") / "digits")


@pytest.fixture(scope="session")
def small_digits(digits_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """20 digits per class: enough to train a tiny model for a couple of epochs in seconds."""
    root = tmp_path_factory.mktemp("small") / "digits"
    for class_dir in sorted(digits_dir.iterdir()):
        (root / class_dir.name).mkdir(parents=True)
        for image in sorted(class_dir.iterdir())[:20]:
            shutil.copy(image, root / class_dir.name / image.name)
    return root
