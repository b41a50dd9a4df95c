"""An export never leaves a bad model where a server looks: a failed re-export keeps the previous good one, no file
of an earlier export stays, `--check auto` checks the recorded test split or fails naming what is missing, and the
parity check samples a large split instead of loading it whole."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from classifier.cli.entry import main
from classifier.deploy.parity import sample
from classifier.serve.backends import load_backend
from tests.helpers import read_csv

pytest.importorskip("onnxruntime")


def export(*args: str) -> None:
    main(["export", *args])


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_failed_re_export_keeps_the_good_one_and_serve_refuses_the_failed_one(
    trained_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "export"
    export("--ckpt_path", str(trained_checkpoint), "--output", str(out), "--quantize", "int8")
    good = {name: digest(out / name) for name in ("model.onnx", "model.int8.onnx", "parity.json", "preprocess.json")}

    monkeypatch.setattr("classifier.deploy.parity.MAX_ABS_DIFF", 0.0)  # no float computation is exact: it fails
    with pytest.raises(SystemExit) as stopped:
        export("--ckpt_path", str(trained_checkpoint), "--output", str(out))
    assert stopped.value.code == 2
    assert f"{out} is unchanged" in capsys.readouterr().err
    assert {name: digest(out / name) for name in good} == good  # the previous export, as it was
    failed = tmp_path / "export.failed"
    assert json.loads((failed / "parity.json").read_text())["passed"] is False
    assert not [path.name for path in tmp_path.iterdir() if path.name.startswith(".")]  # no staging folder left
    with pytest.raises(ValueError, match=r"failed its parity check .*--allow_failed_parity"):
        load_backend(failed / "model.onnx")
    assert (
        load_backend(failed / "model.onnx", allow_failed_parity=True).class_names
        == load_backend(out / "model.onnx").class_names
    )

    monkeypatch.undo()
    export("--ckpt_path", str(trained_checkpoint), "--output", str(out))  # without --quantize this time
    assert sorted(path.name for path in out.iterdir()) == ["model.onnx", "parity.json", "preprocess.json"]


def test_check_auto_fails_naming_a_missing_test_image_and_random_is_asked_for(
    trained_checkpoint: Path, small_digits: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    data = shutil.copytree(small_digits, tmp_path / "digits")
    splits = read_csv(trained_checkpoint.parents[1] / "splits.csv")
    gone = next(row["path"] for row in splits if row["split"] == "test")
    (data / gone).unlink()
    with pytest.raises(SystemExit) as stopped:
        export("--ckpt_path", str(trained_checkpoint), "--output", str(tmp_path / "out"), "--data_dir", str(data))
    assert stopped.value.code != 0
    error = capsys.readouterr().err
    assert f"--check auto: the test split of {trained_checkpoint} cannot be checked" in error and gone in error
    assert not (tmp_path / "out").exists()

    export("--ckpt_path", str(trained_checkpoint), "--output", str(tmp_path / "random"), "--check", "random")
    parity = json.loads((tmp_path / "random" / "parity.json").read_text())
    assert parity["images"] == "32 random images" and parity["passed"]


def test_parity_checks_a_stratified_sample_of_a_large_split(trained_checkpoint: Path, tmp_path: Path) -> None:
    export("--ckpt_path", str(trained_checkpoint), "--output", str(tmp_path / "out"), "--check_images", "10")
    parity = json.loads((tmp_path / "out" / "parity.json").read_text())
    assert parity["count"] == 10 and "a stratified 10 of 30 images" in parity["images"] and parity["passed"]

    paths = [Path(f"{i}.png") for i in range(100)]
    labels = [0] * 80 + [1] * 15 + [2] * 5
    chosen, chosen_labels = sample(paths, labels, 20)
    assert [chosen_labels.count(label) for label in (0, 1, 2)] == [16, 3, 1]  # the shares kept, every class in
    assert chosen == sorted(set(chosen), key=paths.index)  # in order, none twice
    assert sample(paths, labels, 100) == (paths, labels)


def test_int8_calibrated_on_the_images_it_is_scored_on_is_flagged(
    trained_checkpoint: Path, small_digits: Path, tmp_path: Path
) -> None:
    checkpoint = torch.load(trained_checkpoint, weights_only=True)
    del checkpoint["ImageFolderDataModule"]  # no train split to calibrate on: the --check images are used
    torch.save(checkpoint, unsplit := tmp_path / "unsplit.ckpt")
    out = tmp_path / "out"
    export("--ckpt_path", str(unsplit), "--output", str(out), "--check", str(small_digits), "--quantize", "int8")
    int8 = json.loads((out / "parity.json").read_text())["int8"]
    assert int8["calibrated_on_scored_images"] is True and int8["calibration"] == "200 --check images"
