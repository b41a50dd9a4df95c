"""Every number `classifier test` writes equals scikit-learn's on the predictions it wrote, at any batch size and
with classes absent from the split (issue 29, part 2)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, top_k_accuracy_score

from classifier.model.metrics import classification_metrics
from tests.helpers import classifier_here, own_run, read_csv, run_dir

ABSENT = set("56789")  # digits the reduced split's test part leaves out


def scikit_learn(run: Path, classes: list[str]) -> tuple[dict[str, float], dict[str, float]]:
    """(metrics.json, scikit-learn's figures from predictions.csv and the report's macro F1)."""
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
    }
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
    for splits in ([], ["--data.splits", str(reduced)]):
        for batch in ("1", "64"):  # at 1 the first batch is one right image: the compute groups' trap
            done = classifier_here("test", "--ckpt_path", str(checkpoint), "--data.batch_size", batch, *splits)
            assert done.returncode == 0, done.stderr[-3000:]
            written, expected = scikit_learn(run, classes)
            assert written["test/acc"] > 0.8  # a model good enough that its first batch is right
            for key, value in expected.items():
                got = written.get(key, written["test/f1_macro"])  # the report's macro F1 is metrics.json's
                assert got == pytest.approx(value, abs=2e-6), (key, batch, splits)
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
