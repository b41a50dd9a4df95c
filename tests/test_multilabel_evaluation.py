"""Multi-label evaluation: predictions.csv's label sets, the report's scores against scikit-learn's, and `calibrate`
fitting its temperature on binary cross-entropy, all on one tiny model fitted on generated scenes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.optimize import minimize_scalar
from scipy.special import expit, logit
from sklearn import metrics as sk

from classifier.data.scenes import LABELS
from classifier.deploy.predictor import Predictor
from tests.helpers import classifier_here, read_csv, run_dir

CLASSES = sorted(LABELS)
PICTURES = ("pr_curves.png", "label_cooccurrence.png", "top_losses.png")


def ok(*args: str) -> None:
    """`classifier ARGS`, which must succeed."""
    done = classifier_here(*args)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def fitted(multilabel_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """best.ckpt of a copy of the shared multi-label run (tests/conftest.py), tested (into its run folder's test/)."""
    root = Path(shutil.copytree(multilabel_run, tmp_path_factory.mktemp("multilabel") / "run"))
    checkpoint = run_dir(root, 0) / "checkpoints" / "best.ckpt"
    ok("test", "--ckpt_path", str(checkpoint))
    return checkpoint


def thresholds_of(checkpoint: Path) -> np.ndarray:
    return torch.load(checkpoint, weights_only=True)["state_dict"]["net.thresholds"].numpy()


def probabilities(rows: list[dict[str, str]]) -> np.ndarray:
    return np.array([[float(row[f"prob_{name}"]) for name in CLASSES] for row in rows])


def matrix(label_sets: list[str]) -> np.ndarray:
    """`;`-joined label sets as a 0/1 matrix, columns in class order."""
    return np.array([[int(name in text.split(";")) for name in CLASSES] for text in label_sets])


def thresholded(rows: list[dict[str, str]], thresholds: np.ndarray) -> list[str]:
    """Each row's labels: those whose float32 probability is at or over the label's threshold."""
    kept = probabilities(rows).astype(np.float32) >= thresholds
    return [";".join(name for name, on in zip(CLASSES, row, strict=True) if on) for row in kept]


def assert_thresholded(rows: list[dict[str, str]], thresholds: np.ndarray) -> None:
    """Each row's labels are `thresholded`'s, but for a probability within the CSV's 7 digits of its threshold."""
    clear = np.abs(probabilities(rows) - thresholds) > 1e-6
    np.testing.assert_array_equal(
        matrix([row["labels"] for row in rows])[clear], matrix(thresholded(rows, thresholds))[clear]
    )


@pytest.fixture(scope="module")
def predicted(fitted: Path) -> list[dict[str, str]]:
    """`predict` on every scene, its predictions.csv's rows."""
    output = fitted.parents[1] / "predict.csv"
    scenes = fitted.parents[4] / "scenes"
    ok("predict", "--ckpt_path", str(fitted), "--data.predict_dir", str(scenes / "images"),
       "--predictions.output", str(output), "--predictions.topk", "2")  # fmt: skip
    return read_csv(output)


def test_labels_are_those_at_their_thresholds(fitted: Path, predicted: list[dict[str, str]]) -> None:
    rows = read_csv(fitted.parents[1] / "test" / "predictions.csv")
    drawn = {Path(row["path"]).name: row["label"] for row in read_csv(fitted.parents[4] / "scenes" / "labels.csv")}
    thresholds = thresholds_of(fitted)
    assert list(rows[0]) == ["path", "target", "labels", *(f"prob_{name}" for name in CLASSES)]
    assert [row["target"] for row in rows] == [drawn[Path(row["path"]).name] for row in rows]
    assert_thresholded(rows, thresholds)
    assert list(predicted[0]) == ["path", "labels", "status", "top1", "top2", *(f"prob_{name}" for name in CLASSES)]
    assert len(predicted) == 120 and {row["status"] for row in predicted} == {"ok"}
    assert_thresholded(predicted, thresholds)
    assert len({row["labels"] for row in predicted}) > 1, "every scene got the same labels: nothing is tested"
    assert any(row["labels"] != thresholded([row], np.full(4, 0.5))[0] for row in predicted), "thresholds all 0.5?"


def test_report_matches_scikit_learn(fitted: Path) -> None:
    folder = fitted.parents[1] / "test"
    rows = read_csv(folder / "predictions.csv")
    probs, targets = probabilities(rows).astype(np.float32), matrix([row["target"] for row in rows])
    thresholds = thresholds_of(fitted)
    decided = (probs >= thresholds).astype(int)
    expected = {
        "map": sk.average_precision_score(targets, probs, average="macro"),
        "f1_micro": sk.f1_score(targets, decided, average="micro", zero_division=0),
        "f1_macro": sk.f1_score(targets, decided, average="macro", zero_division=0),
        "precision": sk.precision_score(targets, decided, average="macro", zero_division=0),
        "recall": sk.recall_score(targets, decided, average="macro", zero_division=0),
        "subset_acc": sk.accuracy_score(targets, decided),
        "hamming": sk.hamming_loss(targets, decided),
    }
    report = json.loads((folder / "multilabel_report.json").read_text())
    logged = json.loads((folder / "metrics.json").read_text())
    for name, value in expected.items():
        assert report[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
        assert logged[f"test/{name}"] == pytest.approx(value, abs=1e-5), name
    assert 0 < expected["f1_macro"] < 1 and 0 < expected["hamming"] < 1
    per_class = sk.average_precision_score(targets, probs, average=None)
    assert report["average_precision"] == pytest.approx(dict(zip(CLASSES, per_class, strict=True)), rel=1e-5)
    assert report["cooccurrence"] == (targets.T @ targets).tolist()
    assert report["thresholds"] == pytest.approx(dict(zip(CLASSES, thresholds.tolist(), strict=True)), rel=1e-5)
    table = read_csv(folder / "classification_report.csv")
    p, r, f, n = sk.precision_recall_fscore_support(targets, decided, zero_division=0)
    assert [row["class"] for row in table] == [*CLASSES, "micro avg", "macro avg"]
    for i, row in enumerate(table[: len(CLASSES)]):
        assert float(row["threshold"]) == pytest.approx(thresholds[i], abs=1e-6)
        assert [float(row[k]) for k in ("precision", "recall", "f1")] == pytest.approx([p[i], r[i], f[i]], abs=1e-6)
        assert (int(row["support"]), int(row["predicted"])) == (n[i], decided[:, i].sum())
    for name in PICTURES:
        assert (folder / name).stat().st_size > 10_000, name
    assert not (folder / "confusion_matrix.csv").exists()


def bce(logits: np.ndarray, targets: np.ndarray) -> float:
    probs = expit(logits)
    return float(-(targets * np.log(probs) + (1 - targets) * np.log1p(-probs)).mean())


def test_calibrate_fits_the_temperature_on_binary_cross_entropy(fitted: Path, predicted: list[dict[str, str]]) -> None:
    scenes = fitted.parents[4] / "scenes"
    held_out = [row for row in read_csv(fitted.parents[1] / "splits.csv") if row["split"] == "val"]
    probs = Predictor.from_checkpoint(fitted, tta="none").predict([scenes / row["path"] for row in held_out])
    logits, targets = logit(probs.double().numpy()), matrix([row["label"] for row in held_out])
    ok("calibrate", "--ckpt_path", str(fitted), "--data.num_workers", "0")
    calibrated = fitted.with_name("best-calibrated.ckpt")
    temperature = torch.load(calibrated, weights_only=True)["net"]["temperature"]
    best = minimize_scalar(lambda log_t: bce(logits / np.exp(log_t), targets), bounds=(-5, 5), method="bounded")
    assert temperature == pytest.approx(np.exp(best.x), rel=1e-3)
    report = json.loads(fitted.with_name("best-calibrated.json").read_text())
    before, after = bce(logits, targets), bce(logits / temperature, targets)
    assert after < before - 1e-4
    assert report["val"]["before"]["bce"] == pytest.approx(before, abs=1e-5)
    assert report["val"]["after"]["bce"] == pytest.approx(after, abs=1e-5)
    assert report["val"]["images"] == len(held_out) and set(report["val"]["after"]) == {"bce", "ece", "brier"}
    # the thresholds move with the temperature: every scene keeps the labels `predict` gave it before
    tempered = Predictor.from_checkpoint(calibrated).predict([Path(row["path"]) for row in predicted]).numpy()
    kept = tempered >= thresholds_of(calibrated)
    assert [";".join(np.array(CLASSES)[row]) for row in kept] == [row["labels"] for row in predicted]
    assert tempered != pytest.approx(probabilities(predicted), abs=1e-3)
