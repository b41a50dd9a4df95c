"""Every number `classifier test` writes equals scikit-learn's on the predictions it wrote, at any batch size and
with classes absent from the split (issue 29, part 2)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from jsonargparse import Namespace
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, log_loss, top_k_accuracy_score
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from classifier import cli_main
from classifier.evaluation.reports import calibration_bins, expected_calibration_error
from classifier.model.checkpoints import read_checkpoint
from classifier.model.metrics import classification_metrics
from classifier.model.module import ImageClassifier
from classifier.model.tta import predict_logits
from classifier.tune.study import objective_direction
from tests.helpers import classifier_here, own_run, read_csv, run_dir, tiny_config

ABSENT = set("56789")  # digits the reduced split's test part leaves out
WEIGHTS = np.arange(1.0, 11.0)  # class weights test is given


def scikit_learn(run: Path, classes: list[str]) -> tuple[dict[str, float], dict[str, float]]:
    """(metrics.json, scikit-learn's figures from predictions.csv, numpy's ECE and the report's macro F1)."""
    rows = read_csv(run / "test" / "predictions.csv")
    index = {name: i for i, name in enumerate(classes)}
    targets = np.array([index[row["target"]] for row in rows])
    probs = np.array([[float(row[f"prob_{name}"]) for name in classes] for row in rows])
    predicted = probs.argmax(axis=1)
    report = {row["class"]: float(row["f1"]) for row in read_csv(run / "test" / "classification_report.csv")}
    expected = {
        "test/acc": accuracy_score(targets, predicted),
        "test/balanced_acc": balanced_accuracy_score(targets, predicted),
        "test/f1_macro": f1_score(targets, predicted, average="macro"),
        "test/f1_weighted": f1_score(targets, predicted, average="weighted"),
        "test/top5_acc": top_k_accuracy_score(targets, probs, k=5, labels=np.arange(len(classes))),
        "report macro f1": report["macro avg"],
        # the split's weighted mean loss, whatever the batches: each image counts its class's weight
        "test/loss": log_loss(targets, probs, sample_weight=WEIGHTS[targets], labels=np.arange(len(classes))),
        "test/ece": numpy_ece(targets, probs),
    }
    assert expected["test/loss"] != pytest.approx(log_loss(targets, probs, labels=np.arange(len(classes))), rel=1e-3)
    return json.loads((run / "test" / "metrics.json").read_text()), expected


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_test_metrics_equal_scikit_learns_at_any_batch_size_and_with_absent_classes(
    unknown_run: Path, tmp_path: Path
) -> None:
    run = own_run(run_dir(unknown_run, 0), tmp_path)
    checkpoint = run / "checkpoints" / "best.ckpt"
    table = read_csv(run / "splits.csv")
    reduced = tmp_path / "reduced.csv"  # the run's own split, its test part without the digits 5-9
    with open(reduced, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(table[0]))
        writer.writeheader()
        for row in table:
            writer.writerow(row | ({"split": "train"} if row["split"] == "test" and row["label"] in ABSENT else {}))
    classes = [str(digit) for digit in range(10)]
    # the checkpoint trained without class weights: test weighs its loss as asked (no `criterion.weight` traceback)
    weighted = ["--model.class_weights", str(WEIGHTS.tolist())]
    for splits in ([], ["--data.splits", str(reduced)]):
        for batch in ("1", "64"):  # at 1 the first batch is one right image: the compute groups' trap
            done = classifier_here("test", "--ckpt_path", str(checkpoint), "--data.batch_size", batch, *splits,
                                   *weighted)  # fmt: skip
            assert done.returncode == 0, done.stderr[-3000:]
            written, expected = scikit_learn(run, classes)
            assert written["test/acc"] > 0.8  # a model good enough that its first batch is right
            for key, value in expected.items():
                got = written.get(key, written["test/f1_macro"])  # the report's macro F1 is metrics.json's
                tolerance = {"rel": 1e-5} if key == "test/loss" else {"abs": 2e-6}  # metrics.json keeps 6 digits
                assert got == pytest.approx(value, **tolerance), (key, batch, splits)
            if splits:
                assert {row["target"] for row in read_csv(run / "test" / "predictions.csv")}.isdisjoint(ABSENT)


def test_top5_is_not_top1_when_the_first_batch_is_all_right() -> None:
    """The compute-groups trap in one collection: a first batch all right in top-1 leaves top-5's state equal to
    another metric's, and merged with it every later batch was scored as that metric."""
    generator = torch.Generator().manual_seed(0)
    targets = torch.randint(0, 5, (60,), generator=generator)
    logits = torch.randn(60, 10, generator=generator)
    logits[torch.arange(12), targets[:12]] += 20  # the first batch all right
    metrics = classification_metrics(10, prefix="")
    for start in range(0, 60, 12):
        metrics.update(logits[start : start + 12], targets[start : start + 12])
    computed = metrics.compute()
    probs = logits.softmax(-1).numpy()
    top5 = top_k_accuracy_score(targets.numpy(), probs, k=5, labels=np.arange(10))
    assert float(computed["top5_acc"]) == pytest.approx(top5, abs=1e-6)
    with pytest.warns(UserWarning, match="y_pred contains classes not in y_true"):
        balanced = balanced_accuracy_score(targets.numpy(), probs.argmax(1))  # digits 5-9 predicted, never true
    assert float(computed["balanced_acc"]) == pytest.approx(balanced, abs=1e-6)


def numpy_ece(targets: np.ndarray, probs: np.ndarray, bins: int = 15) -> float:
    """15 equal-width bins [low, high) of the float32 confidence, one more for confidence 1: torchmetrics' binning."""
    confidence = probs.astype(np.float32).max(axis=1)
    index = np.searchsorted(np.linspace(0, 1, bins + 1, dtype=np.float32), confidence, side="right") - 1
    gaps = [abs((probs.argmax(1) == targets)[index == b].mean() - confidence[index == b].astype(float).mean())
            * (index == b).mean() for b in np.unique(index)]  # fmt: skip
    return float(sum(gaps))


@pytest.mark.filterwarnings("ignore:You are trying to `self.log")  # no trainer: the metrics are read directly
def test_ece_is_of_the_probabilities_when_the_logits_lie_in_0_1() -> None:
    """torchmetrics takes values all in [0, 1] for probabilities and skips its softmax: the module must not feed it
    logits, or a batch of such logits is scored as if they were probabilities."""
    model = ImageClassifier(class_names=["a", "b", "c"], backbone="test_resnet", image_size=32)
    logits = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.7, 0.3], [0.0, 0.5, 1.0], [0.6, 0.6, 0.1]])
    targets = torch.tensor([0, 1, 1, 0])
    model.forward = lambda images: logits  # a network whose every logit lies in [0, 1]
    model.test_step((torch.zeros(4, 3, 32, 32), targets, torch.arange(4)), 0)
    probs = logits.softmax(dim=-1).numpy()
    assert float(model.test_metrics["test/ece"].compute()) == pytest.approx(numpy_ece(targets.numpy(), probs))


def test_reliability_bins_are_the_eces_at_the_edges() -> None:
    """Confidences on the bin edges (k/15) and at exactly 1 fall in the bins torchmetrics' ECE puts them in: the
    diagram's bins recompute test/ece."""
    edges = np.linspace(0, 1, 16)[6:]
    confidence = np.concatenate([edges, np.random.default_rng(0).uniform(0.4, 1, 100), np.ones(4)])
    probs = np.stack([confidence, 1 - confidence], axis=1).astype(np.float32).astype(np.float64)
    targets = np.random.default_rng(1).integers(0, 2, len(probs))
    bins = calibration_bins(targets, probs)
    assert len(bins) == 16 and bins[-1][2] == 5  # 1.0 is its own bin (with the edge 15/15)
    counts = np.bincount(np.searchsorted(np.linspace(0, 1, 16, dtype=np.float32), probs.astype(np.float32).max(1),
                                         side="right") - 1, minlength=16)  # fmt: skip
    assert [count for _, _, count in bins] == counts.tolist()
    from_bins = sum(count / len(targets) * abs(accuracy - mean) for mean, accuracy, count in bins if count)
    assert from_bins == pytest.approx(expected_calibration_error(targets, probs), abs=1e-7)
    assert from_bins == pytest.approx(numpy_ece(targets, probs), abs=1e-7)


def test_tta_of_a_very_confident_model_gives_a_finite_loss() -> None:
    """The log of the views' mean probability, in log space: a class every view gives ~e^-200 stays finite."""
    views = iter([torch.tensor([[0.0, -200.0, 200.0]]), torch.tensor([[0.0, 200.0, -210.0]])])
    logits = predict_logits(lambda images: next(views), torch.zeros(1, 3, 4, 4), "flip")
    exact = np.log(np.mean([softmax64([0.0, -200.0, 200.0]), softmax64([0.0, 200.0, -210.0])], axis=0))
    np.testing.assert_allclose(logits[0].numpy(), exact, rtol=1e-6)
    assert torch.isfinite(torch.nn.functional.cross_entropy(logits, torch.tensor([0])))


def softmax64(logits: list[float]) -> np.ndarray:
    values = np.array(logits, dtype=np.float64)
    return np.exp(values - values.max()) / np.exp(values - values.max()).sum()


def test_best_epoch_and_hp_best_follow_a_per_class_monitor_validated_twice_an_epoch(
    small_digits: Path, tmp_path: Path
) -> None:
    config = tiny_config(tmp_path, small_digits, trainer={"max_epochs": 3, "val_check_interval": 0.5})
    cli_main(["fit", "--config", str(config), "--checkpoint.monitor", "val/f1/3", "--model.optimizer.lr", "0.01"])
    run = run_dir(tmp_path, 0)
    summary = json.loads((run / "summary.json").read_text())
    events = EventAccumulator(str(run), size_guidance={"scalars": 0})
    events.Reload()
    scores = [event.value for event in events.Scalars("val/f1/3")]
    assert len(scores) == 6  # two validations an epoch
    best = read_checkpoint(run / "checkpoints" / "best.ckpt")
    assert summary["best_epoch"] == best["epoch"] == scores.index(max(scores)) // 2
    assert summary["best_value"] == pytest.approx(max(scores))
    (logged,) = events.Scalars("hp/best_val_f1_3")
    assert logged.value == pytest.approx(max(scores))
    assert events.Scalars("hp/best_epoch")[0].value == best["epoch"]


def test_a_loss_monitor_keeps_the_lowest_loss_whatever_mode_the_config_says(
    small_digits: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = tiny_config(tmp_path, small_digits, trainer={"max_epochs": 3}, checkpoint={"mode": "max"})
    with caplog.at_level("INFO", logger="classifier"):
        cli_main(["fit", "--config", str(config), "--checkpoint.monitor", "val/loss", "--model.optimizer.lr", "0.01"])
    assert "val/loss is better lower: checkpoints and early stopping keep its lowest (mode min" in caplog.text
    run = run_dir(tmp_path, 0)
    events = EventAccumulator(str(run), size_guidance={"scalars": 0})
    events.Reload()
    losses = [event.value for event in events.Scalars("val/loss")]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["best_value"] == pytest.approx(min(losses), rel=1e-5)  # summary.json keeps 6 digits
    assert summary["best_epoch"] == losses.index(min(losses))


def test_tune_takes_the_direction_a_metric_improves_in() -> None:
    checkpoint = Namespace(monitor="val/loss", mode="max")  # a config's mode the monitor overrides
    assert objective_direction(checkpoint, "val/loss", None) == "minimize"
    assert objective_direction(checkpoint, "val/f1/3", None) == "maximize"
    assert objective_direction(Namespace(monitor="val/mine", mode="min"), "val/mine", None) == "minimize"
    with pytest.raises(ValueError, match="--direction maximize: val/loss is better lower"):
        objective_direction(checkpoint, "val/loss", "maximize")
    with pytest.raises(ValueError, match="--metric val/mine needs --direction"):
        objective_direction(checkpoint, "val/mine", None)
