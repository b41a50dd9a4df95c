"""Shared fixtures: real digit images on disk; one thread per test process when pytest-xdist runs several."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Lightning before scikit-learn's datasets (which `classifier.data.digits` imports): typing caches unions by equality,
# so once sklearn.datasets has built `Optional[Union[float, int]]`, Lightning's `Optional[Union[int, float]]` for
# `limit_*_batches` comes back as that object, jsonargparse tries float first, and `--trainer.limit_test_batches 1`
# (one batch) parses as 1.0 (every batch). The `classifier` command imports Lightning first; so do the tests.
import classifier.cli.base  # noqa: F401

if os.environ.get("PYTEST_XDIST_WORKER"):  # the workers share the cores: oversubscribed threads only thrash
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # the `classifier` processes the tests start, too
    torch.set_num_threads(1)

from classifier.cli.entry import cli_main
from classifier.data.digits import write_digits
from classifier.data.file_facts import CACHE_ENV
from tests.helpers import digit_subset, run_dir, tiny_config
from tests.helpers.faults import digits_config, last_of, read_sample_log, run


@pytest.fixture(scope="session", autouse=True)
def verification_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tests' own verification cache (and that of the `classifier` processes they start), not the user's."""
    folder = tmp_path_factory.mktemp("verification-cache")
    os.environ[CACHE_ENV] = str(folder)
    return folder


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """All 1,797 scikit-learn digits as PNG class folders."""
    return write_digits(tmp_path_factory.mktemp("digits") / "digits")


@pytest.fixture(scope="session")
def small_digits(digits_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """20 digits per class: enough to train a tiny model for a couple of epochs in seconds."""
    return digit_subset(digits_dir, tmp_path_factory.mktemp("small") / "digits", per_class=20)


@pytest.fixture(scope="session")
def few_digits(digits_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 digits of each of 0, 1 and 2: splits and folds of a few images, whose evaluation reports (their figures grow
    with the classes and with the mistakes they show) draw in a fraction of the time 10 classes take."""
    return digit_subset(digits_dir, tmp_path_factory.mktemp("few") / "digits", per_class=8, digits="012")


@pytest.fixture(scope="session")
def reference(digits_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list]:
    """An uninterrupted run's last.ckpt, and the rows each of its training batches saw."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    log = folder / "samples.log"
    code, stderr = run(["fit", "--config", str(digits_config(folder, digits_dir))], log)
    assert code == 0, stderr
    return last_of(folder), read_sample_log(log)


@pytest.fixture(scope="session")
def trained_checkpoint(small_digits: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The one trained checkpoint of the tests that only read one: best.ckpt of one epoch of `test_resnet` at 32 px on
    the small digits, tested (its run's test/metrics.json beside it). A test that writes beside it copies it first."""
    root = tmp_path_factory.mktemp("trained")
    cli_main(["fit", "--config", str(tiny_config(root, small_digits, trainer={"max_epochs": 1}))])
    checkpoint = run_dir(root, 0) / "checkpoints" / "best.ckpt"
    cli_main(["test", "--ckpt_path", str(checkpoint)])
    return checkpoint
