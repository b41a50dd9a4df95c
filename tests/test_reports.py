"""Evaluation outputs, checked against scikit-learn recomputing everything from predictions.csv."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from lightning.pytorch import Callback
from PIL import Image
from sklearn import metrics as sk
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torchvision.transforms import InterpolationMode

from classifier import ImageClassifier, ImageFolderDataModule, cli_main
from classifier.data.images import load_rgb
from classifier.evaluation.reports import (
    calibration_bins,
    confusion_matrix_figure,
    reliability_figure,
    top_losses_figure,
)
from tests.helpers import read_csv, rounded_for_people, run_dir, save_image, tiny_config

CLASSES = [str(d) for d in range(10)]
PICTURES = ("confusion_matrix.png", "confusion_matrix_normalized.png", "reliability_diagram.png", "top_losses.png")


def probabilities(rows: list[dict[str, str]]) -> np.ndarray:
    return np.array([[float(row[f"prob_{name}"]) for name in CLASSES] for row in rows])


@pytest.fixture(scope="module")
def evaluated(digits_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model fitted 3 epochs on all digits, then tested from its checkpoint: a mix of right and wrong."""
    tmp_path = tmp_path_factory.mktemp("evaluated")
    config = tiny_config(tmp_path, digits_dir, trainer={"max_epochs": 3}, data={"batch_size": 64})
    cli_main(["fit", "--config", str(config)])
    cli_main(["test", "--ckpt_path", str(run_dir(tmp_path, 0) / "checkpoints" / "best.ckpt")])
    return tmp_path


def evaluation_dir(evaluated: Path) -> Path:
    """Where `test --ckpt_path .../version_0/checkpoints/best.ckpt` files its results."""
    return run_dir(evaluated, 0) / "test"


def elsewhere(tmp_path: Path) -> list[str]:
    """A logger of its own, so that an evaluation with other options leaves the fixture's test/ folder as it is."""
    return ["--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", str(tmp_path)]


def test_predictions_csv_is_self_consistent(evaluated: Path) -> None:
    rows = read_csv(evaluation_dir(evaluated) / "predictions.csv")
    assert list(rows[0])[:4] == ["path", "target", "prediction", "confidence"]
    assert list(rows[0])[4:] == [f"prob_{name}" for name in CLASSES]
    probs = probabilities(rows)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert [row["prediction"] for row in rows] == [CLASSES[i] for i in probs.argmax(axis=1)]
    np.testing.assert_allclose([float(row["confidence"]) for row in rows], probs.max(axis=1), atol=1e-7)


def test_metrics_json_equals_scikit_learn_on_predictions_csv(evaluated: Path) -> None:
    rows = read_csv(evaluation_dir(evaluated) / "predictions.csv")
    probs = probabilities(rows)
    y_true = np.array([CLASSES.index(row["target"]) for row in rows])
    y_pred = probs.argmax(axis=1)
    assert 0.2 < (y_true == y_pred).mean() < 1.0  # the oracle sees both hits and misses
    labels = list(range(10))
    expected = {
        "test/acc": sk.accuracy_score(y_true, y_pred),
        "test/balanced_acc": sk.balanced_accuracy_score(y_true, y_pred),
        "test/f1_macro": sk.f1_score(y_true, y_pred, average="macro", labels=labels, zero_division=0),
        "test/f1_weighted": sk.f1_score(y_true, y_pred, average="weighted", labels=labels, zero_division=0),
        "test/top5_acc": sk.top_k_accuracy_score(y_true, probs, k=5, labels=labels),
        "test/loss": sk.log_loss(y_true, probs, labels=labels),
        "test/ece": expected_calibration_error(y_true, probs),
    }
    metrics = json.loads((evaluation_dir(evaluated) / "metrics.json").read_text())
    assert set(metrics) == set(expected) and rounded_for_people(metrics)
    for name, value in expected.items():
        assert metrics[name] == pytest.approx(value, abs=1e-4), name


def expected_calibration_error(y_true: np.ndarray, probs: np.ndarray, bins: int = 15) -> float:
    """ECE written out from its definition: |accuracy - confidence| per equal-width bin, weighted by share."""
    confidence, correct = probs.max(axis=1), probs.argmax(axis=1) == y_true
    edges = np.linspace(0, 1, bins + 1)
    total = 0.0
    for low, high in zip(edges[:-1], edges[1:], strict=True):
        in_bin = (confidence > low) & (confidence <= high)
        if in_bin.any():
            total += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return total


def test_classification_report_and_confusion_matrix_equal_scikit_learn(evaluated: Path) -> None:
    rows = read_csv(evaluation_dir(evaluated) / "predictions.csv")
    y_true = [row["target"] for row in rows]
    y_pred = [row["prediction"] for row in rows]
    expected = sk.classification_report(y_true, y_pred, labels=CLASSES, output_dict=True, zero_division=0)
    report = read_csv(evaluation_dir(evaluated) / "classification_report.csv")
    assert [row["class"] for row in report] == [*CLASSES, "macro avg", "weighted avg"]
    for row in report:
        for column, key in (("precision", "precision"), ("recall", "recall"), ("f1", "f1-score")):
            assert float(row[column]) == pytest.approx(expected[row["class"]][key], abs=1e-6), (row, column)
        assert int(row["support"]) == expected[row["class"]]["support"]
    with open(evaluation_dir(evaluated) / "confusion_matrix.csv", newline="") as file:
        table = list(csv.reader(file))
    assert table[0][1:] == CLASSES and [line[0] for line in table[1:]] == CLASSES
    matrix = np.array([[int(cell) for cell in line[1:]] for line in table[1:]])
    np.testing.assert_array_equal(matrix, sk.confusion_matrix(y_true, y_pred, labels=CLASSES))


def test_pictures_open_at_a_sensible_size(evaluated: Path) -> None:
    for name in PICTURES:
        with Image.open(evaluation_dir(evaluated) / name) as image:
            assert 300 <= min(image.size) and max(image.size) <= 6000, (name, image.size)
    with Image.open(run_dir(evaluated, 0) / "training_curves.png") as image:
        assert image.size[0] > 800


def test_fit_logs_confusion_image_and_per_class_f1_and_writes_summary(evaluated: Path) -> None:
    (events,) = run_dir(evaluated, 0).glob("events.out.tfevents.*")
    tags = EventAccumulator(str(events), size_guidance={"images": 0}).Reload().Tags()
    assert "val/confusion_matrix" in tags["images"]
    assert {f"val/f1/{name}" for name in CLASSES} <= set(tags["scalars"])
    summary = json.loads((run_dir(evaluated, 0) / "summary.json").read_text())
    assert summary["epochs"] == 3 and summary["parameters"] == 373658 and rounded_for_people(summary)
    assert len(summary["epoch_train_images_per_s"]) == 3  # their values: test_throughput_counts_training_time_only
    assert Path(summary["best_checkpoint"]) == run_dir(evaluated, 0) / "checkpoints" / "best.ckpt"
    val_f1 = EventAccumulator(str(events)).Reload().Scalars("val/f1_macro")
    best = max(val_f1, key=lambda event: event.value)
    assert summary["best_value"] == pytest.approx(best.value) and summary["monitor"] == "val/f1_macro"
    assert summary["best_epoch"] == [event.value for event in val_f1].index(best.value)


def test_predict_probabilities_equal_test_probabilities(evaluated: Path, tmp_path: Path) -> None:
    tested = {row["path"]: row for row in read_csv(evaluation_dir(evaluated) / "predictions.csv")}
    listing = tmp_path / "images.txt"
    listing.write_text("# the test split, listed\n" + "\n".join(tested) + "\n")
    output = tmp_path / "predicted.csv"
    best = run_dir(evaluated, 0) / "checkpoints" / "best.ckpt"
    cli_main(["predict", "--ckpt_path", str(best), "--data.predict_dir", str(listing), "--predictions.output",
              str(output)])  # fmt: skip
    predicted = read_csv(output)
    assert len(predicted) == len(tested) and {row["status"] for row in predicted} == {"ok"}
    for row in predicted:
        np.testing.assert_allclose(probabilities([row]), probabilities([tested[row["path"]]]), atol=1e-6)


def test_tta_changes_probabilities_and_keeps_them_normalised(evaluated: Path, tmp_path: Path) -> None:
    best = run_dir(evaluated, 0) / "checkpoints" / "best.ckpt"
    plain = probabilities(read_csv(evaluation_dir(evaluated) / "predictions.csv"))
    for tta in ("flip", "flip_crops"):
        cli_main(["test", "--ckpt_path", str(best), "--model.tta", tta, *elsewhere(tmp_path / tta)])
        newest = tmp_path / tta / "lightning_logs" / "version_0"
        rows = read_csv(newest / "predictions.csv")
        augmented = probabilities(rows)
        np.testing.assert_allclose(augmented.sum(axis=1), 1.0, atol=1e-5)
        assert np.abs(augmented - plain).max() > 1e-3, tta
        metrics = json.loads((newest / "metrics.json").read_text())
        accuracy = np.mean([row["target"] == row["prediction"] for row in rows])
        assert metrics["test/acc"] == pytest.approx(accuracy, abs=1e-6)


def test_unreadable_file_in_predict_gets_one_error_row(evaluated: Path, tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    for i in range(3):
        save_image(photos / f"good{i}.png", Image.new("L", (8, 8), 40 * i))
    (photos / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    best = run_dir(evaluated, 0) / "checkpoints" / "best.ckpt"
    output = tmp_path / "out.csv"
    cli_main(["predict", "--ckpt_path", str(best), "--data.predict_dir", str(photos), "--predictions.output",
              str(output), "--predictions.topk", "3"])  # fmt: skip
    rows = read_csv(output)
    assert len(rows) == 4
    errors = [row for row in rows if row["status"] != "ok"]
    assert len(errors) == 1 and errors[0]["path"] == str(photos / "broken.png")
    assert errors[0]["status"].startswith("error: ") and errors[0]["prediction"] == ""
    for row in rows:
        if row["status"] == "ok":
            assert row["top1"] == row["prediction"] and len({row["top1"], row["top2"], row["top3"]}) == 3


def test_predict_takes_a_single_file(evaluated: Path, tmp_path: Path, capsys) -> None:
    image = save_image(tmp_path / "one.png", Image.new("L", (8, 8), 255))
    best = run_dir(evaluated, 0) / "checkpoints" / "best.ckpt"
    output = tmp_path / "out.csv"
    cli_main(["predict", "--ckpt_path", str(best), "--data.predict_dir", str(image), "--predictions.output",
              str(output), "--predictions.topk", "2"])  # fmt: skip
    (row,) = read_csv(output)
    assert row["path"] == str(image) and row["prediction"] in CLASSES
    printed = capsys.readouterr().out
    assert "one.png" in printed and f"{row['top1']} (" in printed


CLOCK = {"now": 0.0}


class Clock(Callback):
    """Drives a fake clock: half a second per training batch, ten per validation batch, no time otherwise."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        CLOCK["now"] += 0.5

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        CLOCK["now"] += 10.0


def test_throughput_counts_training_time_only(small_digits: Path, tmp_path: Path, monkeypatch) -> None:
    CLOCK["now"] = 0.0
    monkeypatch.setattr("classifier.training.callbacks.time", SimpleNamespace(perf_counter=lambda: CLOCK["now"]))
    trainer = {"max_epochs": 2, "callbacks": [{"class_path": "tests.test_reports.Clock"}]}
    cli_main(["fit", "--config", str(tiny_config(tmp_path, small_digits, trainer=trainer))])
    summary = json.loads((run_dir(tmp_path, 0) / "summary.json").read_text())
    # 140 training images: 4 full batches of 32 an epoch, 2 s; 30 validation images: one batch, 10 s, each epoch
    # and in the sanity check before training
    assert summary["wall_time_s"] == 2 * (2.0 + 10.0) + 10.0
    assert summary["epoch_train_images_per_s"] == [64.0, 64.0] and summary["steady_train_images_per_s"] == 64.0
    assert summary["train_images_per_s"] == 64.0


def test_figures_draw_the_numbers_they_are_given(tmp_path: Path) -> None:
    matrix = np.array([[5, 1, 0], [2, 2, 0], [0, 0, 0]])
    classes = ["cat", "dog", "owl"]
    axes = confusion_matrix_figure(matrix, classes, normalize=True).axes[0]
    np.testing.assert_allclose(axes.images[0].get_array(), [[5 / 6, 1 / 6, 0], [0.5, 0.5, 0], [0, 0, 0]])
    assert sorted(text.get_text() for text in axes.texts) == ["0.17", "0.50", "0.50", "0.83"]
    assert [label.get_text() for label in axes.get_xticklabels()] == classes
    axes = confusion_matrix_figure(matrix, classes, normalize=False).axes[0]
    assert sorted(text.get_text() for text in axes.texts) == ["1", "2", "2", "5"]

    # confidences 0.95 (right, right, wrong) and 0.55 (right, wrong): bins 14 and 8 of 15
    probs = np.array([[0.95, 0.05], [0.95, 0.05], [0.95, 0.05], [0.55, 0.45], [0.55, 0.45]])
    targets = np.array([0, 0, 1, 0, 1])
    axes = reliability_figure(calibration_bins(targets, probs), ece=0.1).axes[0]
    accuracy = [bar.get_height() for bar in axes.patches[:15]]
    np.testing.assert_allclose(accuracy, [0.0] * 8 + [0.5] + [0.0] * 5 + [2 / 3])

    paths = [save_image(tmp_path / f"{i}.png", Image.new("L", (8, 8), 50 * i)) for i in range(4)]
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    figure = top_losses_figure(paths, np.array([1, 0, 1, 1]), probs, ["a", "b"])
    titles = [axes.get_title() for axes in figure.axes if axes.get_title()]
    assert titles == ["true: b\npredicted: a (0.90)", "true: a\npredicted: b (0.80)", "true: b\npredicted: a (0.60)"]


@pytest.mark.parametrize(("command", "tta"), [("test", "crops"), ("predict", "flip_crops")])
def test_tta_probabilities_are_the_mean_of_the_views_softmax(
    command: str, tta: str, evaluated: Path, digits_dir: Path, tmp_path: Path
) -> None:
    tested = [row["path"] for row in read_csv(evaluation_dir(evaluated) / "predictions.csv")][:24]
    best = run_dir(evaluated, 0) / "checkpoints" / "best.ckpt"
    output = tmp_path / "tta.csv"
    if command == "predict":
        listing = tmp_path / "images.txt"
        listing.write_text("\n".join(tested) + "\n")
        cli_main(["predict", "--ckpt_path", str(best), "--data.predict_dir", str(listing), "--model.tta", tta,
                  "--predictions.output", str(output)])  # fmt: skip
    else:
        cli_main(["test", "--ckpt_path", str(best), "--model.tta", tta, "--predictions.output", str(output),
                  *elsewhere(tmp_path)])  # fmt: skip
    written = {row["path"]: probabilities([row])[0] for row in read_csv(output)}

    model = ImageClassifier.load_from_checkpoint(best, map_location="cpu").eval()
    datamodule = ImageFolderDataModule(str(digits_dir), backbone="test_resnet", image_size=32)
    images = torch.stack([datamodule.transform(training=False)(load_rgb(Path(path))) for path in tested])
    images = datamodule.on_after_batch_transfer((images, torch.zeros(len(images)), torch.zeros(len(images))), 0)[0]
    corners = TF.five_crop(images, [28, 28])[:4]  # 87.5% of 32 px, at each corner
    views = [images, *(TF.resize(crop, [32, 32], InterpolationMode.BILINEAR, antialias=False) for crop in corners)]
    if tta == "flip_crops":
        views += [TF.hflip(view) for view in views]
    with torch.no_grad():
        expected = torch.stack([model(view).softmax(dim=-1) for view in views]).mean(dim=0).numpy()
    np.testing.assert_allclose(np.array([written[path] for path in tested]), expected, atol=1e-5)


def test_reliability_diagram_blends_no_colours_and_explains_each(tmp_path: Path) -> None:
    # bin 14 overconfident (0.95, 2 of 3 right), bin 8 underconfident (0.55, both right): the gap lies on the bar
    probs = np.array([[0.95, 0.05], [0.95, 0.05], [0.95, 0.05], [0.55, 0.45], [0.55, 0.45]])
    targets = np.array([0, 0, 1, 0, 0])
    axes = reliability_figure(calibration_bins(targets, probs), ece=0.1).axes[0]
    drawn = [patch for patch in axes.patches if patch.get_height() != 0]
    assert drawn and all(patch.get_alpha() in (None, 1.0) for patch in drawn)  # nothing translucent over a bar
    legend = axes.get_legend()
    explained = {(handle.get_fill(), handle.get_facecolor() if handle.get_fill() else handle.get_edgecolor())
                 for handle in legend.legend_handles if hasattr(handle, "get_fill")}  # fmt: skip
    assert {(patch.get_fill(), patch.get_facecolor() if patch.get_fill() else patch.get_edgecolor())
            for patch in drawn} == explained  # fmt: skip
    assert [text.get_text() for text in legend.get_texts()] == [
        "perfect calibration", "accuracy", "gap to mean confidence"
    ]  # fmt: skip
