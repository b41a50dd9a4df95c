"""The split a model was trained on is recorded and kept: in checkpoints, in splits.csv, and by --data.splits."""

from __future__ import annotations

import hashlib
import shutil
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image

from classifier import ImageFolderDataModule, cli_main
from tests.helpers import read_csv, run_dir, save_image, tiny_config
from tests.test_data import make_folder

FAST = {"max_epochs": 1, "limit_train_batches": 1, "limit_val_batches": 1}


def fit(tmp_path: Path, data_dir: Path, *args: str, **data: object) -> Path:
    """One quick fit; returns its run folder."""
    config = tiny_config(tmp_path, data_dir, trainer=FAST, data=data)
    runs = sorted((tmp_path / "lightning_logs" / "tiny").glob("version_*"))
    cli_main(["fit", "--config", str(config), *args])
    return run_dir(tmp_path, len(runs))


def evaluated(run: Path) -> list[str]:
    return sorted(row["path"] for row in read_csv(run / "predictions.csv"))


def recorded(run: Path, data_dir: Path, split: str) -> list[str]:
    """Full paths of one split of a run's splits.csv."""
    return sorted(str(data_dir / row["path"]) for row in read_csv(run / "splits.csv") if row["split"] == split)


def newest_evaluation(tmp_path: Path) -> Path:
    """The folder of the latest validate or test run (under the run folder of the checkpoint it evaluated)."""
    evaluations = (tmp_path / "lightning_logs" / "tiny").glob("version_*/*/predictions.csv")
    return max(evaluations, key=lambda path: path.stat().st_mtime).parent


@pytest.fixture(scope="module")
def fitted(small_digits: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fit on a copy of the small digits; each test evaluates it on its own copy of that folder."""
    tmp_path = tmp_path_factory.mktemp("fitted")
    shutil.copytree(small_digits, tmp_path / "data")
    return fit(tmp_path, tmp_path / "data")


def copy_of_data(fitted: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(fitted.parents[2] / "data", tmp_path / "moved" / "data"))


@pytest.mark.slow
def test_test_and_validate_keep_the_held_out_images_after_files_are_added(
    digits_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The issue's repro: fit on the digits, copy 180 images under new names, test the same 270 images."""
    data_dir = Path(shutil.copytree(digits_dir, tmp_path / "digits"))
    run = fit(tmp_path, data_dir)
    assert len(recorded(run, data_dir, "test")) == 270
    originals = sorted(data_dir.glob("*/*.png"))[::9][:180]
    copies = [shutil.copy(path, path.with_name(f"copy_{path.name}")) for path in originals]
    best = run / "checkpoints" / "best.ckpt"
    with caplog.at_level("WARNING", logger="classifier"):
        cli_main(["test", "--ckpt_path", str(best)])
    assert evaluated(newest_evaluation(tmp_path)) == recorded(run, data_dir, "test")
    assert "180 images under" in caplog.text and f"--ckpt_path {best} --data.predict_dir" in caplog.text
    unlisted = newest_evaluation(tmp_path) / "unlisted_images.txt"
    assert sorted(unlisted.read_text().splitlines()) == sorted(str(Path(path).absolute()) for path in copies)
    cli_main(["validate", "--ckpt_path", str(best)])
    assert evaluated(newest_evaluation(tmp_path)) == recorded(run, data_dir, "val")


def test_splits_csv_and_checkpoint_record_paths_and_fingerprints(fitted: Path) -> None:
    data_dir = fitted.parents[2] / "data"
    rows = read_csv(fitted / "splits.csv")
    assert sorted(row["path"] for row in rows) == sorted(
        p.relative_to(data_dir).as_posix() for p in data_dir.rglob("*.png")
    )
    for row in rows:
        data = (data_dir / row["path"]).read_bytes()
        assert row["fingerprint"] == f"{len(data)}-{hashlib.blake2b(data, digest_size=8).hexdigest()}"
        assert row["label"] == Path(row["path"]).parent.name
    for name in ("best.ckpt", "last.ckpt"):
        checkpoint = torch.load(fitted / "checkpoints" / name, map_location="cpu", weights_only=True)
        table = zlib.decompress(checkpoint["ImageFolderDataModule"]["splits"]).decode()
        assert table == (fitted / "splits.csv").read_text()


def test_recorded_split_moves_with_the_folder(fitted: Path, tmp_path: Path) -> None:
    data_dir = copy_of_data(fitted, tmp_path)
    cli_main(["test", "--ckpt_path", str(fitted / "checkpoints" / "best.ckpt"), "--data.data_dir", str(data_dir)])
    assert evaluated(newest_evaluation(fitted.parents[2])) == recorded(fitted, data_dir, "test")


def test_missing_file_of_the_recorded_split_is_an_error_naming_it(fitted: Path, tmp_path: Path) -> None:
    data_dir = copy_of_data(fitted, tmp_path)
    gone = next(row["path"] for row in read_csv(fitted / "splits.csv") if row["split"] == "test")
    (data_dir / gone).unlink()
    best = fitted / "checkpoints" / "best.ckpt"
    with pytest.raises(FileNotFoundError, match=f"1 images of the test split recorded in checkpoint {best} are "
                       f"missing from {data_dir}:\n  {gone}\nRestore them"):  # fmt: skip
        cli_main(["test", "--ckpt_path", str(best), "--data.data_dir", str(data_dir)])


def test_changed_file_of_the_recorded_split_is_an_error_naming_it(fitted: Path, tmp_path: Path) -> None:
    data_dir = copy_of_data(fitted, tmp_path)
    val = [row["path"] for row in read_csv(fitted / "splits.csv") if row["split"] == "val"]
    Image.open(data_dir / val[0]).rotate(90).save(data_dir / val[0])  # same name, same size in pixels
    best = fitted / "checkpoints" / "best.ckpt"
    with pytest.raises(ValueError, match=f"1 images of the val split recorded in checkpoint {best} have changed "
                       rf"since \(their size or bytes differ\):\n  {val[0]}\n"):  # fmt: skip
        cli_main(["validate", "--ckpt_path", str(best), "--data.data_dir", str(data_dir)])


def test_resumed_fit_keeps_its_split_when_the_folder_changed(small_digits: Path, tmp_path: Path) -> None:
    data_dir = Path(shutil.copytree(small_digits, tmp_path / "data"))
    run = fit(tmp_path, data_dir)
    before = (run / "splits.csv").read_text()
    for path in sorted(data_dir.glob("*/*.png"))[::4]:
        shutil.copy(path, path.with_name(f"new_{path.name}"))
    last = run / "checkpoints" / "last.ckpt"
    cli_main(["fit", "--config", str(tmp_path / "tiny.yaml"), "--ckpt_path", str(last), "--trainer.max_epochs", "2"])
    assert (run / "splits.csv").read_text() == before  # the resumed run wrote into its own folder
    assert torch.load(last, map_location="cpu", weights_only=True)["epoch"] == 1


def test_splits_file_pins_the_split_across_runs_and_configs(fitted: Path, tmp_path: Path) -> None:
    data_dir = copy_of_data(fitted, tmp_path)
    run = fit(tmp_path, data_dir, "--data.splits", str(fitted / "splits.csv"), seed=11, val_fraction=0.3)
    assert (run / "splits.csv").read_text() == (fitted / "splits.csv").read_text()
    cli_main(["test", "--ckpt_path", str(run / "checkpoints" / "best.ckpt")])
    assert evaluated(newest_evaluation(tmp_path)) == recorded(fitted, data_dir, "test")


def test_splits_file_picks_the_fold_and_takes_absolute_paths(tmp_path: Path) -> None:
    data_dir = make_folder(tmp_path / "d", {"a": 12, "b": 9})
    folds = [ImageFolderDataModule(str(data_dir), num_folds=3, fold=k, test_fraction=0.2).splits for k in range(3)]
    table = tmp_path / "splits.csv"
    table.write_text(folds[0].to_csv())
    for k in range(3):
        pinned = ImageFolderDataModule(str(data_dir), num_folds=3, fold=k, seed=99, splits=str(table)).splits
        assert pinned.split.tolist() == folds[k].split.tolist()
    lines = table.read_text().splitlines()  # a hand-written table: absolute paths, no fold or fingerprint
    table.write_text("\n".join(["path,label,split"] + [f"{data_dir / ln.split(',')[0]},{ln.split(',')[1]},"
                                                       f"{ln.split(',')[2]}" for ln in lines[1:]]))  # fmt: skip
    pinned = ImageFolderDataModule(str(data_dir), splits=str(table)).splits
    assert pinned.subset("test") == folds[0].subset("test")


@pytest.mark.parametrize(
    "layout",
    [
        {"cat": 4, "dog": 4, "test": 4},  # a class named test
        {"train/a": 10, "train/b": 10, "test/a": 2, "test/b": 2, "c": 4},  # a class beside split folders
        {"train/a": 4, "train/b": 4, "val": 4},  # val/ holds images, as a class folder does
    ],
)
def test_class_folders_named_like_splits_are_refused(layout: dict[str, int], tmp_path: Path) -> None:
    make_folder(tmp_path / "d", layout)
    with pytest.raises(ValueError, match=f"{tmp_path / 'd'} has folders named .*: is .* a class or a split"):
        _ = ImageFolderDataModule(str(tmp_path / "d")).splits


def test_split_folders_of_class_folders_are_still_read(tmp_path: Path) -> None:
    make_folder(tmp_path / "d", {"train/a": 6, "train/b": 6, "val/a": 2, "val/b": 2, "test/a": 3, "test/b": 1})
    save_image(tmp_path / "d" / ".thumbnails" / "x.png", Image.new("RGB", (8, 8)))  # hidden folders do not count
    splits = ImageFolderDataModule(str(tmp_path / "d")).splits
    assert [splits.split.tolist().count(name) for name in ("train", "val", "test")] == [12, 4, 4]


def test_test_takes_an_explicit_split_file_over_the_checkpoints(fitted: Path, tmp_path: Path) -> None:
    data_dir = copy_of_data(fitted, tmp_path)
    trained_on = [row["path"] for row in read_csv(fitted / "splits.csv") if row["split"] == "train"][:5]
    table = tmp_path / "mine.csv"
    table.write_text("path,label,split\n" + "".join(f"{path},{Path(path).parent.name},test\n" for path in trained_on))
    best = fitted / "checkpoints" / "best.ckpt"
    cli_main(["test", "--ckpt_path", str(best), "--data.data_dir", str(data_dir), "--data.splits", str(table)])
    assert evaluated(newest_evaluation(fitted.parents[2])) == sorted(str(data_dir / path) for path in trained_on)


def test_checkpoint_without_a_split_table_warns_and_splits_the_folder(
    fitted: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    checkpoint = torch.load(fitted / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    del checkpoint["ImageFolderDataModule"]["splits"]  # as checkpoints written before split tables were
    old = run_dir(tmp_path, 0) / "checkpoints" / "old.ckpt"
    old.parent.mkdir(parents=True)
    torch.save(checkpoint, old)
    with caplog.at_level("WARNING", logger="classifier"):
        cli_main(["test", "--ckpt_path", str(old)])
    assert f"{old} records no split (it predates split tables)" in caplog.text
    assert evaluated(run_dir(tmp_path, 0) / "test") == recorded(fitted, fitted.parents[2] / "data", "test")


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ("path,label\na/000.png,a\n", "is not a split table: it needs the columns path,label,split"),
        ("path,label,split\n/elsewhere/a.png,a,test\n", "lists images outside --data.data_dir .*\n  /elsewhere/a.png"),
        ("path,label,split\na/000.png,a,test\na/000.png,a,train\n", "lists images more than once:\n  a/000.png"),
        ("path,label,split\na/000.png,a,holdout\n", r"has splits \['holdout'\]"),
        ("path,label,split\na/000.png,c,test\n", r"has labels \['c'\] that are not among the classes \['a', 'b'\]"),
    ],
)
def test_bad_splits_file_is_an_error_naming_it(table: str, message: str, tmp_path: Path) -> None:
    data_dir = make_folder(tmp_path / "d", {"a": 2, "b": 2})
    (tmp_path / "bad.csv").write_text(table)
    with pytest.raises(ValueError, match=f"--data.splits {tmp_path / 'bad.csv'} .*{message}"):
        _ = ImageFolderDataModule(str(data_dir), splits=str(tmp_path / "bad.csv"), classes=["a", "b"]).splits
