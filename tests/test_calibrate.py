"""`classifier calibrate`: a temperature fitted on the frozen validation split, which test and predict then use."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax

from classifier import ClassifierNet, Predictor, cli_main
from classifier.cli.entry import main
from classifier.deploy.onnx_predictor import OnnxPredictor
from tests.helpers import read_csv, run_dir, tiny_config

SHARPEN = 20.0  # the head's weights and bias times this: the logits too, which makes the model overconfident
CLASSES = [str(digit) for digit in range(10)]


@pytest.fixture(scope="module")
def trained(small_digits: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model, 5 epochs on 20 digits per class (about half of them right): its best.ckpt."""
    root = tmp_path_factory.mktemp("trained")
    data = {"val_fraction": 0.3, "batch_size": 16}
    config = tiny_config(root, small_digits, trainer={"max_epochs": 5}, data=data)
    cli_main(["fit", "--config", str(config), "--model.optimizer.lr", "0.01"])
    return run_dir(root, 0) / "checkpoints" / "best.ckpt"


@pytest.fixture(scope="module")
def overconfident(trained: Path) -> Path:
    """The trained model with its logits scaled up by SHARPEN, beside its best.ckpt."""
    checkpoint = torch.load(trained, weights_only=True)
    for name in ("net.backbone.fc.weight", "net.backbone.fc.bias"):
        checkpoint["state_dict"][name] = checkpoint["state_dict"][name] * SHARPEN
    path = trained.with_name("sharp.ckpt")
    torch.save(checkpoint, path)
    return path


@pytest.fixture(scope="module")
def calibrated(overconfident: Path) -> Path:
    cli_main(["calibrate", "--ckpt_path", str(overconfident), "--data.num_workers", "0"])
    return overconfident.with_name("sharp-calibrated.ckpt")


def independent_logits(checkpoint: Path, paths: list[Path]) -> np.ndarray:
    """Logits from plain timm and PIL: resize 8 -> 33 px (32 / test_resnet's crop_pct 0.95), crop 32, normalise."""
    state = torch.load(checkpoint, weights_only=True)["state_dict"]
    model = timm.create_model("test_resnet", num_classes=10)
    model.load_state_dict({k.removeprefix("net.backbone."): v for k, v in state.items() if k.startswith("net.")})
    mean, std = np.array(model.pretrained_cfg["mean"]), np.array(model.pretrained_cfg["std"])
    pixels = [np.asarray(Image.open(p).convert("RGB").resize((33, 33), Image.BILINEAR))[:32, :32] for p in paths]
    images = (np.stack(pixels) / 255.0 - mean) / std
    with torch.no_grad():
        return model.eval()(torch.from_numpy(images).permute(0, 3, 1, 2).float()).double().numpy()


def split_of(checkpoint: Path, split: str, small_digits: Path) -> tuple[list[Path], np.ndarray]:
    rows = [row for row in read_csv(checkpoint.parents[1] / "splits.csv") if row["split"] == split]
    return [small_digits / row["path"] for row in rows], np.array([CLASSES.index(row["label"]) for row in rows])


def nll(logits: np.ndarray, targets: np.ndarray) -> float:
    return float(-log_softmax(logits, axis=1)[np.arange(len(targets)), targets].mean())


def ece(logits: np.ndarray, targets: np.ndarray, bins: int = 15) -> float:
    """Expected calibration error: |accuracy - confidence| per equal-width confidence bin, weighted by its images."""
    probs = softmax(logits, axis=1)
    confidence, correct = probs.max(axis=1), probs.argmax(axis=1) == targets
    which = np.clip(np.ceil(confidence * bins) - 1, 0, bins - 1)
    return sum(abs(correct[which == b].mean() - confidence[which == b].mean()) * (which == b).mean()
               for b in range(bins) if (which == b).any())  # fmt: skip


def test_the_temperature_divides_the_logits_and_travels_with_the_network() -> None:
    net = ClassifierNet("test_resnet", CLASSES, image_size=32).eval()
    config = net.config()
    assert config["temperature"] == 1.0
    scaled = ClassifierNet(**{**config, "temperature": 2.5}).eval()
    scaled.load_state_dict(net.state_dict())  # the temperature is no weight: state dicts stay as they were
    images = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(scaled(images), net(images) / 2.5, rtol=0, atol=0)
    assert scaled.config()["temperature"] == 2.5
    del config["temperature"]  # a checkpoint written before temperatures existed
    assert ClassifierNet(**config).temperature == 1.0
    with pytest.raises(ValueError, match="temperature must be positive"):
        ClassifierNet(**{**config, "temperature": 0.0})


@pytest.mark.slow
def test_checkpoints_of_fit_carry_temperature_one_and_older_ones_load_with_it(trained: Path, tmp_path: Path) -> None:
    checkpoint = torch.load(trained, weights_only=True)
    assert checkpoint["net"]["temperature"] == 1.0 and checkpoint["hyper_parameters"]["temperature"] == 1.0
    del checkpoint["net"]["temperature"], checkpoint["hyper_parameters"]["temperature"]
    torch.save(checkpoint, older := tmp_path / "older.ckpt")
    assert Predictor.from_checkpoint(older).net.temperature == 1.0


@pytest.mark.parametrize("subcommand", ["fit", "lr_find"])
def test_training_refuses_a_temperature(
    subcommand: str, small_digits: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    config = tiny_config(tmp_path, small_digits, trainer={"max_epochs": 1})
    with pytest.raises(SystemExit) as stopped:
        main([subcommand, "--config", str(config), "--model.temperature", "2"])
    assert stopped.value.code == 2
    assert capsys.readouterr().err.splitlines()[-2:] == [
        "error: --model.temperature is 2.0: fit and lr_find train the unscaled logits, so they need 1 (a checkpoint "
        "written by `classifier calibrate` is for test and predict; resume from the one it was calibrated from)",
        "(--debug or CLASSIFIER_DEBUG=1 shows the traceback)",
    ]
    assert not list(tmp_path.rglob("*.ckpt"))


@pytest.mark.slow
def test_calibrate_fits_the_temperature_that_minimises_the_validation_nll(
    overconfident: Path, calibrated: Path, small_digits: Path
) -> None:
    report = json.loads(calibrated.with_suffix(".json").read_text())
    temperature = torch.load(calibrated, weights_only=True)["net"]["temperature"]
    assert report["temperature"] == pytest.approx(temperature, rel=1e-5)  # the JSON keeps 6 digits
    paths, targets = split_of(overconfident, "val", small_digits)
    logits = independent_logits(overconfident, paths)
    # the reference: a bounded scalar search over T on the same logits
    best = minimize_scalar(lambda t: nll(logits / t, targets), bounds=(0.05, 50), method="bounded",
                           options={"xatol": 1e-9})  # fmt: skip
    assert temperature == pytest.approx(best.x, abs=1e-3)
    for split, images in (("val", 60), ("test", 30)):
        paths, targets = split_of(overconfident, split, small_digits)
        logits = independent_logits(overconfident, paths)
        part = report[split]
        assert part["images"] == len(targets) == images
        for when, t in (("before", 1.0), ("after", temperature)):
            assert part[when]["acc"] == pytest.approx((logits.argmax(axis=1) == targets).mean(), abs=1e-6)
            assert part[when]["nll"] == pytest.approx(nll(logits / t, targets), rel=1e-4)
            assert part[when]["ece"] == pytest.approx(ece(logits / t, targets), abs=1e-5)
        assert part["after"]["ece"] < part["before"]["ece"] and part["after"]["nll"] < part["before"]["nll"]


@pytest.mark.slow
def test_test_and_predict_use_the_calibrated_temperature(
    overconfident: Path, calibrated: Path, small_digits: Path, tmp_path: Path
) -> None:
    metrics = {}
    for checkpoint in (overconfident, calibrated):  # each test is filed under the run, replacing the one before
        cli_main(["test", "--ckpt_path", str(checkpoint)])
        metrics[checkpoint.stem] = json.loads((checkpoint.parents[1] / "test" / "metrics.json").read_text())
    before, after = metrics["sharp"], metrics["sharp-calibrated"]
    assert after["test/acc"] == before["test/acc"] and after["test/ece"] < before["test/ece"]
    report = json.loads(calibrated.with_suffix(".json").read_text())["test"]
    assert (before["test/ece"], after["test/ece"]) == pytest.approx((report["before"]["ece"], report["after"]["ece"]))

    paths = sorted((small_digits / "3").iterdir())[:7]
    listing = tmp_path / "images.txt"
    listing.write_text("\n".join(str(path) for path in paths))
    output = tmp_path / "predictions.csv"
    cli_main(["predict", "--ckpt_path", str(calibrated), "--data.predict_dir", str(listing),
              "--predictions.output", str(output)])  # fmt: skip
    predicted = np.array([[float(row[f"prob_{c}"]) for c in CLASSES] for row in read_csv(output)])
    temperature = torch.load(calibrated, weights_only=True)["net"]["temperature"]
    expected = softmax(independent_logits(overconfident, paths) / temperature, axis=1)
    np.testing.assert_allclose(predicted, expected, atol=1e-5)
    np.testing.assert_allclose(Predictor.from_checkpoint(calibrated).predict(paths).numpy(), expected, atol=1e-5)

    exported = tmp_path / "export"  # the temperature leaves the framework with the network
    cli_main(["export", "--ckpt_path", str(calibrated), "--output", str(exported), "--check", "none"])
    np.testing.assert_allclose(OnnxPredictor(exported / "model.onnx").predict(paths), expected, atol=1e-5)


def test_calibrate_writes_the_fitted_temperature_into_the_new_checkpoint(
    trained: Path, small_digits: Path, tmp_path: Path
) -> None:
    output = tmp_path / "calibrated.ckpt"
    cli_main(["calibrate", "--ckpt_path", str(trained), "--output", str(output), "--data.num_workers", "0"])
    written = torch.load(output, weights_only=True)
    temperature = written["net"]["temperature"]
    paths, targets = split_of(trained, "val", small_digits)
    logits = independent_logits(trained, paths)
    best = minimize_scalar(lambda t: nll(logits / t, targets), bounds=(0.05, 50), method="bounded",
                           options={"xatol": 1e-9})  # fmt: skip
    assert temperature == pytest.approx(best.x, abs=1e-3) and abs(temperature - 1.0) > 0.1  # not fit's 1
    assert written["hyper_parameters"]["temperature"] == temperature
    assert Predictor.from_checkpoint(output).net.temperature == temperature
    assert torch.load(trained, weights_only=True)["net"]["temperature"] == 1.0  # the source is left as it was


def test_calibrate_without_the_checkpoint_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    missing = tmp_path / "best.ckpt"
    with pytest.raises(SystemExit) as stopped:
        main(["calibrate", "--ckpt_path", str(missing)])
    assert stopped.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: --ckpt_path {missing} does not exist",
        "(--debug or CLASSIFIER_DEBUG=1 shows the traceback)",
    ]


@pytest.mark.slow
def test_calibrate_refuses_what_it_cannot_fit_or_write(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    checkpoint = torch.load(trained, weights_only=True)
    table = zlib.decompress(checkpoint["ImageFolderDataModule"]["splits"]).decode()
    checkpoint["ImageFolderDataModule"]["splits"] = zlib.compress(table.replace(",val,", ",train,").encode())
    torch.save(checkpoint, no_val := tmp_path / "no_val.ckpt")  # as if trained with --data.val_fraction 0
    del checkpoint["ImageFolderDataModule"]["splits"]  # as written before checkpoints froze their split
    torch.save(checkpoint, unsplit := tmp_path / "unsplit.ckpt")
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a folder")
    cases = {
        ("--ckpt_path", str(unsplit)): f"error: --ckpt_path {unsplit} records no frozen split (it predates split "
        "tables), so the images its run validated on are unknown; calibrating on others could fit on training "
        "images. Retrain, then calibrate.",
        ("--ckpt_path", str(no_val)): f"error: --ckpt_path {no_val}: its run held out no validation images, so "
        "there is nothing to fit on",
        ("--ckpt_path", str(trained), "--device", "gpu0"): "error: --device gpu0 is not a device torch knows (such "
        "as cpu, cuda, cuda:1 or mps)",
        ("--ckpt_path", str(trained), "--output", str(a_file / "x.ckpt")): f"error: --output {a_file / 'x.ckpt'}: "
        f"its folder {a_file} does not exist or is not a folder",
        ("--ckpt_path", str(trained), "--output", str(trained)): f"error: --output {trained} is the checkpoint being "
        "calibrated; give the calibrated one another name",
    }
    for args, message in cases.items():
        with pytest.raises(SystemExit):
            main(["calibrate", *args])
        assert capsys.readouterr().err.splitlines() == [message, "(--debug or CLASSIFIER_DEBUG=1 shows the traceback)"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["no_val.ckpt", "notes.txt", "unsplit.ckpt"]
