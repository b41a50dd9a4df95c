"""Shared fixtures: real digit images on disk, and the runs that several test files read, each built once per pytest
run; one thread per test process when pytest-xdist runs several."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from filelock import FileLock

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
from classifier.data.scenes import write_scenes
from tests.helpers import digit_subset, run_dir, tiny_config, write_photos
from tests.helpers.faults import digits_config, last_of, read_sample_log, run


@pytest.fixture(scope="session", autouse=True)
def verification_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tests' own verification cache (and that of the `classifier` processes they start), not the user's."""
    folder = tmp_path_factory.mktemp("verification-cache")
    os.environ[CACHE_ENV] = str(folder)
    return folder


def built_once(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], object]) -> Path:
    """A folder that `build` fills once per pytest run. A session fixture is built once per xdist worker; this one is
    built by the first worker that asks, while the others wait for it (pytest-xdist's documented recipe). What it
    holds is read, never written: a test that writes beside it copies it first."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's folder, above each worker's own
    folder, done = root / f"shared-{name}", root / f"shared-{name}.done"
    with FileLock(f"{folder}.lock"):
        if not done.is_file():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            done.touch()
    return folder


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """All 1,797 scikit-learn digits as PNG class folders."""
    return built_once(tmp_path_factory, "digits", lambda folder: write_digits(folder / "digits")) / "digits"


@pytest.fixture(scope="session")
def small_digits(digits_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """20 digits per class: enough to train a tiny model for a couple of epochs in seconds."""
    folder = built_once(tmp_path_factory, "small", lambda folder: digit_subset(digits_dir, folder / "digits", 20))
    return folder / "digits"


@pytest.fixture(scope="session")
def few_digits(digits_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 digits of each of 0, 1 and 2: splits and folds of a few images, whose evaluation reports (their figures grow
    with the classes and with the mistakes they show) draw in a fraction of the time 10 classes take."""
    folder = built_once(tmp_path_factory, "few", lambda folder: digit_subset(digits_dir, folder / "digits", 8, "012"))
    return folder / "digits"


@pytest.fixture(scope="session")
def reference(digits_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list]:
    """An uninterrupted run's last.ckpt, and the rows each of its training batches saw."""

    def fit(folder: Path) -> None:
        code, stderr = run(["fit", "--config", str(digits_config(folder, digits_dir))], folder / "samples.log")
        assert code == 0, stderr

    folder = built_once(tmp_path_factory, "uninterrupted", fit)
    return last_of(folder), read_sample_log(folder / "samples.log")


@pytest.fixture(scope="session")
def trained_checkpoint(small_digits: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The one trained checkpoint of the tests that only read one: best.ckpt of one epoch of `test_resnet` at 32 px on
    the small digits, tested (its run's test/metrics.json beside it). A test that writes beside it copies it first."""

    def fit_and_test(folder: Path) -> None:
        cli_main(["fit", "--config", str(tiny_config(folder, small_digits, trainer={"max_epochs": 1}))])
        cli_main(["test", "--ckpt_path", str(run_dir(folder, 0) / "checkpoints" / "best.ckpt")])

    return run_dir(built_once(tmp_path_factory, "trained", fit_and_test), 0) / "checkpoints" / "best.ckpt"


@pytest.fixture(scope="session")
def multilabel_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The one multi-label run of the tests, fitted and exported in this process (test_multilabel_cli.py runs the
    commands it checks in processes of their own): 120 generated scenes (`scenes/`: images under opaque names,
    labels.csv and labels_onehot.csv), best.ckpt of 3 epochs of `test_resnet` at 32 px fitted on labels.csv
    (`--data.label_delimiter ";"`), and its ONNX export (`export/`, with parity.json). Read only: a test that
    evaluates it works on `own_run`'s copy."""

    def build(folder: Path) -> None:
        scenes = write_scenes(folder / "scenes", count=120, sizes=(40, 56))
        data = {"manifest": str(scenes / "labels.csv"), "label_delimiter": ";", "data_dir": None}
        config = tiny_config(folder, scenes, data=data, trainer={"max_epochs": 3})
        cli_main(["fit", "--config", str(config), "--model.optimizer.lr", "0.01"])
        best = run_dir(folder, 0) / "checkpoints" / "best.ckpt"
        cli_main(["export", "--ckpt_path", str(best), "--output", str(folder / "export")])

    return built_once(tmp_path_factory, "multilabel", build)


@pytest.fixture(scope="session")
def unknown_run(digits_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The one digits model that says "unknown": best.ckpt of 5 epochs of `test_resnet` at 32 px on all the digits,
    calibrated (temperature and energy threshold) by `classifier calibrate` (`best-calibrated.ckpt` and `.json`),
    its ONNX export (`export/`, parity checked on 60 test digits), and a folder `mixed/` of 10 digits and 12
    photo-like shapes (`shape_*`), the unknowns. Read only."""

    def build(folder: Path) -> None:
        config = tiny_config(folder, digits_dir, trainer={"max_epochs": 5}, data={"batch_size": 64})
        cli_main(["fit", "--config", str(config), "--model.optimizer.lr", "0.01"])
        best = run_dir(folder, 0) / "checkpoints" / "best.ckpt"
        cli_main(["calibrate", "--ckpt_path", str(best), "--data.num_workers", "0"])
        calibrated = best.with_name("best-calibrated.ckpt")
        cli_main(["export", "--ckpt_path", str(calibrated), "--output", str(folder / "export"), "--check_images", "60"])
        mixed = folder / "mixed"
        mixed.mkdir()
        for digit in range(10):
            shutil.copy(sorted((digits_dir / str(digit)).iterdir())[-1], mixed / f"digit_{digit}.png")
        for path in write_photos(folder / "shapes", per_class=4, seed=3, sizes=(40, 90)).rglob("*.*"):
            shutil.copy(path, mixed / f"shape_{path.name}")

    return built_once(tmp_path_factory, "unknown", build)
