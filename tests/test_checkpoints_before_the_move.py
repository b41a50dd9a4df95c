"""A checkpoint written before the layered package (by 0.1's flat modules, commit b390005) tests, predicts the same
probabilities and exports after the move; configs that name the old module paths still parse."""

from __future__ import annotations

import json
import shutil
from importlib import import_module
from pathlib import Path

import numpy as np
import pytest
import yaml

from classifier import Predictor
from classifier.cli.entry import cli_main
from classifier.training import callbacks, tracking
from tests.helpers import REPO

FIXTURE = REPO / "tests" / "fixtures" / "before_move"


@pytest.fixture
def legacy(tmp_path: Path) -> Path:
    """The fixture's checkpoint and its 30 digits, copied where a run may write beside them."""
    shutil.copytree(FIXTURE, tmp_path / "before_move")
    return tmp_path / "before_move"


def test_the_old_checkpoint_predicts_the_probabilities_it_predicted_before(legacy: Path) -> None:
    recorded = json.loads((legacy / "probabilities.json").read_text())
    paths = [legacy / "digits" / relative for relative in recorded["paths"]]
    probabilities = Predictor.from_checkpoint(legacy / "before_move.ckpt").predict(paths)
    np.testing.assert_allclose(probabilities.numpy(), np.array(recorded["probabilities"]), atol=1e-6)


def test_the_old_checkpoint_tests_to_the_metrics_it_had(legacy: Path, tmp_path: Path) -> None:
    logs = ["--trainer.logger.save_dir", str(tmp_path / "logs"), "--trainer.logger.name", "legacy"]
    cli_main(["test", "--ckpt_path", str(legacy / "before_move.ckpt"), "--data.data_dir", str(legacy / "digits"),
              "--trainer.logger", "lightning.pytorch.loggers.TensorBoardLogger", *logs])  # fmt: skip
    (metrics_file,) = (tmp_path / "logs").rglob("metrics.json")
    metrics = json.loads(metrics_file.read_text())
    expected = json.loads((legacy / "test_metrics.json").read_text())
    assert metrics == pytest.approx(expected, abs=1e-5)


@pytest.mark.slow
def test_the_old_checkpoint_exports_with_parity(legacy: Path, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    out = tmp_path / "export"
    cli_main(["export", "--ckpt_path", str(legacy / "before_move.ckpt"), "--output", str(out),
              "--data_dir", str(legacy / "digits")])  # fmt: skip
    parity = json.loads((out / "parity.json").read_text())
    assert (out / "model.onnx").is_file() and parity


def test_a_config_naming_an_old_module_path_still_parses(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`class_path: classifier.tracking.MLFlowLogger` (0.1's path, in users' configs and config.yaml files)."""
    config = {
        "trainer": {
            "logger": [
                {"class_path": "lightning.pytorch.loggers.TensorBoardLogger"},
                {"class_path": "classifier.tracking.MLFlowLogger"},
            ],  # fmt: skip
            "callbacks": [{"class_path": "classifier.callbacks.EarlyStopping", "init_args": {"monitor": "x"}}],
        },
        "model": {"backbone": "test_resnet"},
    }
    (tmp_path / "old.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit) as exit_:
        cli_main(["fit", "--config", str(tmp_path / "old.yaml"), "--print_config"])
    assert exit_.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    logger, callback = printed["trainer"]["logger"][1]["class_path"], printed["trainer"]["callbacks"][0]["class_path"]
    assert import_module(logger.rpartition(".")[0]) is tracking and logger.endswith(".MLFlowLogger")
    assert import_module(callback.rpartition(".")[0]) is callbacks and callback.endswith(".EarlyStopping")
