"""Splits, k-fold, layouts, classes and bad files, through the public datamodule and the CLI."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from classifier import ImageFolderDataModule, cli_main
from tests.helpers import run_dir, save_image, tiny_config


def make_folder(root: Path, counts: dict[str, int], size: int = 8) -> Path:
    """Class folders of small random PNGs, `counts[name]` images each."""
    rng = np.random.default_rng(0)
    for name, count in counts.items():
        for i in range(count):
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            save_image(root / name / f"{i:03d}.png", Image.fromarray(pixels))
    return root


def test_stratified_split_counts(tmp_path: Path) -> None:
    counts = {"a": 100, "b": 40, "c": 60}
    splits = ImageFolderDataModule(str(make_folder(tmp_path / "d", counts)), val_fraction=0.2, test_fraction=0.1).splits
    assert sorted(map(str, splits.paths)) == [str(p) for p in splits.paths]
    assert Counter(splits.split.tolist()) == {"train": 140, "val": 40, "test": 20}
    for index, total in enumerate(counts.values()):
        in_class = splits.labels == index
        assert abs((splits.split[in_class] == "test").sum() - 0.1 * total) <= 1
        assert abs((splits.split[in_class] == "val").sum() - 0.2 * total) <= 1
    assert splits.class_counts() == [int(((splits.labels == i) & (splits.split == "train")).sum()) for i in range(3)]


def test_kfold_folds_are_disjoint_covering_stratified_with_one_test_split(tmp_path: Path) -> None:
    data_dir = str(make_folder(tmp_path / "d", {"a": 50, "b": 25, "c": 35}))
    folds = [ImageFolderDataModule(data_dir, num_folds=5, fold=k, test_fraction=0.2).splits for k in range(5)]
    test_sets = [{str(p) for p, s in zip(f.paths, f.split, strict=True) if s == "test"} for f in folds]
    assert all(test == test_sets[0] for test in test_sets) and len(test_sets[0]) == 22
    val_sets = [{str(p) for p, s in zip(f.paths, f.split, strict=True) if s == "val"} for f in folds]
    everything = {str(p) for p in folds[0].paths}
    assert set().union(*val_sets) == everything - test_sets[0]
    assert sum(len(v) for v in val_sets) == len(everything) - len(test_sets[0])  # disjoint
    for k, fold in enumerate(folds):
        val_counts = np.bincount(fold.labels[fold.split == "val"], minlength=3)
        non_test = np.bincount(fold.labels[fold.split != "test"], minlength=3)
        assert np.all(np.abs(val_counts - non_test / 5) <= 1)
        assert set(fold.fold[fold.split == "val"]) == {k}


def test_kfold_writes_fold_column(small_digits: Path, tmp_path: Path) -> None:
    config = tiny_config(tmp_path, small_digits, data={"num_folds": 4, "fold": 2}, trainer={"max_epochs": 1})
    cli_main(["fit", "--config", str(config)])
    lines = (run_dir(tmp_path, 0) / "splits.csv").read_text().splitlines()
    assert lines[0] == "path,label,split,fold,fingerprint"
    rows = [line.split(",") for line in lines[1:]]
    assert all((row[2] == "val") == (row[3] == "2") for row in rows)
    assert all((row[2] == "test") == (row[3] == "") for row in rows)


def test_split_folders_are_used_and_missing_val_is_carved(tmp_path: Path) -> None:
    make_folder(tmp_path / "d" / "train", {"cat": 30, "dog": 30})
    make_folder(tmp_path / "d" / "test", {"cat": 5, "dog": 4})
    splits = ImageFolderDataModule(str(tmp_path / "d"), val_fraction=0.2).splits
    assert Counter(splits.split.tolist()) == {"train": 48, "val": 12, "test": 9}
    assert all(("test" in p.parts) == (s == "test") for p, s in zip(splits.paths, splits.split, strict=True))


def test_class_only_in_val_is_an_error_naming_the_folder(tmp_path: Path) -> None:
    make_folder(tmp_path / "d" / "train", {"cat": 3})
    make_folder(tmp_path / "d" / "val", {"cat": 2, "fox": 2})
    with pytest.raises(ValueError, match=str(tmp_path / "d" / "val" / "fox")):
        _ = ImageFolderDataModule(str(tmp_path / "d")).class_names


def test_empty_class_folder_is_an_error_naming_it(tmp_path: Path) -> None:
    make_folder(tmp_path / "d", {"cat": 5})
    (tmp_path / "d" / "dog").mkdir()
    (tmp_path / "d" / "dog" / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match=f"class folder {tmp_path / 'd' / 'dog'} holds no images"):
        _ = ImageFolderDataModule(str(tmp_path / "d")).class_names


def test_missing_data_dir_is_an_error_naming_it(tmp_path: Path) -> None:
    config = tiny_config(tmp_path, tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=f"--data.data_dir {tmp_path / 'nowhere'} does not exist"):
        cli_main(["fit", "--config", str(config)])


def test_unknown_backbone_suggests_close_names(small_digits: Path, tmp_path: Path) -> None:
    config = tiny_config(tmp_path, small_digits)
    with pytest.raises(ValueError, match="'resnet19' is not a timm model. Did you mean: .*resnet18"):
        cli_main(["fit", "--config", str(config), "--model.backbone", "resnet19"])


def test_extensions_any_case_and_junk_files_ignored(tmp_path: Path) -> None:
    make_folder(tmp_path / "d", {"a": 4, "b": 4})
    pixel = Image.new("RGB", (8, 8), "red")
    save_image(tmp_path / "d" / "a" / "UPPER.PNG", pixel)
    save_image(tmp_path / "d" / "a" / "mixed.JpEg", pixel)
    save_image(tmp_path / "d" / "a" / "._resource_fork.png", pixel)
    save_image(tmp_path / "d" / "a" / ".ipynb_checkpoints" / "copy.png", pixel)
    (tmp_path / "d" / "a" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (tmp_path / "d" / "b" / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (tmp_path / "d" / ".hidden_class").mkdir()
    splits = ImageFolderDataModule(str(tmp_path / "d"), val_fraction=0, test_fraction=0).splits
    names = sorted(p.name for p in splits.paths)
    assert splits.classes == ["a", "b"]
    assert "UPPER.PNG" in names and "mixed.JpEg" in names and len(names) == 10


def broken_files(root: Path) -> list[Path]:
    """A truncated JPEG and a text file posing as a PNG, among good images."""
    make_folder(root, {"a": 10, "b": 10})
    truncated = save_image(root / "a" / "truncated.jpg", Image.new("RGB", (64, 64), "blue"), quality=95)
    truncated.write_bytes(truncated.read_bytes()[:300])
    fake = root / "b" / "fake.png"
    fake.write_text("this is not an image")
    return [truncated, fake]


def test_unreadable_files_are_listed_before_training(tmp_path: Path) -> None:
    bad = broken_files(tmp_path / "d")
    config = tiny_config(tmp_path, tmp_path / "d", data={"val_fraction": 0.0, "test_fraction": 0.0})
    with pytest.raises(ValueError, match="2 of 22 images cannot be read") as error:
        cli_main(["fit", "--config", str(config)])
    for path in bad:
        assert str(path) in str(error.value)
    assert "truncated" in str(error.value) and "UnidentifiedImageError" in str(error.value)
    assert not (run_dir(tmp_path, 0) / "checkpoints").exists()  # nothing trained
    assert bad[1].read_text() == "this is not an image"  # nothing touched


def test_skip_bad_images_warns_with_a_count(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    bad = broken_files(tmp_path / "d")
    datamodule = ImageFolderDataModule(
        str(tmp_path / "d"), val_fraction=0.0, test_fraction=0.0, skip_bad_images=True, image_size=8, num_workers=0
    )
    with caplog.at_level("WARNING"):
        datamodule.setup("fit")
    assert "Skipping 2 unreadable images of 22" in caplog.text
    assert len(datamodule.datasets["train"]) == 20
    assert not set(bad) & set(datamodule.datasets["train"].paths)


def test_loader_yields_uint8_and_device_hook_normalises(tmp_path: Path) -> None:
    make_folder(tmp_path / "d", {"a": 6, "b": 6})
    datamodule = ImageFolderDataModule(
        str(tmp_path / "d"), backbone="resnet18", image_size=16, batch_size=4, num_workers=0, test_fraction=0
    )
    datamodule.setup("fit")
    images, targets, rows = next(iter(datamodule.val_dataloader()))
    assert images.dtype == torch.uint8 and images.shape[1:] == (3, 16, 16)
    mean = torch.tensor(datamodule.data_config["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(datamodule.data_config["std"]).view(1, 3, 1, 1)
    normalised, _, _ = datamodule.on_after_batch_transfer((images, targets, rows), 0)
    assert normalised.dtype == torch.float32
    torch.testing.assert_close(normalised, (images / 255.0 - mean) / std)


def test_stage_without_its_split_is_an_error(tmp_path: Path) -> None:
    make_folder(tmp_path / "d", {"a": 5, "b": 5})
    datamodule = ImageFolderDataModule(str(tmp_path / "d"), val_fraction=0.0, test_fraction=0.0)
    for stage, split in (("validate", "val"), ("test", "test")):
        with pytest.raises(ValueError, match=f"{tmp_path / 'd'} has no {split} split"):
            datamodule.setup(stage)


def test_predict_dir_is_searched_recursively(tmp_path: Path) -> None:
    for path in ("x.png", "deep/er/y.JPG", "deep/.cache/z.png"):
        save_image(tmp_path / "photos" / path, Image.new("RGB", (8, 8)))
    datamodule = ImageFolderDataModule(predict_dir=str(tmp_path / "photos"), classes=["a", "b"], image_size=8)
    datamodule.setup("predict")
    assert sorted(p.name for p in datamodule.paths("predict")) == ["x.png", "y.JPG"]


def test_predict_with_nothing_readable_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    datamodule = ImageFolderDataModule(predict_dir=str(tmp_path / "empty"), classes=["a"], image_size=8)
    with pytest.raises(ValueError, match=f"--data.predict_dir {tmp_path / 'empty'} holds no images"):
        datamodule.setup("predict")
    (tmp_path / "junk" / "x.png").parent.mkdir()
    (tmp_path / "junk" / "x.png").write_text("junk")
    datamodule = ImageFolderDataModule(predict_dir=str(tmp_path / "junk"), classes=["a"], image_size=8)
    with pytest.raises(ValueError, match=f"none of the 1 images .* can be read:\n  {tmp_path / 'junk' / 'x.png'}: "):
        datamodule.setup("predict")


def test_copying_a_folder_does_not_change_the_split(tmp_path: Path) -> None:
    make_folder(tmp_path / "d", {"a": 20, "b": 20})
    shutil.copytree(tmp_path / "d", tmp_path / "e")
    first = ImageFolderDataModule(str(tmp_path / "d"), seed=5).splits
    second = ImageFolderDataModule(str(tmp_path / "e"), seed=5).splits
    assert [p.name for p in first.paths] == [p.name for p in second.paths]
    assert first.split.tolist() == second.split.tolist()


def test_bad_files_of_train_and_val_are_listed_in_one_error(tmp_path: Path) -> None:
    train, val = broken_files(tmp_path / "d" / "train"), broken_files(tmp_path / "d" / "val")
    config = tiny_config(tmp_path, tmp_path / "d", data={"test_fraction": 0.0})
    with pytest.raises(ValueError, match="4 of 44 images cannot be read") as error:
        cli_main(["fit", "--config", str(config)])
    assert all(str(path) in str(error.value) for path in train + val)  # fixed in one round, not one split a time
