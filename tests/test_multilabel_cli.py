"""Multi-label end to end, as a user runs it: generated scenes with several shapes each, under opaque names, labels
only in a manifest (delimited, and one 0/1 column per label), through `classifier` in a process of its own for
every command: fit, test, predict, export with parity, serve, k-fold and the audit."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, f1_score

from classifier.data.scenes import LABELS
from tests.helpers import classifier_process, own_run, read_csv, run_dir, tiny_config
from tests.helpers.serving import served

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(multilabel_run: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The shared multi-label run (fitted and exported once), its run folder copied here for
    the commands that write into it, and its checkpoint's thresholds."""
    run = own_run(run_dir(multilabel_run, 0), tmp_path_factory.mktemp("multilabel"))
    best = run / "checkpoints" / "best.ckpt"
    thresholds = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]["net.thresholds"].numpy()
    scenes = multilabel_run / "scenes"
    return {"shared": multilabel_run, "run": run, "scenes": scenes, "best": best, "thresholds": thresholds}


def probabilities(rows: list[dict[str, str]]) -> np.ndarray:
    return np.array([[float(row[f"prob_{label}"]) for label in LABELS] for row in rows])


def assert_labels_over_thresholds(rows: list[dict[str, str]], thresholds: np.ndarray) -> None:
    """Each row's `labels` are those of its probabilities at or over their thresholds (but for a probability
    within the CSV's 7 digits of its threshold, which either side may round across)."""
    probs = probabilities(rows)
    written = np.array([[int(label in row["labels"].split(";")) for label in LABELS] for row in rows])
    clear = np.abs(probs - thresholds) > 1e-6
    np.testing.assert_array_equal(written[clear], (probs >= thresholds)[clear])
    assert 0 < written.sum() < written.size


def test_test_scores_equal_scikit_learn_s_on_the_written_probabilities(trained: dict) -> None:
    classifier_process("test", "--ckpt_path", str(trained["best"]))
    folder = trained["best"].parents[1] / "test"
    rows = read_csv(folder / "predictions.csv")
    probs = probabilities(rows)
    truth = np.array([[int(label in row["target"].split(";")) for label in LABELS] for row in rows])
    decided = (probs >= trained["thresholds"]).astype(int)
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["test/map"] == pytest.approx(average_precision_score(truth, probs, average="macro"), abs=1e-4)
    assert metrics["test/f1_macro"] == pytest.approx(f1_score(truth, decided, average="macro"), abs=1e-4)
    assert metrics["test/f1_micro"] == pytest.approx(f1_score(truth, decided, average="micro"), abs=1e-4)
    assert_labels_over_thresholds(rows, trained["thresholds"])
    # the test split is the one the fit recorded
    recorded = read_csv(trained["run"] / "splits.csv")
    assert sorted(row["path"] for row in rows) == sorted(
        str(trained["scenes"] / row["path"]) for row in recorded if row["split"] == "test"
    )


def test_predict_writes_each_image_s_labels_over_their_thresholds(trained: dict, tmp_path: Path) -> None:
    images = str(trained["scenes"] / "images")
    classifier_process("predict", "--ckpt_path", str(trained["best"]), "--data.predict_dir", images)
    (written,) = trained["best"].parents[1].glob("predict/*/predictions.csv")
    rows = read_csv(written)
    assert len(rows) == 120
    assert_labels_over_thresholds(rows, trained["thresholds"])


def test_export_passes_parity_and_the_server_answers_the_same_labels(trained: dict, tmp_path: Path) -> None:
    from classifier.deploy.onnx_predictor import OnnxPredictor

    exported = trained["shared"] / "export"  # by `classifier export`
    parity = json.loads((exported / "parity.json").read_text())
    assert parity["passed"] and parity["task"] == "multilabel"
    assert {size: run["label_set_agreement"] for size, run in parity["batch_sizes"].items()} == dict.fromkeys(
        parity["batch_sizes"], 1.0
    )
    model = exported / "model.onnx"
    image = sorted((trained["scenes"] / "images").iterdir())[0]
    expected = OnnxPredictor(model).classify(image)
    result = served(model, image)
    assert [entry["label"] for entry in result["labels"]] == expected.labels
    for entry in result["labels"]:
        assert entry["probability"] == pytest.approx(expected.probabilities[entry["label"]], abs=1e-4)
        assert entry["threshold"] == pytest.approx(expected.thresholds[entry["label"]], abs=1e-6)


def test_the_one_hot_manifest_trains_on_the_same_split_and_k_fold_reports_map_per_fold(
    trained: dict, tmp_path: Path
) -> None:
    one_hot = {"manifest": str(trained["scenes"] / "labels_onehot.csv"), "label_columns": list(LABELS)}
    config = tiny_config(tmp_path, trained["scenes"], data={**one_hot, "data_dir": None}, trainer={"max_epochs": 1})
    done = classifier_process("cv", "--config", str(config), "--data.num_folds", "2")
    recorded = {row["path"]: row for row in read_csv(trained["run"] / "splits.csv")}
    for fold in range(2):  # the same label sets, and the same test split, as the delimited manifest's
        for row in read_csv(run_dir(tmp_path, fold) / "splits.csv"):
            assert row["label"] == recorded[row["path"]]["label"]
            assert (row["split"] == "test") == (recorded[row["path"]]["split"] == "test")
    assert "val/map" in done.stdout + done.stderr


def test_check_data_audits_a_multi_label_manifest(trained: dict, tmp_path: Path) -> None:
    report = tmp_path / "audit"
    data = {"manifest": str(trained["scenes"] / "labels.csv"), "label_delimiter": ";", "data_dir": None}
    config = tiny_config(tmp_path, trained["scenes"], data=data)
    classifier_process("check-data", "--config", str(config), "--out", str(report))
    counts = json.loads((report / "data_report.json").read_text())["class_counts"]
    with open(trained["scenes"] / "labels.csv", newline="") as file:
        listed = [row["label"].split(";") for row in csv.DictReader(file)]
    assert {label: sum(counts[label].values()) for label in LABELS} == {
        label: sum(label in labels for labels in listed) for label in LABELS
    }
