"""`classifier export`: every format computes the checkpoint's probabilities, says how to feed it, proves its
parity, and runs without torch through `classifier.deploy.onnx_predictor`."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from classifier import Predictor, cli_main
from classifier.cli.entry import main
from classifier.core.imageio import load_rgb
from classifier.deploy import parity
from classifier.deploy.export import export_net
from classifier.deploy.onnx_predictor import OnnxPredictor
from classifier.deploy.preprocess import METADATA_KEY, resize_and_crop, to_chw_uint8
from classifier.model.net import ClassifierNet, eval_transform
from tests.helpers import REPO, read_csv, run_dir, save_image, tiny_config, write_photos

FORMATS = {"onnx": "model.onnx", "exported_program": "model.pt2", "torchscript": "model.torchscript.pt"}


@pytest.fixture(scope="module")
def tiny(small_digits: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """best.ckpt of one epoch of `test_resnet` with an MLP head (BatchNorm and dropout) on 200 digits."""
    root = tmp_path_factory.mktemp("tiny")
    model = {"head_hidden_dims": [16], "drop_rate": 0.3}
    config = tiny_config(root, small_digits, trainer={"max_epochs": 1}, model=model, data={"crop_pct": 0.875})
    cli_main(["fit", "--config", str(config)])
    return run_dir(root, 0) / "checkpoints" / "best.ckpt"


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bundled digits model (the speed run, configs/recipes/speedrun_digits.yaml, on data/digits), 6 epochs of its
    15 (about 99%), tested; validated (and its best.ckpt chosen) after the 6th only."""
    root = tmp_path_factory.mktemp("digits")
    logger = ["--trainer.logger.init_args.save_dir", str(root)]
    cli_main(["fit", "--config", str(REPO / "configs" / "recipes" / "speedrun_digits.yaml"), "--trainer.max_epochs",
              "6", "--trainer.check_val_every_n_epoch", "6", "--data.data_dir", str(REPO / "data" / "digits"),
              *logger])  # fmt: skip
    best = root / "speedrun_digits" / "version_0" / "checkpoints" / "best.ckpt"
    cli_main(["test", "--ckpt_path", str(best)])
    return best


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Photo-like JPEGs and PNGs (grey, EXIF-rotated, several sizes), plus RGBA, 16-bit and palette PNGs."""
    root = write_photos(tmp_path_factory.mktemp("photos") / "photos", per_class=4, sizes=(40, 300))
    rng = np.random.default_rng(1)
    odd = root / "odd"
    save_image(odd / "rgba.png", Image.fromarray(rng.integers(0, 256, (50, 90, 4), dtype=np.uint8), "RGBA"))
    save_image(odd / "sixteen.png", Image.fromarray(rng.integers(0, 65536, (70, 40), dtype=np.uint16)))
    save_image(odd / "palette.png", Image.fromarray(rng.integers(0, 256, (33, 61, 3), dtype=np.uint8)).convert("P"))
    save_image(odd / "tiny.jpg", Image.fromarray(rng.integers(0, 256, (9, 13, 3), dtype=np.uint8)), quality=90)
    return root


def export(ckpt: Path, output: Path, *flags: str) -> Path:
    cli_main(["export", "--ckpt_path", str(ckpt), "--output", str(output), *flags])
    return output


def plain_torch(ckpt: Path) -> Callable[[np.ndarray], np.ndarray]:
    """Probabilities computed from the checkpoint by hand: float, normalise, network, softmax (loaded once)."""
    checkpoint = torch.load(ckpt, weights_only=True)
    net = ClassifierNet(**checkpoint["net"])
    net.load_state_dict(
        {k.removeprefix("net."): v for k, v in checkpoint["state_dict"].items() if k.startswith("net.")}
    )
    mean = torch.tensor(net.preprocessing["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(net.preprocessing["std"]).view(1, 3, 1, 1)

    def probabilities(pixels: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return net.eval()((torch.from_numpy(pixels).float() / 255 - mean) / std).softmax(-1).numpy()

    return probabilities


def run_exported(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    """The exported file, loaded (once) with its format's own plain loader."""
    if path.suffix == ".onnx":
        session = ort.InferenceSession(str(path))
        return lambda pixels: session.run(None, {"images": pixels})[0]
    module = torch.export.load(path).module() if path.suffix == ".pt2" else torch.jit.load(str(path))

    def run(pixels: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return module(torch.from_numpy(pixels)).numpy()

    return run


def test_the_torch_free_resize_and_crop_render_the_eval_transform_pixel_for_pixel(photos: Path) -> None:
    settings = [((3, 32, 32), 0.875, "bilinear"), ((3, 224, 224), 0.95, "bicubic"), ((3, 24, 40), 1.0, "bicubic"),
                ((3, 33, 33), 1.15, "lanczos"), ((3, 16, 16), 0.9, "nearest")]  # fmt: skip
    images = [load_rgb(path) for path in sorted(photos.rglob("*.*"))]
    images += [Image.new("RGB", size, (9, 99, 199)) for size in ((1, 1), (33, 33), (500, 7))]
    for input_size, crop_pct, interpolation in settings:
        for crop_mode in ("center", "squash", "border"):
            config = {"input_size": list(input_size), "crop_pct": crop_pct, "crop_mode": crop_mode,
                      "interpolation": interpolation, "mean": [0.5] * 3, "std": [0.5] * 3}  # fmt: skip
            transform = eval_transform(config)
            for image in images:
                expected = transform(image).numpy()
                np.testing.assert_array_equal(to_chw_uint8(resize_and_crop(image, config)), expected)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny", "digits"])
@pytest.mark.parametrize("format", FORMATS)
def test_every_format_computes_the_checkpoints_probabilities_at_any_batch_size(
    request: pytest.FixtureRequest, tmp_path: Path, format: str, model: str
) -> None:
    ckpt = request.getfixturevalue(model)
    out = export(ckpt, tmp_path / "export", "--format", format)
    rng = np.random.default_rng(0)
    exported, expected = run_exported(out / FORMATS[format]), plain_torch(ckpt)
    for batch in (1, 3, 16):
        pixels = rng.integers(0, 256, (batch, 3, 32, 32), dtype=np.uint8)
        np.testing.assert_allclose(exported(pixels), expected(pixels), atol=1e-5)
    parity = json.loads((out / "parity.json").read_text())
    assert parity["passed"] and sorted(parity["batch_sizes"]) == ["1", "2", "7"]
    assert parity["count"] == {"tiny": 30, "digits": 270}[model]  # the frozen test splits
    for result in parity["batch_sizes"].values():
        assert result["top1_agreement"] == 1.0 and result["max_abs_diff"] <= 1e-4
        assert result["accuracy"] == parity["pytorch_accuracy"]


@pytest.mark.slow
def test_a_static_batch_and_logits_export_still_predicts_probabilities(tiny: Path, tmp_path: Path) -> None:
    out = export(tiny, tmp_path / "export", "--dynamic_batch", "false", "--softmax", "false")
    (shape,) = [list(i.shape) for i in ort.InferenceSession(str(out / "model.onnx")).get_inputs()]
    assert shape == [1, 3, 32, 32]
    pixels = np.random.default_rng(0).integers(0, 256, (5, 3, 32, 32), dtype=np.uint8)
    exported = run_exported(out / "model.onnx")
    logits = np.concatenate([exported(pixels[i : i + 1]) for i in range(5)])
    expected = plain_torch(tiny)(pixels)
    np.testing.assert_allclose(torch.from_numpy(logits).softmax(-1).numpy(), expected, atol=1e-5)
    np.testing.assert_allclose(OnnxPredictor(out / "model.onnx").predict_batch(pixels), expected, atol=1e-5)


@pytest.mark.parametrize("format", ["onnx", "exported_program", "torchscript"])
def test_a_network_in_train_mode_exports_its_eval_behaviour(tmp_path: Path, format: str) -> None:
    torch.manual_seed(0)
    net = ClassifierNet("test_resnet", ["a", "b", "c"], drop_rate=0.5, image_size=32, head_hidden_dims=[8])
    net.train()
    pixels = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    net((pixels.float() - 127) / 64)  # a training step's forward pass moves the BatchNorm statistics
    description = export_net(net, tmp_path / FORMATS[format], format)
    assert net.training  # the caller's network is left as it was
    normalised = (pixels.float() / 255 - 0.5) / 0.5  # test_resnet's mean and std
    with torch.no_grad():
        eval_probs = net.eval()(normalised).softmax(-1).numpy()
        train_probs = net.train()(normalised).softmax(-1).numpy()
    assert np.abs(train_probs - eval_probs).max() > 1e-3  # dropout and batch statistics do change the output
    np.testing.assert_allclose(run_exported(tmp_path / FORMATS[format])(pixels.numpy()), eval_probs, atol=1e-5)
    assert description["exporter"] in {"onnx": ("dynamo",), "exported_program": ("torch.export",),
                                       "torchscript": ("torch.jit.trace",)}[format]  # fmt: skip


@pytest.mark.slow
def test_the_onnx_file_says_how_to_feed_it(digits: Path, tmp_path: Path) -> None:
    out = export(digits, tmp_path / "export", "--check", "none")
    assert not (out / "parity.json").exists()
    (entry,) = onnx.load(out / "model.onnx").metadata_props
    assert entry.key == METADATA_KEY
    stored = json.loads(entry.value)
    assert stored == json.loads((out / "preprocess.json").read_text())
    checkpoint = torch.load(digits, weights_only=True)
    net = checkpoint["net"]
    assert stored["class_names"] == net["class_names"] == [str(digit) for digit in range(10)]
    for key in ("input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std"):
        assert stored[key] == net["preprocessing"][key], key
    assert stored["resize_size"] == [32, 32] and stored["channel_order"] == "RGB"  # crop_pct 1.0
    assert stored["checkpoint_sha256"] == hashlib.sha256(digits.read_bytes()).hexdigest()
    assert stored["test_metrics"] == json.loads((digits.parent.parent / "test" / "metrics.json").read_text())
    assert (stored["exporter"], stored["opset"], stored["output"]) == ("dynamo", 18, "probabilities")
    predictor = OnnxPredictor(out / "model.onnx")
    assert predictor.class_names == net["class_names"] and predictor.preprocessing == stored


@pytest.mark.slow
def test_the_torch_free_predictor_gives_classifier_predicts_probabilities(
    digits: Path, photos: Path, tmp_path: Path
) -> None:
    out = export(digits, tmp_path / "export", "--check", str(photos))
    parity = json.loads((out / "parity.json").read_text())
    assert parity["images"].startswith(str(photos)) and parity["preprocessing_mismatches"] == 0
    assert parity["pytorch_accuracy"] is None  # odd/ is not a class of the digits
    predictor = OnnxPredictor(out / "model.onnx")
    bundled = sorted((REPO / "data" / "digits").rglob("*.png"))[::60]
    for name, folder in {"photos": photos, "bundled digits": bundled}.items():
        listing = tmp_path / f"{name}.txt"
        listing.write_text("\n".join(str(path) for path in (folder.rglob("*.*") if name == "photos" else folder)))
        csv = tmp_path / f"{name}.csv"
        cli_main(["predict", "--ckpt_path", str(digits), "--data.predict_dir", str(listing),
                  "--predictions.output", str(csv), "--trainer.enable_progress_bar", "false"])  # fmt: skip
        rows = read_csv(csv)
        assert len(rows) >= 16 and all(row["status"] == "ok" for row in rows)
        expected = np.array([[float(row[f"prob_{c}"]) for c in predictor.class_names] for row in rows])
        found = predictor.predict([row["path"] for row in rows])
        np.testing.assert_allclose(found, expected, atol=1e-4, err_msg=name)
        assert [predictor.class_names[i] for i in found.argmax(1)] == [row["prediction"] for row in rows]
    one = predictor.predict(Image.open(bundled[0]))
    assert one.shape == (10,) and one.sum() == pytest.approx(1.0, abs=1e-5)


TORCH_FREE_FILES = (
    "__init__.py",
    "core",
    "deploy/__init__.py",
    "deploy/onnx_predictor.py",
    "deploy/preprocess.py",
    "deploy/inputs.py",
)  # fmt: skip - docs/deploy.md's list


@pytest.mark.slow
def test_the_documented_torch_free_files_alone_predict_without_torch(
    tiny: Path, small_digits: Path, tmp_path: Path
) -> None:
    """Only the files docs/deploy.md names, copied apart, in a process where `import torch` fails."""
    out = export(tiny, tmp_path / "export", "--check", "none")
    copy = tmp_path / "apart"
    for name in TORCH_FREE_FILES:
        source, target = REPO / "classifier" / name, copy / "classifier" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target)
        else:
            shutil.copy(source, target)
    image = next(small_digits.rglob("*.png"))
    code = (
        "import sys; sys.modules['torch'] = None; import classifier; "
        f"assert classifier.__file__.startswith({str(copy)!r}), classifier.__file__; "
        "from classifier import OnnxPredictor; "
        f"p = OnnxPredictor({str(out / 'model.onnx')!r}).predict([{str(image)!r}]); "
        "assert p.shape == (1, 10), p.shape"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=copy)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.slow
def test_int8_keeps_the_digits_models_accuracy(digits: Path, tmp_path: Path) -> None:
    out = export(digits, tmp_path / "export", "--quantize", "int8")
    parity = json.loads((out / "parity.json").read_text())
    int8 = parity["int8"]
    assert parity["passed"] and int8["passed"] and int8["calibration"] == "200 train split images"
    assert parity["count"] == 270 and int8["top1_agreement"] >= 0.99
    assert int8["accuracy_change_points"] >= -1.0
    assert int8["accuracy"] == pytest.approx(parity["pytorch_accuracy"] + int8["accuracy_change_points"] / 100)
    predictor = OnnxPredictor(out / "model.int8.onnx")
    assert predictor.preprocessing["quantization"] == "int8" and predictor.class_names == [str(d) for d in range(10)]
    assert json.loads((out / "preprocess.json").read_text())["int8_model"] == "model.int8.onnx"


@pytest.mark.slow
def test_export_errors_are_one_line_and_name_the_file(
    tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    def error(*args: str) -> str:
        with pytest.raises(SystemExit):
            main(["export", *args])
        return capsys.readouterr().err.splitlines()[0]

    missing = tmp_path / "gone.ckpt"
    assert error("--ckpt_path", str(missing)) == f"error: --ckpt_path {missing} does not exist"
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    message = error("--ckpt_path", str(tiny), "--output", str(blocker / "export"))
    assert message.startswith(f"error: --output {blocker / 'export'} is not writable")
    with pytest.raises(FileNotFoundError, match="ONNX model .*nothing.onnx does not exist"):
        OnnxPredictor(tmp_path / "nothing.onnx")
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07not a model")
    with pytest.raises(ValueError, match=f"{corrupt} is not a readable ONNX model"):
        OnnxPredictor(corrupt)
    foreign = tmp_path / "foreign" / "model.onnx"
    foreign.parent.mkdir()
    torch.onnx.export(torch.nn.Linear(3, 2), (torch.zeros(1, 3),), foreign, dynamo=True, verbose=False)
    with pytest.raises(ValueError, match=f"{foreign} carries no classifier preprocessing"):
        OnnxPredictor(foreign)

    checkpoint = torch.load(tiny, weights_only=True)
    del checkpoint["ImageFolderDataModule"]  # as written before checkpoints kept their split
    unsplit = tmp_path / "unsplit.ckpt"
    torch.save(checkpoint, unsplit)
    out = export(unsplit, tmp_path / "unsplit")
    assert f"--check auto: {unsplit} records no frozen split; checking parity on 32 random images" in caplog.text
    parity = json.loads((out / "parity.json").read_text())
    assert parity["images"] == "32 random images" and parity["passed"]


def shifted_runner(original, shift: float):
    """parity's `runner` (`original`), with `shift` added to the top probability of each image the export classifies."""

    def runner(path: Path, description: dict):
        run = original(path, description)

        def shifted(pixels: np.ndarray) -> np.ndarray:
            probs = run(pixels).copy()
            probs[np.arange(len(probs)), probs.argmax(1)] += shift  # top-1 unchanged: only the difference counts
            return probs

        return shifted

    return runner


@pytest.mark.slow
def test_export_refuses_probabilities_off_by_more_than_the_tolerance_of_1e_4(
    tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """An export whose probabilities are 5e-5 off passes; 5e-4 off (5x docs/deploy.md's 1e-4, under 10x) fails."""
    original = parity.runner
    monkeypatch.setattr(parity, "runner", shifted_runner(original, 5e-5))
    main(["export", "--ckpt_path", str(tiny), "--output", str(tmp_path / "close")])
    close = json.loads((tmp_path / "close" / "parity.json").read_text())
    assert close["passed"] and 5e-5 <= max(r["max_abs_diff"] for r in close["batch_sizes"].values()) < 6e-5
    monkeypatch.setattr(parity, "runner", shifted_runner(original, 5e-4))
    with pytest.raises(SystemExit) as stopped:
        main(["export", "--ckpt_path", str(tiny), "--output", str(tmp_path / "off")])
    assert stopped.value.code == 2
    model, report = tmp_path / "off.failed" / "model.onnx", tmp_path / "off.failed" / "parity.json"
    assert capsys.readouterr().err.splitlines()[-2] == (
        f"error: {model}: probabilities differ by up to 0.0005 (tolerance 0.0001) (see {report})"
    )
    assert not (tmp_path / "off").exists()  # where a server would look: nothing
    off = json.loads(report.read_text())
    assert off["passed"] is False and all(r["top1_agreement"] == 1.0 for r in off["batch_sizes"].values())


@pytest.mark.slow
def test_a_parity_failure_stops_the_export_and_says_by_how_much(
    tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("classifier.deploy.parity.MAX_ABS_DIFF", 0.0)  # no float computation is exact
    with pytest.raises(ValueError, match=r"model.onnx: probabilities differ by up to [0-9.e-]+ \(tolerance 0\)"):
        export(tiny, tmp_path / "export")
    assert json.loads((tmp_path / "export.failed" / "parity.json").read_text())["passed"] is False
    predictor = Predictor.from_checkpoint(tiny)
    assert predictor.class_names == OnnxPredictor(tmp_path / "export.failed" / "model.onnx").class_names
