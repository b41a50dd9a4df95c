"""Bad input: hostile and truncated checkpoints, hostile and odd image files and folders, and config mistakes each end
in an error that names the file or option (exit status 2), or in a documented behaviour; nothing is loaded or decoded
that could run code or exhaust memory."""

from __future__ import annotations

import builtins
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from classifier.cli import entry
from classifier.cli.entry import cli_main, main
from classifier.core.console import DEBUG_HINT
from classifier.data.datamodule import ImageFolderDataModule
from classifier.deploy.predictor import Predictor
from tests.helpers import REPO, classifier_here, read_csv, run_dir, tiny_config

HELP = "`classifier fit --help` lists every option."
BIG = 9500  # 9500 x 9500 = 90,250,000 pixels: over PIL's MAX_IMAGE_PIXELS (89,478,485), under the twice it refuses


def write_class(folder: Path, names: list[str], shade: int) -> None:
    """Real 12 px RGB PNGs of one class: noise around a class-specific shade."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(shade)
    for name in names:
        pixels = np.clip(rng.normal(shade, 30, (12, 12, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / name)


def write_folder(root: Path, counts: dict[str, int]) -> Path:
    for index, (name, count) in enumerate(counts.items()):
        write_class(root / name, [f"{i}.png" for i in range(count)], 40 + 80 * index)
    return root


def bomb_png(path: Path, side: int, rows: int) -> Path:
    """A PNG whose header claims side x side RGB pixels, with `rows` of them (all black) in its data stream."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    compressor = zlib.compressobj(6)
    row = bytes(1 + 3 * side)  # filter byte, then RGB
    data = b"".join(compressor.compress(row) for _ in range(rows)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b""))
    return path


class RunsCode:
    """Unpickling this calls `exec`, which creates the marker file: what a hostile checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return builtins.exec, (f"open({str(self.marker)!r}, 'w').close()",)


def run_main(args: list[str]) -> tuple[int, list[str]]:
    """The command's exit status and the lines it wrote to stderr."""
    done = classifier_here(*args)
    return done.returncode, done.stderr.splitlines()


def test_pickles_that_would_run_code_are_refused_by_every_command(small_digits: Path, tmp_path: Path) -> None:
    marker = tmp_path / "code_ran"
    hostile = {"state_dict": {"net.w": torch.zeros(2)}, "payload": RunsCode(marker)}
    torch.save(hostile, zipped := tmp_path / "hostile.ckpt")
    torch.save(hostile, legacy := tmp_path / "legacy.ckpt", _use_new_zipfile_serialization=False)
    (plain := tmp_path / "plain.pth").write_bytes(pickle.dumps(hostile))
    config = tiny_config(tmp_path, small_digits, trainer={"max_epochs": 1})
    images = str(small_digits / "0")

    def refusal(option: str, path: Path) -> str:
        if path == plain:  # torch.load finds no torch.save header and stops at the first opcode it does not take
            return (
                f"error: {option} {path} is not a readable checkpoint ({path.stat().st_size} bytes): cut short by an "
                "unfinished save or copy, or not written by torch.save (UnpicklingError: Unsupported operand 149)"
            )
        return (
            f"error: {option} {path} holds pickled objects other than tensors and plain data (it calls exec), which "
            "could run code when loaded, so it was not loaded. Use a checkpoint written by `classifier fit`, or "
            "weights saved as .safetensors or as a state dict of tensors"
        )

    for path in (zipped, legacy, plain):
        for args in (
            ["fit", "--config", str(config), "--ckpt_path", str(path)],
            ["test", "--ckpt_path", str(path)],
            ["predict", "--ckpt_path", str(path), "--data.predict_dir", images],
            ["calibrate", "--ckpt_path", str(path)],
            ["export", "--ckpt_path", str(path), "--output", str(tmp_path / "export")],
        ):
            assert run_main(args) == (2, [refusal("--ckpt_path", path), DEBUG_HINT]), args
        assert run_main(["serve", "--model", str(path)]) == (
            2,
            [refusal("checkpoint", path), DEBUG_HINT],
        )
        with pytest.raises(ValueError) as error:
            Predictor.from_checkpoint(path)
        assert f"error: {error.value}" == refusal("checkpoint", path)
        status, lines = run_main(["fit", "--config", str(config), "--model.pretrained", str(path)])
        assert (status, lines[-2:]) == (2, [refusal("--model.pretrained", path), DEBUG_HINT])
    assert not marker.exists()
    assert sorted(path.name for path in tmp_path.rglob("*.ckpt")) == ["hostile.ckpt", "legacy.ckpt"]  # none written


def test_a_truncated_or_empty_checkpoint_is_one_line(
    trained_checkpoint: Path, small_digits: Path, tmp_path: Path
) -> None:
    data = trained_checkpoint.read_bytes()
    (half := tmp_path / "half.ckpt").write_bytes(data[: len(data) // 2])
    (empty := tmp_path / "empty.ckpt").write_bytes(b"")
    config = tiny_config(tmp_path, small_digits)
    for args in (
        ["test", "--ckpt_path", str(half)],
        ["fit", "--config", str(config), "--ckpt_path", str(half)],
        ["calibrate", "--ckpt_path", str(half)],
    ):
        status, lines = run_main(args)
        assert status == 2 and len(lines) == 2 and lines[1] == DEBUG_HINT
        assert lines[0].startswith(
            f"error: --ckpt_path {half} is not a readable checkpoint ({len(data) // 2} bytes): cut short by an "
            "unfinished save or copy, or not written by torch.save (RuntimeError: PytorchStreamReader failed"
        )
    status, lines = run_main(["test", "--ckpt_path", str(empty)])
    assert (status, lines) == (
        2,
        [
            f"error: --ckpt_path {empty} is empty (0 bytes): a save or copy that never wrote? Use another file",
            DEBUG_HINT,
        ],
    )
    with pytest.raises(ValueError, match=f"^checkpoint {half} is not a readable checkpoint"):
        Predictor.from_checkpoint(half)
    assert not (tmp_path / "lightning_logs").exists()  # refused before any run folder was made
    status, lines = run_main(["fit", "--config", str(config), "--model.pretrained", str(half)])
    assert status == 2 and lines[-2].startswith(f"error: --model.pretrained {half} is not a readable checkpoint")


BOMB_PROBE = r"""
import json, re, sys
from pathlib import Path
from PIL import Image
from classifier.core.imageio import load_rgb
# this process's peak resident memory in KiB (getrusage's ru_maxrss would include the parent's, from before exec)
peak = lambda: int(re.search(r"VmHWM:\s*(\d+) kB", Path("/proc/self/status").read_text())[1])
before = peak()
refusals = []
for path in sys.argv[1:]:
    try:
        load_rgb(Path(path))
        refusals.append("decoded")
    except Image.DecompressionBombError as error:
        refusals.append(str(error))
refused = peak() - before
Image.MAX_IMAGE_PIXELS = None  # the reference: what decoding the smaller bomb costs without the limit
load_rgb(Path(sys.argv[2]))
print(json.dumps({"refusals": refusals, "refused_kib": refused, "decoded_kib": peak() - before}))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the peak memory from Linux's /proc")
def test_decompression_bombs_are_refused_from_their_header_without_memory(tmp_path: Path) -> None:
    huge = bomb_png(tmp_path / "huge.png", 30_000, rows=1)  # over twice the limit: PIL itself refuses it
    big = bomb_png(tmp_path / "big.png", BIG, rows=BIG)  # complete and valid: PIL would warn, then decode it
    assert huge.stat().st_size < 200 and big.stat().st_size < 300_000
    probe = subprocess.run(
        [sys.executable, "-c", BOMB_PROBE, str(huge), str(big)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=120,
    )
    assert probe.returncode == 0, probe.stderr[-3000:]
    report = json.loads(probe.stdout)
    limit = "over the limit of 89478485 (PIL.Image.MAX_IMAGE_PIXELS): not decoded, as it could be a decompression bomb"
    assert report["refusals"] == [f"900000000 pixels, {limit}", f"9500x9500 = 90250000 pixels, {limit}"]
    assert report["decoded_kib"] > 200_000  # the reference decode shows in the peak...
    assert report["refused_kib"] < 20_000  # ...and the two refusals did not


@pytest.mark.parametrize("cache", ["none", "ram"])
def test_the_ram_cache_reports_bad_files_as_the_decode_check_does(tmp_path: Path, cache: str) -> None:
    data = write_folder(tmp_path / "data", {"a": 4, "b": 4})
    (data / "a" / "empty.jpg").write_bytes(b"")
    (data / "b" / "moved.png").symlink_to("../gone.png")
    bomb_png(data / "b" / "huge.png", 30_000, rows=1)
    datamodule = ImageFolderDataModule(str(data), backbone="test_resnet", image_size=32, val_fraction=0.0,
                                       test_fraction=0.0, num_workers=0, cache=cache)  # fmt: skip
    with pytest.raises(ValueError) as error:
        datamodule.setup("fit")
    assert str(error.value).splitlines() == [
        "3 of 11 images cannot be read:",
        f"  {data / 'a' / 'empty.jpg'}: empty file (0 bytes)",
        f"  {data / 'b' / 'huge.png'}: DecompressionBombError: 900000000 pixels, over the limit of 89478485 "
        "(PIL.Image.MAX_IMAGE_PIXELS): not decoded, as it could be a decompression bomb",
        f"  {data / 'b' / 'moved.png'}: FileNotFoundError: a broken symbolic link to ../gone.png",
        "Fix or remove them, or pass --data.skip_bad_images true to leave them out.",
    ]


def without_permission_override() -> list[str]:
    """A prefix that runs a command subject to file permissions: as root, without the capabilities that bypass them
    (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH), which `setpriv` drops from the process and everything it runs."""
    if os.geteuid() != 0:
        return []
    caps = "-dac_override,-dac_read_search"
    prefix = [shutil.which("setpriv") or "setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}"]
    try:
        subprocess.run([*prefix, "true"], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as error:
        pytest.skip(f"running as root, which reads any file, and setpriv cannot drop that ability here: {error}")
    return prefix


@pytest.mark.slow
def test_odd_files_and_names_in_a_training_folder(tmp_path: Path) -> None:
    prefix = without_permission_override()
    data = tmp_path / "-my photos ü"  # a leading dash, a space and a non-ASCII letter, in every part of the path
    classes = ["-c", "a b", "ünï"]  # in index order
    for index, name in enumerate(classes):
        write_class(data / "train" / name, [f"-{name} {i} ü.png" for i in range(6)], 40 + 80 * index)
        write_class(data / "val" / name, ["v 0.png", "v 1.png"], 40 + 80 * index)
        if name != "ünï":  # a class that the test split lacks
            write_class(data / "test" / name, ["t 0.png", "t 1.png"], 40 + 80 * index)
    train = data / "train"
    bomb_png(train / "a b" / "huge.png", 30_000, rows=1)
    bomb_png(train / "a b" / "big.png", BIG, rows=BIG)
    (train / "ünï" / "empty.jpg").write_bytes(b"")
    (train / "ünï" / "notes.jpg").write_text("not an image\n")
    shutil.copy(train / "-c" / "--c 0 ü.png", locked := train / "-c" / "locked.png")
    locked.chmod(0)
    (train / "-c" / "loop.jpg").symlink_to("loop.jpg")
    (train / "-c" / "moved.png").symlink_to("../gone.png")
    config = tiny_config(tmp_path, data, trainer={"max_epochs": 1}, data={"batch_size": 8})

    def fit(*flags: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*prefix, sys.executable, "-m", "classifier", "fit", "--config", str(config), *flags],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            timeout=300,
        )

    limit = "over the limit of 89478485 (PIL.Image.MAX_IMAGE_PIXELS): not decoded, as it could be a decompression bomb"
    reasons = {
        train / "-c" / "locked.png": f"PermissionError: [Errno 13] Permission denied: '{locked}'",
        train
        / "-c"
        / "loop.jpg": f"OSError: [Errno 40] Too many levels of symbolic links: '{train / '-c' / 'loop.jpg'}'",
        train / "-c" / "moved.png": "FileNotFoundError: a broken symbolic link to ../gone.png",
        train / "a b" / "big.png": f"DecompressionBombError: 9500x9500 = 90250000 pixels, {limit}",
        train / "a b" / "huge.png": f"DecompressionBombError: 900000000 pixels, {limit}",
        train / "ünï" / "empty.jpg": "empty file (0 bytes)",
        train
        / "ünï"
        / "notes.jpg": f"UnidentifiedImageError: cannot identify image file '{train / 'ünï' / 'notes.jpg'}'",
    }
    listing = [f"  {path}: {reason}" for path, reason in reasons.items()]
    stopped = fit()
    assert stopped.returncode == 2, stopped.stderr[-3000:]
    lines = stopped.stderr.splitlines()
    assert lines[lines.index("error: 7 of 31 images cannot be read:") :] == [
        "error: 7 of 31 images cannot be read:",
        *listing,
        "Fix or remove them, or pass --data.skip_bad_images true to leave them out.",
        DEBUG_HINT,
    ]
    assert "Traceback" not in stopped.stderr
    left = list(run_dir(tmp_path, 0).iterdir())  # the logger's folder for the run that stopped: no checkpoint
    assert len(left) == 1 and left[0].name.startswith("events.out.tfevents")

    done = fit("--data.skip_bad_images", "true")
    assert done.returncode == 0, done.stderr[-3000:]
    assert (
        f"{data / 'test'} holds no folder for 1 of the 3 classes (ünï): its scores cannot measure them." in done.stderr
    )
    assert "\n".join(["Skipping 7 unreadable images of 31:", *listing]) in done.stderr
    run = run_dir(tmp_path, 1)
    checkpoint = torch.load(run / "checkpoints" / "best.ckpt", weights_only=True)
    assert checkpoint["net"]["class_names"] == checkpoint["datamodule_hyper_parameters"]["classes"] == classes
    rows = read_csv(run / "splits.csv")
    assert len(rows) == 25 + 6 + 4  # the split table lists the skipped files too, as the folder holds them
    assert all(row["label"] == Path(row["path"]).parts[1] for row in rows)  # each file under its own class
    assert {row["split"] for row in rows} == {"train", "val", "test"}

    locked.chmod(0o644)  # the test run, as root, reads the test split only: 4 images of classes 0 and 1
    cli_main(["test", "--ckpt_path", str(run / "checkpoints" / "best.ckpt")])
    tested = read_csv(run / "test" / "predictions.csv")
    assert sorted((Path(row["path"]).parent.name, row["target"]) for row in tested) == [
        ("-c", "-c"),
        ("-c", "-c"),
        ("a b", "a b"),
        ("a b", "a b"),
    ]
    assert list(tested[0])[-3:] == [f"prob_{name}" for name in classes]

    new = tmp_path / "-new ü"
    write_class(new, ["-x 1.png"], 200)
    (new / "empty ü.jpg").write_bytes(b"")
    output = tmp_path / "-predictions ü.csv"
    cli_main(["predict", "--ckpt_path", str(run / "checkpoints" / "best.ckpt"), f"--data.predict_dir={new}",
              f"--predictions.output={output}"])  # fmt: skip
    predicted = {row["path"]: row["status"] for row in read_csv(output)}
    assert predicted == {str(new / "-x 1.png"): "ok", str(new / "empty ü.jpg"): "error: empty file (0 bytes)"}


def test_class_folder_mistakes_say_what_to_do(tmp_path: Path) -> None:
    def fit(data: Path) -> list[str]:
        status, lines = run_main(["fit", "--config", str(tiny_config(tmp_path, data))])
        assert status == 2 and lines[-1] == DEBUG_HINT and "Traceback" not in "\n".join(lines)
        return lines[-2]

    empty = write_folder(tmp_path / "empty", {"a": 8, "b": 8})
    (empty / "c").mkdir()
    (empty / "c" / "notes.txt").write_text("no images here")
    assert fit(empty) == (
        f"error: class folder {empty / 'c'} holds no images (looked for .bmp, .gif, .jpeg, .jpg, .pgm, .png, .ppm, "
        ".tif, .tiff, .webp, in any case): add its images, or remove the folder"
    )
    one = write_folder(tmp_path / "one", {"a": 8, "b": 8, "solo": 1})
    assert fit(one) == (
        f"error: cannot carve a stratified test split from {one}: a class needs 2 images left for it, one to train on "
        "and one to test, and these have 1: solo. Add images to them, remove their folders, or give the test images "
        "yourself in a test/ folder beside train/ (or --data.test_fraction 0)"
    )
    extra = tmp_path / "extra"
    write_folder(extra / "train", {"a": 8, "b": 8})
    write_folder(extra / "val", {"a": 2, "d": 2})
    assert fit(extra) == (
        f"error: class folder {extra / 'val' / 'd'} is not one of the 2 training classes (a, b): add "
        f"{extra / 'train' / 'd'}/ with training images, or remove or rename the folder"
    )
    assert not list(tmp_path.rglob("*.ckpt"))


def test_config_mistakes_end_with_status_2_and_one_line(small_digits: Path, tmp_path: Path) -> None:
    config = str(tiny_config(tmp_path, small_digits))
    missing = tmp_path / "my photos"
    cases = {
        ("--trainer.max_epohcs", "3"): [
            "error: unrecognized arguments: --trainer.max_epohcs 3 (--trainer.max_epohcs: did you mean "
            "--trainer.max_epochs or --trainer.max_steps or --trainer.min_epochs?)",
            HELP,
        ],
        ("--trainer.max_epochs", "ten"): ["error: --trainer.max_epochs ten: expected int or null", HELP],
        ("--data.sampler", "balance"): ["error: --data.sampler balance: expected one of 'random', 'balanced'", HELP],
        ("--data.data_dir", "-photos"): [
            "error: argument --data.data_dir: expected one argument (a value that starts with '-' goes as "
            "--data.data_dir=VALUE)",
            HELP,
        ],
        ("--data.data_dir", str(missing)): [
            f"error: --data.data_dir {missing} does not exist: point it at a folder of class subfolders",
            DEBUG_HINT,
        ],
        ("--ckpt_path", str(tmp_path / "gone.ckpt")): [
            f"error: --ckpt_path {tmp_path / 'gone.ckpt'} does not exist",
            DEBUG_HINT,
        ],  # fmt: skip
    }
    for flags, expected in cases.items():
        status, lines = run_main(["fit", "--config", config, *flags])
        assert (status, lines[-2:]) == (2, expected), flags
        assert [line for line in lines if line.startswith("error:")] == expected[:1]
    status, lines = run_main(["fit", "--config", config, "--model.backbone", "resnet5O"])
    assert status == 2 and lines[-1] == DEBUG_HINT
    assert lines[-2].startswith("error: --model.backbone 'resnet5O' is not a timm model. Did you mean: resnet50")
    status, lines = run_main(["test", "--ckpt_path", str(tmp_path / "gone.ckpt")])
    assert (status, lines) == (2, [f"error: --ckpt_path {tmp_path / 'gone.ckpt'} does not exist", DEBUG_HINT])
    assert not (tmp_path / "lightning_logs").exists()


def test_debug_shows_the_traceback_of_any_error_and_bugs_always_show_theirs(
    small_digits: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = str(tiny_config(tmp_path, small_digits))
    missing = tmp_path / "my photos"
    for debug in (["--debug"], ["--verbose"]):
        status, lines = run_main(["fit", *debug, "--config", config, "--data.data_dir", str(missing)])
        assert status == 2 and "Traceback (most recent call last):" in lines
        assert lines[-1] == f"FileNotFoundError: --data.data_dir {missing} does not exist: point it at a folder of " \
            "class subfolders"  # fmt: skip
    status, lines = run_main(["fit", "--config", config, "--trainer.max_epochs", "ten", "--debug"])
    assert status == 2 and "Traceback (most recent call last):" in lines
    assert 'argparse.ArgumentError: Parser key "trainer.max_epochs":' in lines and lines[-1] == "  Given value: ten"
    assert "CLASSIFIER_DEBUG" not in os.environ  # main set it for the run only

    def broken(args: list[str]) -> None:
        raise KeyError("a bug, not a user's mistake")

    monkeypatch.setattr(entry, "cli_main", broken)
    with pytest.raises(KeyError, match="a bug"):  # not caught: Python prints its traceback and exits with 1
        main(["fit", "--config", config])


@pytest.mark.slow
def test_the_real_command_exits_2_without_a_traceback_unless_asked(small_digits: Path, tmp_path: Path) -> None:
    config = str(tiny_config(tmp_path, small_digits))
    missing = tmp_path / "my photos"

    def classifier(*args: str, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "classifier", *args],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(REPO), **env},
            timeout=300,
        )

    plain = classifier("fit", "--config", config, "--data.data_dir", str(missing))
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    assert plain.stderr.splitlines()[-2:] == [
        f"error: --data.data_dir {missing} does not exist: point it at a folder of class subfolders",
        DEBUG_HINT,
    ]
    debugged = classifier("fit", "--config", config, "--data.data_dir", str(missing), CLASSIFIER_DEBUG="1")
    assert debugged.returncode == 2 and "Traceback (most recent call last):" in debugged.stderr
    assert debugged.stderr.splitlines()[-1].startswith(f"FileNotFoundError: --data.data_dir {missing} does not")


# (command, the module of its extra, the extra, our modules that import that module)
EXTRA_COMMANDS = [
    ("tune", "optuna", "tune", ("commands.tune", "tune.study", "tune.trial", "tune.report", "tune.search_space")),
    ("export", "onnxruntime", "export", ("commands.export", "deploy.export", "deploy.parity", "deploy.onnx_predictor")),
    ("explain", "pytorch_grad_cam", "explain", ("commands.explain", "evaluation.cams")),
]


@pytest.mark.parametrize(("command", "missing", "extra", "importers"), EXTRA_COMMANDS, ids=lambda x: str(x))
def test_a_command_whose_extra_is_not_installed_names_the_extra(
    command: str, missing: str, extra: str, importers: tuple[str, ...], trained_checkpoint: Path, monkeypatch
) -> None:
    monkeypatch.setitem(sys.modules, missing, None)  # as if not installed: importing it raises ModuleNotFoundError
    for name in importers:  # imported again, without it; the rest of the package stays the one other tests patch
        monkeypatch.delitem(sys.modules, f"classifier.{name}", raising=False)
    args = ["--search", str(REPO / "configs" / "search" / "resnet18.yaml")] if command == "tune" else []
    code, lines = run_main([command, "--ckpt_path", str(trained_checkpoint), *args])
    assert code == 2
    assert lines[0] == f"error: {missing} is not installed: pip install 'classifier[{extra}]'"
