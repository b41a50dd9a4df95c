"""Any aspect ratio in: `--data.image_size [H, W]` and `--data.resize_mode crop|squash|letterbox`, from training to
serving, each rendering timm's own eval pixels, with PyTorch and without it."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from classifier import OnnxPredictor, Predictor
from classifier.core.geometry import pad_fill
from classifier.core.imageio import load_rgb
from classifier.data.datamodule import ImageFolderDataModule
from classifier.deploy.preprocess import resize_and_crop, to_chw_uint8
from classifier.model.net import eval_transform, resolve_preprocessing
from tests.helpers import classifier_here, read_csv, run_dir, save_image, tiny_config
from tests.helpers.serving import start_server

MODES = ("crop", "squash", "letterbox")
SIZES = [32, [32, 48], [48, 32], [17, 23]]
SHAPES = {"tall": (20, 90), "wide": (120, 15), "tiny": (3, 5), "line": (64, 1), "square": (40, 40), "photo": (97, 61)}


def noise(width: int, height: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def smooth(width: int, height: int) -> Image.Image:
    """Red follows x, green y: a picture whose resamplings differ by little, and whose crop can be read back."""
    y, x = np.mgrid[:height, :width]
    ramps = [255 * x / max(1, width - 1), 255 * y / max(1, height - 1), 128 + 0 * x]
    return Image.fromarray(np.stack(ramps, -1).round().astype(np.uint8))


def odd_shapes(folder: Path) -> list[Path]:
    """Images of many aspect ratios (tall, wide, tiny, one pixel high, square), a JPEG stored sideways with an EXIF
    rotation, a grey PNG and an RGBA PNG."""
    paths = [save_image(folder / f"{name}.png", noise(*size, seed)) for seed, (name, size) in enumerate(SHAPES.items())]
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: upright, it is 50 x 80
    upright = noise(50, 80, 10)
    paths.append(save_image(folder / "phone.jpg", upright.rotate(90, expand=True), quality=95, exif=exif))
    paths.append(save_image(folder / "grey.png", noise(70, 30, 11).convert("L")))
    paths.append(save_image(folder / "alpha.png", noise(30, 70, 12).convert("RGBA")))
    return paths


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return odd_shapes(tmp_path_factory.mktemp("shapes"))


@pytest.mark.parametrize("size", SIZES, ids=str)
@pytest.mark.parametrize("mode", MODES)
def test_each_mode_renders_timms_eval_pixels_without_torch(
    shapes: list[Path], mode: str, size: int | list[int]
) -> None:
    preprocessing = resolve_preprocessing("test_resnet", size, None, mode)
    height, width = (size, size) if isinstance(size, int) else size
    assert preprocessing["input_size"] == [3, height, width]  # height first, everywhere
    timm = eval_transform(preprocessing)
    for path in shapes:
        image = load_rgb(path)
        expected = timm(image).numpy()
        assert expected.shape == (3, height, width)
        np.testing.assert_array_equal(to_chw_uint8(resize_and_crop(image, preprocessing)), expected, err_msg=path.name)


def test_letterbox_shows_the_whole_image_padded_with_the_mean_and_crop_cuts_its_sides() -> None:
    wide = Image.new("RGB", (120, 20), (200, 10, 10))  # 6:1 into 32 x 48 (3:2): 8 rows of image, 12 above and below
    letterbox = resolve_preprocessing("test_resnet", [32, 48], None, "letterbox")
    pixels = to_chw_uint8(resize_and_crop(wide, letterbox))
    fill = np.array(pad_fill(letterbox))[:, None]
    assert letterbox["crop_pct"] == 1.0 and pad_fill(letterbox) == (128, 128, 128)  # test_resnet's mean is 0.5
    assert (pixels[:, :12].reshape(3, -1) == fill).all() and (pixels[:, -12:].reshape(3, -1) == fill).all()
    assert (pixels[:, 12:20].reshape(3, -1) == np.array([[200], [10], [10]])).all()

    marked = np.zeros((20, 120, 3), np.uint8)
    marked[:, :10] = 255  # a white band at the left edge
    for mode, kept in (("crop", False), ("squash", True), ("letterbox", True)):
        preprocessing = resolve_preprocessing("test_resnet", [32, 48], None, mode)
        seen = to_chw_uint8(resize_and_crop(Image.fromarray(marked), preprocessing))
        assert (seen.max() > 200) == kept, mode  # crop cuts the band off; the others keep the whole width


@pytest.mark.parametrize("mode", MODES)
def test_training_crops_keep_the_modes_geometry(mode: str) -> None:
    """At crop scale 1 and ratio 1, a training crop is the whole view eval has: the same picture in each mode."""
    settings = {"image_size": (32, 48), "resize_mode": mode, "crop_pct": 1.0, "hflip": 0.0, "color_jitter": None}
    module = ImageFolderDataModule(**settings, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0))
    train, evaluate = module.transform(training=True), module.transform(training=False)
    for name, (width, height) in SHAPES.items():
        if mode == "crop" and min(width, height) < 10:
            continue  # its crop snaps to whole pixels: 2 of the tiny image's 5 rows, where eval shows 2.4 of them
        image = smooth(width, height)
        trained, evaluated = train(image).float(), evaluate(image).float()
        assert trained.shape == evaluated.shape == (3, 32, 48)
        # squash and letterbox resize the same whole image; crop resamples the centre before cutting it, not after
        assert (trained - evaluated).abs().mean() < (2 if mode == "crop" else 1e-6), name
    jittered = ImageFolderDataModule(image_size=(32, 48), resize_mode=mode, color_jitter=0.4)
    torch.manual_seed(0)
    padded = jittered.transform(training=True)(Image.new("RGB", (300, 20), (250, 250, 250)))  # far wider than 3:2
    mean = torch.tensor(pad_fill(jittered.data_config))[:, None]  # resnet18's ImageNet mean: 124, 116, 104
    assert (padded[:, 0] == mean).all() == (mode == "letterbox")  # the padding stays the mean under colour jitter


@pytest.mark.parametrize("mode", ["squash", "letterbox"])
def test_the_ram_cache_refuses_modes_it_cannot_render_by_name(tmp_path: Path, mode: str) -> None:
    for i in range(4):
        save_image(tmp_path / "a" / f"{i}.png", noise(40, 30, i))
    module = ImageFolderDataModule(str(tmp_path), image_size=(32, 48), resize_mode=mode, cache="ram", val_fraction=0.5)
    with pytest.raises(ValueError, match=f"--data.resize_mode {mode} renders on the CPU: use it with --data.decode"):
        module.setup("fit")


@pytest.fixture(scope="module")
def mode_runs(small_digits: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A best.ckpt of the small digits at 32 x 48 for each mode, fitted by the `classifier` command (in this process:
    the server is the process boundary these tests cross): letterbox for 3 epochs, crop and squash for 2 steps (their
    tests compare predictions only)."""
    runs = {}
    for mode in MODES:
        folder = tmp_path_factory.mktemp(mode)
        data = {"image_size": [32, 48], "resize_mode": mode}
        steps = {"max_epochs": 3} if mode == "letterbox" else {"max_epochs": 1, "limit_train_batches": 2}
        config = tiny_config(folder, small_digits, data=data, trainer=steps)
        lr = ["--model.optimizer.lr", "0.01"] if mode == "letterbox" else []
        fitted = classifier_here("fit", "--config", str(config), *lr)
        assert fitted.returncode == 0, fitted.stderr[-3000:]
        runs[mode] = run_dir(folder, 0) / "checkpoints" / "best.ckpt"
    return runs


def test_letterbox_digits_fit_test_export_and_serve_at_32_by_48(
    mode_runs: dict[str, Path], shapes: list[Path], tmp_path: Path
) -> None:
    best = mode_runs["letterbox"]
    stored = torch.load(best, weights_only=False)["net"]["preprocessing"]
    assert (stored["input_size"], stored["crop_mode"], stored["crop_pct"]) == ([3, 32, 48], "border", 1.0)

    tested = classifier_here("test", "--ckpt_path", str(best))
    assert tested.returncode == 0, tested.stderr[-3000:]
    metrics = json.loads((best.parents[1] / "test" / "metrics.json").read_text())
    rows = read_csv(best.parents[1] / "test" / "predictions.csv")
    accuracy = np.mean([row["prediction"] == row["target"] for row in rows])
    assert len(rows) == 30 and metrics["test/acc"] == pytest.approx(accuracy, abs=1e-6)
    assert metrics["test/acc"] > 0.1  # over chance after 3 epochs (benchmarks/resize_modes.py: the modes trained)

    exported = classifier_here("export", "--ckpt_path", str(best), "--output", str(tmp_path / "export"))
    assert exported.returncode == 0, exported.stderr[-3000:]
    model = onnx.load(tmp_path / "export" / "model.onnx")
    dims = [dim.dim_param or dim.dim_value for dim in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims[1:] == [3, 32, 48]
    description = json.loads((tmp_path / "export" / "preprocess.json").read_text())
    assert (description["input_size"], description["resize_mode"]) == ([3, 32, 48], "letterbox")
    report = json.loads((tmp_path / "export" / "parity.json").read_text())
    assert report["passed"] and report["preprocessing_mismatches"] == 0

    explained = classifier_here("explain", "--ckpt_path", str(best), "--data.predict_dir", str(shapes[0].parent),
                                "--out", str(tmp_path / "explain"))  # fmt: skip
    assert explained.returncode == 0, explained.stderr[-3000:]
    cams = read_csv(tmp_path / "explain" / "cams.csv")
    assert len(cams) == len(shapes)
    for row in cams:  # maps over the letterboxed 32 x 48 input the model saw
        assert 0 <= float(row["cam_peak_x"]) < 48 and 0 <= float(row["cam_peak_y"]) < 32
        with Image.open(tmp_path / "explain" / row["overlay"]) as overlay:
            assert overlay.size == (48, 32)

    expected = Predictor.from_checkpoint(best).predict(shapes).numpy()
    server, url = start_server(tmp_path / "export" / "model.onnx", "--topk", "10")
    try:
        files = [("files", (path.name, path.read_bytes(), "application/octet-stream")) for path in shapes]
        answer = httpx.post(f"{url}/predict", files=files, timeout=60).json()
    finally:
        server.terminate()
        server.wait(30)
    classes = Predictor.from_checkpoint(best).class_names
    for result, row, path in zip(answer["results"], expected, shapes, strict=True):
        assert result["status"] == "ok", result
        served = {entry["class"]: entry["probability"] for entry in result["top"]}
        assert served == pytest.approx(dict(zip(classes, row.tolist(), strict=True)), abs=1e-4), path.name


@pytest.mark.parametrize("mode", MODES)
def test_predict_predictor_and_onnx_agree_on_every_shape(
    mode_runs: dict[str, Path], shapes: list[Path], tmp_path: Path, mode: str
) -> None:
    best = mode_runs[mode]
    output = tmp_path / "predictions.csv"
    predicted = classifier_here("predict", "--ckpt_path", str(best), "--data.predict_dir", str(shapes[0].parent),
                                "--predictions.output", str(output))  # fmt: skip
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    rows = {Path(row["path"]).name: row for row in read_csv(output)}
    predictor = Predictor.from_checkpoint(best)
    exported = classifier_here("export", "--ckpt_path", str(best), "--output", str(tmp_path / "export"))
    assert exported.returncode == 0, exported.stderr[-3000:]
    onnx_predictor = OnnxPredictor(tmp_path / "export" / "model.onnx")
    pytorch, onnx_probs = predictor.predict(shapes).numpy(), onnx_predictor.predict(shapes)
    for path, row_pytorch, row_onnx in zip(shapes, pytorch, onnx_probs, strict=True):
        cli = np.array([float(rows[path.name][f"prob_{name}"]) for name in predictor.class_names])
        np.testing.assert_allclose(cli, row_pytorch, atol=1e-4, err_msg=f"{mode} {path.name}: predict")
        np.testing.assert_allclose(row_onnx, row_pytorch, atol=1e-4, err_msg=f"{mode} {path.name}: ONNX")
        pixels = predictor.preprocess(path).numpy()
        np.testing.assert_array_equal(onnx_predictor.preprocess(path), pixels, err_msg=f"{mode} {path.name}")
