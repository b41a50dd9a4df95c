"""check-data, cv, explain and tune on multi-label scenes: per-label counts, label-set conflicts, out-of-fold issues
per image and label, k-fold scored by val/map, one map per predicted label, and a study that maximises val/map."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, f1_score

from classifier import Predictor
from classifier.data.scenes import LABELS, write_scenes
from tests.helpers import classifier_here, read_csv, run_dir, tiny_config

MISSING = 3  # images that lose one of their labels in the manifest: planted missing labels


def write_manifest(path: Path, rows: list[dict[str, str]]) -> Path:
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=["path", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def label_set(text: str) -> set[str]:
    return {name for name in text.split(";") if name}


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """100 scenes listed in given.csv: labels.csv with one label dropped from MISSING images, and a byte copy of the
    first image under another name with another label set."""
    root = write_scenes(tmp_path_factory.mktemp("scenes"), count=100)
    truth = read_csv(root / "labels.csv")
    given = [dict(row) for row in truth]
    rows = [i for i, row in enumerate(truth) if len(label_set(row["label"])) >= 2][:MISSING]
    dropped = {}
    for i in rows:
        names = sorted(label_set(truth[i]["label"]))
        dropped[truth[i]["path"]] = names[0]
        given[i]["label"] = ";".join(names[1:])
    copy = "images/copy_of_first.png"
    shutil.copy(root / truth[0]["path"], root / copy)
    other = ";".join(sorted(set(LABELS) - label_set(truth[0]["label"])))
    given.append({"path": copy, "label": other})
    manifest = write_manifest(root / "given.csv", given)
    return SimpleNamespace(root=root, manifest=manifest, truth=truth, given=given, dropped=dropped, copy=copy)


def multilabel_config(tmp_path: Path, scenes: SimpleNamespace) -> Path:
    """The tiny config, one epoch at 16 px, on the scenes' manifest of `;`-joined label sets."""
    data = {"manifest": str(scenes.manifest), "label_delimiter": ";", "image_size": 16}
    return tiny_config(tmp_path, tmp_path / "unused", trainer={"max_epochs": 1}, data=data)


@pytest.fixture(scope="module")
def cross_validated(scenes: SimpleNamespace, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """`classifier cv` over 2 folds of the scenes: (tmp folder, its cv folder, what it printed)."""
    tmp_path = tmp_path_factory.mktemp("cv")
    done = classifier_here("cv", "--config", str(multilabel_config(tmp_path, scenes)), "--data.num_folds", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    return SimpleNamespace(tmp_path=tmp_path, cv_dir=tmp_path / "lightning_logs" / "tiny" / "cv_0", out=done.stdout)


def probabilities(rows: list[dict[str, str]]) -> np.ndarray:
    return np.array([[float(row[f"prob_{name}"]) for name in LABELS] for row in rows])


def targets(rows: list[dict[str, str]]) -> np.ndarray:
    return np.array([[int(name in label_set(row["target"])) for name in LABELS] for row in rows])


def thresholds_of(checkpoint: Path) -> np.ndarray:
    return torch.load(checkpoint, weights_only=True)["state_dict"]["net.thresholds"].numpy()


def test_cv_scores_each_fold_by_val_map_and_averages_them(cross_validated: SimpleNamespace) -> None:
    cv_dir = cross_validated.cv_dir
    summary = json.loads((cv_dir / "cv_summary.json").read_text())
    oof = read_csv(cv_dir / "oof_predictions.csv")
    for fold, metrics in enumerate(summary["folds"]):
        rows = [row for row in oof if row["fold"] == str(fold)]
        reference = average_precision_score(targets(rows), probabilities(rows), average="macro")
        assert metrics["val/map"] == pytest.approx(reference, abs=1e-5)
        fit = json.loads((run_dir(cross_validated.tmp_path, fold) / "summary.json").read_text())
        assert (fit["monitor"], fit["best_value"]) == ("val/map", pytest.approx(metrics["val/map"], abs=1e-6))
    assert summary["mean"]["val/map"] == pytest.approx(np.mean([m["val/map"] for m in summary["folds"]]), abs=1e-6)
    assert {"val/f1_micro", "val/subset_acc", "val/hamming"} <= set(summary["mean"])
    assert "val/acc" not in summary["mean"]
    header = next(line for line in cross_validated.out.splitlines() if line.startswith("┃ fold"))
    assert [cell.strip() for cell in header.split("┃")[1:-1]][:5] == ["fold", "f1_macro", "f1_micro", "hamming", "map"]


def test_the_fold_ensemble_decides_at_the_folds_mean_thresholds(cross_validated: SimpleNamespace) -> None:
    cv_dir, tmp_path = cross_validated.cv_dir, cross_validated.tmp_path
    per_fold = [read_csv(cv_dir / f"fold_{fold}" / "test" / "predictions.csv") for fold in (0, 1)]
    probs = np.mean([probabilities(rows) for rows in per_fold], axis=0)
    truth = targets(per_fold[0])
    thresholds = np.mean([thresholds_of(run_dir(tmp_path, f) / "checkpoints" / "best.ckpt") for f in (0, 1)], axis=0)
    metrics = json.loads((cv_dir / "ensemble" / "metrics.json").read_text())
    assert metrics["test/map"] == pytest.approx(average_precision_score(truth, probs, average="macro"), abs=1e-6)
    decided = (probs >= thresholds).astype(int)
    assert metrics["test/f1_micro"] == pytest.approx(f1_score(truth, decided, average="micro"), abs=1e-6)
    written = read_csv(cv_dir / "ensemble" / "predictions.csv")
    assert [label_set(row["labels"]) for row in written] == [
        {name for name, on in zip(LABELS, row, strict=True) if on} for row in decided
    ]


def confident_learning_by_loops(rows: list[dict[str, str]]) -> list[tuple[str, str, str, str]]:
    """(path, label, given, problem) of every suspect, one label and one image at a time: confident learning on the
    two classes absent (1 - p) and present (p), ranked by the probability of the given 0/1, then file, then label."""
    suspects = []
    for k, name in enumerate(LABELS):
        given = [int(name in label_set(row["target"])) for row in rows]
        present = [float(row[f"prob_{name}"]) for row in rows]
        sides = [(1 - p, p) for p in present]
        means = [
            np.mean(values) if (values := [side[c] for side, g in zip(sides, given, strict=True) if g == c]) else np.inf
            for c in (0, 1)
        ]
        for i, (side, g) in enumerate(zip(sides, given, strict=True)):
            predicted = 1 if side[1] > side[0] else 0
            confident = [c for c in (0, 1) if side[c] >= means[c] - 1e-6]
            assigned = max(confident, key=lambda c: side[c]) if confident else predicted
            if assigned != g and predicted != g:
                problem = "wrong" if g else "missing"
                suspects.append((side[g], i, k, (rows[i]["path"], name, str(g), problem)))
    return [suspect for *_, suspect in sorted(suspects)]


def test_oof_issues_of_a_real_cv_are_confident_learning_per_label(
    scenes: SimpleNamespace, cross_validated: SimpleNamespace
) -> None:
    oof = cross_validated.cv_dir / "oof_predictions.csv"
    out = cross_validated.tmp_path / "audit_oof"
    config = multilabel_config(cross_validated.tmp_path, scenes)
    done = classifier_here("check-data", "--config", str(config), "--oof", str(oof), "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    issues = read_csv(out / "label_issues.csv")
    expected = confident_learning_by_loops(read_csv(oof))
    assert [(row["path"], row["label"], row["given"], row["problem"]) for row in issues] == expected
    assert [row["rank"] for row in issues] == [str(rank) for rank in range(1, len(expected) + 1)]
    findings = [row for row in read_csv(out / "issues.csv") if row["kind"] == "label_issue"]
    assert [row["path"] for row in findings] == [path for path, *_ in expected]


def test_missing_labels_rank_first_given_a_model_that_sees_the_shapes(scenes: SimpleNamespace, tmp_path: Path) -> None:
    """Out-of-fold probabilities of a model that learnt the scenes (each true label 0.55-0.95, each absent one
    0.02-0.45): exactly the labels dropped from labels.csv are reported, as missing, the most probable first."""
    rng = np.random.default_rng(0)
    oof = tmp_path / "oof_predictions.csv"
    with open(oof, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["path", "target", "labels", *(f"prob_{name}" for name in LABELS), "fold"])
        for truth, given in zip(scenes.truth, scenes.given[: len(scenes.truth)], strict=True):
            present = label_set(truth["label"])
            probs = [rng.uniform(0.55, 0.95) if name in present else rng.uniform(0.02, 0.45) for name in LABELS]
            path = str(scenes.root / given["path"])
            writer.writerow([path, given["label"], truth["label"], *probs, rng.integers(2)])
    out = tmp_path / "audit"
    config = multilabel_config(tmp_path, scenes)
    done = classifier_here("check-data", "--config", str(config), "--oof", str(oof), "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    issues = read_csv(out / "label_issues.csv")
    probability = {(row["path"], name): float(row[f"prob_{name}"]) for row in read_csv(oof) for name in LABELS}
    expected = sorted(((str(scenes.root / p), name) for p, name in scenes.dropped.items()), key=probability.get)
    assert [(row["path"], row["label"], row["given"], row["problem"]) for row in issues] == [
        (path, name, "0", "missing") for path, name in reversed(expected)
    ]
    assert (out / "label_issues.png").is_file()


def test_check_data_counts_images_per_label_and_reports_a_copy_with_another_label_set(
    scenes: SimpleNamespace, cross_validated: SimpleNamespace
) -> None:
    fold_run = run_dir(cross_validated.tmp_path, 0)
    out = cross_validated.tmp_path / "audit"
    config = multilabel_config(cross_validated.tmp_path, scenes)
    options = ["--data.num_folds", "2", "--out", str(out), "--strict"]  # fit's split of fold 0, as cv made it
    done = classifier_here("check-data", "--config", str(config), *options)
    assert done.returncode == 1  # the label conflict gates --strict
    (line,) = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert line.startswith("error: check-data --strict: ") and "1 label_conflict;" in line
    table = read_csv(fold_run / "splits.csv")
    report = json.loads((out / "data_report.json").read_text())
    splits = ("train", "val", "test")
    assert report["class_counts"] == {
        name: {split: sum(r["split"] == split and name in label_set(r["label"]) for r in table) for split in splits}
        for name in LABELS
    }
    assert report["images_without_label"] == {split: sum(r["split"] == split and not r["label"] for r in table)
                                              for split in splits}  # fmt: skip
    first, copy = str(scenes.root / scenes.given[0]["path"]), str(scenes.root / scenes.copy)
    findings = {(row["kind"], row["path"], row["related"]): row["detail"] for row in read_csv(out / "issues.csv")}
    part = {r["path"]: "test" if r["split"] == "test" else f"fold {r['fold']}" for r in table}
    conflict = {key: detail for key, detail in findings.items() if key[0] == "label_conflict"}
    (((_, reported, related), detail),) = conflict.items()
    assert {reported, related} == {first, copy}
    labels = {first: scenes.given[0]["label"], copy: scenes.given[-1]["label"]}
    assert detail == f"same bytes labelled {labels[reported]} and {labels[related]}"
    leaked = part[scenes.given[0]["path"]] != part[scenes.copy]
    assert (("leakage", reported, related) in findings) == leaked
    rare = {key: detail for key, detail in findings.items() if key[0] == "small_class"}  # stripes: 15% of scenes
    assert rare == {
        ("small_class", "stripes", ""): f"{report['class_counts']['stripes']['train']} training images (under 10)"
    }
    assert len(findings) == 2 + leaked


def test_explain_draws_a_map_per_label_at_the_checkpoints_thresholds(cross_validated: SimpleNamespace) -> None:
    checkpoint = run_dir(cross_validated.tmp_path, 0) / "checkpoints" / "best.ckpt"
    out = cross_validated.tmp_path / "explained"
    done = classifier_here("explain", "--ckpt_path", str(checkpoint), "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    rows = read_csv(out / "cams.csv")
    paths = sorted({Path(row["path"]) for row in rows})
    probs = Predictor.from_checkpoint(checkpoint).predict(paths).numpy()
    thresholds = thresholds_of(checkpoint)
    expected = set()
    for path, p in zip(paths, probs, strict=True):
        predicted = [LABELS[k] for k in np.flatnonzero(p >= thresholds)] or [LABELS[int(p.argmax())]]
        expected |= {(str(path), name) for name in predicted}
    assert sorted((row["path"], row["target"]) for row in rows) == sorted(expected)
    tested = [row["path"] for row in read_csv(checkpoint.parents[1] / "splits.csv") if row["split"] == "test"]
    assert len(paths) == len(tested)
    for row in rows:
        k = LABELS.index(row["target"])
        p = probs[[str(path) for path in paths].index(row["path"])]
        assert float(row["target_probability"]) == pytest.approx(p[k], abs=1e-6)
        assert float(row["threshold"]) == pytest.approx(thresholds[k], abs=1e-6)
        assert (out / row["overlay"]).is_file() and row["overlay"].endswith(f"_{row['target']}.png")
    assert len({row["overlay"] for row in rows}) == len(rows)
    assert (out / "cam_grid.png").is_file()


def test_tune_maximises_val_map_on_multilabel_data(scenes: SimpleNamespace, tmp_path: Path) -> None:
    config = multilabel_config(tmp_path, scenes)
    (tmp_path / "search.yaml").write_text("model.optimizer.init_args.lr: {type: float, low: 1e-3, high: 1e-2}\n")
    args = ["tune", "--config", str(config), "--search", str(tmp_path / "search.yaml"), "--pruner", "none"]
    wrong = classifier_here(*args, "--metric", "val/acc")
    assert wrong.returncode != 0 and "val/map" in wrong.stderr and "val/ap/ring" in wrong.stderr
    done = classifier_here(*args, "--trials", "1")
    assert done.returncode == 0, done.stderr[-3000:]
    folder = tmp_path / "lightning_logs" / "tiny" / "tune"
    best = json.loads((folder / "best_params.json").read_text())
    fit = json.loads((folder / "trials" / "trial_0" / "summary.json").read_text())
    assert (best["metric"], best["value"]) == ("val/map", pytest.approx(fit["best_value"], abs=1e-6))
    assert fit["monitor"] == "val/map"
