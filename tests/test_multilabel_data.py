"""Multi-label data and its pieces: label sets from a manifest (delimited or one 0/1 column per class), iterative
stratification that puts every label in every split, the sigmoid losses and the thresholds tuned on validation, each
checked against an independent reference."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from iterstrat.ml_stratifiers import MultilabelStratifiedKFold
from sklearn.metrics import f1_score
from timm.loss import AsymmetricLossMultiLabel

from classifier.data.datamodule import ImageFolderDataModule
from classifier.data.scenes import LABELS, write_scenes
from classifier.model.losses import SigmoidLoss
from classifier.model.module import ImageClassifier
from classifier.model.thresholds import tune_thresholds


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_scenes(tmp_path_factory.mktemp("scenes"), count=120, sizes=(40, 56))


def rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def data(manifest: Path, **settings: object) -> ImageFolderDataModule:
    return ImageFolderDataModule(manifest=str(manifest), num_workers=0, **settings)


def test_delimited_and_one_hot_manifests_give_the_same_label_sets_and_splits(scenes: Path) -> None:
    delimited = data(scenes / "labels.csv", label_delimiter=";").splits
    one_hot = data(scenes / "labels_onehot.csv", label_columns=list(LABELS)).splits
    listed = rows(scenes / "labels.csv")
    expected = np.array([[int(label in row["label"].split(";")) for label in LABELS] for row in listed])
    assert delimited.classes == one_hot.classes == list(LABELS)
    np.testing.assert_array_equal(delimited.labels, expected)
    np.testing.assert_array_equal(one_hot.labels, expected)
    assert (expected.sum(axis=1) == 0).any()  # images with none of the labels are kept, with an empty set
    np.testing.assert_array_equal(delimited.split, one_hot.split)
    table = delimited.to_csv().splitlines()
    assert table[0] == "path,label,split,fingerprint"
    assert [line.split(",")[1] for line in table[1:]] == [row["label"] for row in rows(scenes / "labels.csv")]


def test_every_label_lands_in_every_split_in_proportion(scenes: Path) -> None:
    splits = data(scenes / "labels.csv", label_delimiter=";", val_fraction=0.2, test_fraction=0.2).splits
    totals = splits.labels.sum(axis=0)
    for name, share in (("val", 0.2), ("test", 0.2), ("train", 0.6)):
        counts = np.array(splits.class_counts(name))
        assert np.all(np.abs(counts - share * totals) <= 2), (name, counts, share * totals)


def test_k_fold_folds_are_iterstrat_s_over_all_but_the_test_split(scenes: Path) -> None:
    splits = data(scenes / "labels.csv", label_delimiter=";", num_folds=3, fold=1, seed=5).splits
    pool = np.flatnonzero(splits.split != "test")
    expected = np.full(len(splits.paths), -1)
    folds = MultilabelStratifiedKFold(n_splits=3, shuffle=True, random_state=5)
    for k, (_, held) in enumerate(folds.split(np.zeros(len(pool)), splits.labels[pool])):
        expected[pool[held]] = k
    np.testing.assert_array_equal(splits.fold, expected)
    assert set(splits.split[splits.fold == 1]) == {"val"}


def test_a_group_never_straddles_multi_label_splits(scenes: Path, tmp_path: Path) -> None:
    listed = rows(scenes / "labels.csv")
    for index, row in enumerate(listed):
        row["path"] = str(scenes / row["path"])
        row["group"] = f"scene{index // 3}"
    manifest = tmp_path / "grouped.csv"
    with open(manifest, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=["path", "label", "group"])
        writer.writeheader()
        writer.writerows(listed)
    splits = data(manifest, label_delimiter=";").splits
    by_group: dict[str, set[str]] = {}
    for row, split in zip(listed, splits.split, strict=True):
        by_group.setdefault(row["group"], set()).add(split)
    assert all(len(found) == 1 for found in by_group.values())
    assert set(splits.split) == {"train", "val", "test"}


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"label_columns": ["disc", "cube"]}, "has no column 'cube' (--data.label_columns)"),
        ({"label_delimiter": ";", "manifest": None}, "read a --data.manifest; it is not set"),
    ],
)
def test_bad_label_options_are_one_line_errors(scenes: Path, settings: dict, message: str) -> None:
    manifest = settings.pop("manifest", scenes / "labels_onehot.csv")
    module = ImageFolderDataModule(**({"manifest": str(manifest)} if manifest else {}), num_workers=0, **settings)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _ = module.splits


def test_a_one_hot_cell_that_is_not_0_or_1_names_the_row_and_column(scenes: Path, tmp_path: Path) -> None:
    listed = rows(scenes / "labels_onehot.csv")
    listed[3]["ring"] = "2"
    manifest = tmp_path / "odd.csv"
    with open(manifest, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(listed[0]))
        writer.writeheader()
        writer.writerows({**row, "path": str(scenes / row["path"])} for row in listed)
    with pytest.raises(ValueError, match=r"odd.csv, row 4: column 'ring' holds '2', not 0 or 1"):
        _ = data(manifest, label_columns=list(LABELS)).splits


def test_sigmoid_losses_equal_their_references() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 4, generator=generator) * 3
    targets = (torch.rand(6, 4, generator=generator) > 0.5).float()
    weight = torch.tensor([1.0, 2.0, 0.5, 3.0])
    bce = torch.nn.BCEWithLogitsLoss(pos_weight=weight)(logits, targets)
    torch.testing.assert_close(SigmoidLoss("bce", weight.clone())(logits, targets), bce)
    torch.testing.assert_close(SigmoidLoss("focal", weight.clone(), gamma=0.0)(logits, targets), bce)
    smoothed = torch.nn.BCEWithLogitsLoss()(logits, targets * 0.8 + 0.1)
    torch.testing.assert_close(SigmoidLoss("bce", label_smoothing=0.2)(logits, targets), smoothed)
    asl = AsymmetricLossMultiLabel()(logits, targets) / logits.numel()
    torch.testing.assert_close(SigmoidLoss("asl")(logits, targets), asl)
    # focal: each term scaled by (1 - p_t)^gamma
    p = logits.sigmoid()
    p_t = p * targets + (1 - p) * (1 - targets)
    terms = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    torch.testing.assert_close(SigmoidLoss("focal", gamma=2.0)(logits, targets), (terms * (1 - p_t) ** 2).mean())


def test_tuned_thresholds_reach_each_label_s_best_f1_and_a_target_precision() -> None:
    rng = np.random.default_rng(3)
    targets = (rng.random((200, 3)) < [0.5, 0.2, 0.05]).astype(int)
    probs = np.clip(targets * 0.3 + rng.random((200, 3)) * 0.7, 0, 1)
    tuned = tune_thresholds(probs, targets, ["a", "b", "c"], resamples=0)
    for label in range(3):
        candidates = np.unique(probs[:, label])
        best = max(f1_score(targets[:, label], probs[:, label] >= cut) for cut in candidates)
        assert f1_score(targets[:, label], probs[:, label] >= tuned[label]) == pytest.approx(best)
    precise = tune_thresholds(probs, targets, ["a", "b", "c"], target_precision=0.9, resamples=0)
    for label in range(3):
        decided = probs[:, label] >= precise[label]
        assert targets[decided, label].mean() >= 0.9
        lower = probs[:, label][probs[:, label] < precise[label]].max()
        assert targets[probs[:, label] >= lower, label].mean() < 0.9  # the lowest that reaches it


def test_small_validation_splits_bag_their_thresholds_over_bootstrap_resamples() -> None:
    rng = np.random.default_rng(4)
    targets = (rng.random((120, 2)) < [0.4, 0.15]).astype(int)
    probs = np.clip(targets * 0.35 + rng.random((120, 2)) * 0.65, 0, 1)
    draws = np.random.default_rng(7).integers(0, 120, (20, 120))
    by_resample = [tune_thresholds(probs[rows], targets[rows], ["a", "b"], resamples=0) for rows in draws]
    bagged = tune_thresholds(probs, targets, ["a", "b"], resamples=20, seed=7)
    np.testing.assert_array_equal(bagged, np.median(by_resample, axis=0))
    assert not np.array_equal(bagged, tune_thresholds(probs, targets, ["a", "b"], resamples=0))
    many = np.tile(probs, (50, 1)), np.tile(targets, (50, 1))  # 6,000 images: one tuning is stable enough
    np.testing.assert_array_equal(tune_thresholds(*many, ["a", "b"]), tune_thresholds(*many, ["a", "b"], resamples=0))


def test_mixup_mixes_multi_hot_targets_as_it_mixes_the_images() -> None:
    model = ImageClassifier(["a", "b", "c"], backbone="test_resnet", task="multilabel", mixup_alpha=1.0)
    images = torch.rand(5, 3, 8, 8)
    targets = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [0, 1, 1]])
    torch.manual_seed(0)
    mixed, soft = model._mix(images.clone(), targets)
    weight = float((mixed[0, 0, 0, 0] - images[3, 0, 0, 0]) / (images[0, 0, 0, 0] - images[3, 0, 0, 0]))
    torch.testing.assert_close(mixed[:4], weight * images[:4] + (1 - weight) * images[:4].flip(0))
    expected = weight * targets[:4].float() + (1 - weight) * targets[:4].flip(0).float()
    torch.testing.assert_close(soft, torch.cat([expected, targets[4:].float()]))  # the odd one out stays as it was
    assert 0 < weight < 1
