"""`classifier test --data.ood_dir`: a folder of images of none of the classes scored against the test split, each
figure of metrics.json recomputed here from the checkpoint's own logits with plain torch, scikit-learn and numpy."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

from classifier.core.imageio import list_images
from classifier.deploy.predictor import Predictor
from tests.helpers import classifier_here, own_run, run_dir


def logits_of(predictor: Predictor, paths: list[Path]) -> torch.Tensor:
    """The network's logits for image files, preprocessed as the checkpoint says (no TTA)."""
    images = torch.stack([predictor.preprocess(path) for path in paths])
    with torch.inference_mode():
        return predictor.net((images.float() - predictor.mean) / predictor.std)


def split_paths(run: Path, data_dir: Path) -> list[Path]:
    """The run's test images, as its splits.csv lists them."""
    with open(run / "splits.csv", newline="") as file:
        return [data_dir / row["path"] for row in csv.DictReader(file) if row["split"] == "test"]


def test_ood_dir_scores_the_folder_against_the_test_split(unknown_run: Path, digits_dir: Path, tmp_path: Path) -> None:
    run = own_run(run_dir(unknown_run, 0), tmp_path)
    calibrated, shapes = run / "checkpoints" / "best-calibrated.ckpt", unknown_run / "shapes"
    tested = classifier_here("test", "--ckpt_path", str(calibrated), "--data.ood_dir", str(shapes))
    assert tested.returncode == 0, tested.stderr[-3000:]
    metrics = json.loads((run / "test" / "metrics.json").read_text())

    predictor = Predictor.from_checkpoint(calibrated, tta="none")
    known = logits_of(predictor, split_paths(run, digits_dir)).logsumexp(-1).double().numpy()
    ood = logits_of(predictor, list_images(shapes)).logsumexp(-1).double().numpy()
    truth = np.r_[np.ones(len(known)), np.zeros(len(ood))]
    assert metrics["ood/auroc"] == pytest.approx(roc_auc_score(truth, np.r_[known, ood]), abs=1e-6)
    # the highest score that keeps 95% of the test images, and the share of the folder at or above it
    at_95 = np.sort(known)[::-1][int(np.ceil(0.95 * len(known))) - 1]
    assert metrics["ood/fpr_at_95_tpr"] == pytest.approx(np.mean(ood >= at_95), abs=1e-6)
    assert (metrics["ood/images_test"], metrics["ood/images_ood"]) == (len(known), len(ood)) == (270, 12)
    threshold = torch.load(calibrated, weights_only=True)["net"]["rejection"]["threshold"]
    assert metrics["ood/threshold"] == pytest.approx(threshold, rel=1e-6)
    marked = (metrics["ood/unknown_test"], metrics["ood/unknown_ood"])
    assert marked == (np.sum(known < threshold), np.sum(ood < threshold))
    assert metrics["ood/unknown_share_ood"] == pytest.approx(np.mean(ood < threshold), abs=1e-6)
    assert metrics["ood/unknown_share_test"] == pytest.approx(np.mean(known < threshold), abs=1e-6)
    assert metrics["test/acc"] > 0.5  # the test split's own metrics are kept
    with Image.open(run / "test" / "ood_scores.png") as figure:
        figure.verify()
        assert figure.format == "PNG" and figure.size[0] >= 400
    scores = (run / "test" / "ood_scores.csv").read_text().splitlines()
    assert scores[0] == "path,split,energy,unknown" and len(scores) == 1 + 270 + 12


def test_a_bad_ood_dir_stops_before_the_test_with_one_line(unknown_run: Path, tmp_path: Path) -> None:
    run = own_run(run_dir(unknown_run, 0), tmp_path)
    shutil.rmtree(run / "test", ignore_errors=True)
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    for folder, problem in ((tmp_path / "missing", "is not a folder"), (tmp_path / "empty", "holds no images")):
        done = classifier_here(
            "test", "--ckpt_path", str(run / "checkpoints" / "best.ckpt"), "--data.ood_dir", str(folder)
        )
        assert done.returncode != 0
        assert done.stderr.splitlines()[0] == (
            f"error: --data.ood_dir {folder} {problem}: give a folder of images of none of the classes"
        )
    assert not (run / "test" / "metrics.json").exists()  # nothing was evaluated


def test_a_multilabel_image_is_unknown_with_no_label_and_a_low_joint_energy(
    multilabel_run: Path, tmp_path: Path
) -> None:
    run = own_run(multilabel_run / "lightning_logs" / "tiny" / "version_0", tmp_path)
    best = run / "checkpoints" / "best.ckpt"
    done = classifier_here("calibrate", "--ckpt_path", str(best), "--data.num_workers", "0", "--keep", "0.8")
    assert done.returncode == 0, done.stderr[-3000:]
    calibrated = best.with_name("best-calibrated.ckpt")
    plain = tmp_path / "plain"  # flat grey images: no scene
    plain.mkdir()
    for i in range(6):
        Image.fromarray(np.full((16, 16), 40 * i, dtype=np.uint8)).save(plain / f"{i}.png")
    # every label at 0.2: some images under the rejection threshold get a label, and so stay known
    done = classifier_here(
        "test", "--ckpt_path", str(calibrated), "--data.ood_dir", str(plain), "--model.thresholds", "0.2"
    )
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((run / "test" / "metrics.json").read_text())

    predictor = Predictor.from_checkpoint(calibrated, tta="none")
    logits = torch.cat(
        [logits_of(predictor, split_paths(run, multilabel_run / "scenes")), logits_of(predictor, list_images(plain))]
    )
    joint = torch.nn.functional.softplus(logits).sum(-1).numpy()  # JointEnergy
    known = len(logits) - 6
    truth = np.r_[np.ones(known), np.zeros(6)]
    assert metrics["ood/auroc"] == pytest.approx(roc_auc_score(truth, joint), abs=1e-6)
    low, labelled = joint < predictor.net.rejection["threshold"], (logits.sigmoid() >= 0.2).any(-1).numpy()
    unknown = low & ~labelled
    assert (metrics["ood/unknown_test"], metrics["ood/unknown_ood"]) == (unknown[:known].sum(), unknown[known:].sum())
    assert unknown.sum() < low.sum()  # a label keeps an image known, however low its score
