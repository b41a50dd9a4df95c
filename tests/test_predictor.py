"""A checkpoint is a self-contained model: it tests and predicts anywhere, with nothing but the image files."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import yaml
from PIL import Image

from classifier import ImageFolderDataModule, Predictor, cli_main
from classifier.data.datasets import ImageDataset
from classifier.data.images import load_rgb
from tests.helpers import read_csv, run_dir, tiny_config, write_photos

CLASSES = ["disc", "square", "stripes"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_photos(tmp_path_factory.mktemp("photos") / "photos", per_class=12)


@pytest.fixture(scope="module")
def trained(photos: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One epoch from local 'pretrained' weights, which are deleted once the fit is done."""
    root = tmp_path_factory.mktemp("trained")
    weights = root / "pretrained.pth"
    torch.save(timm.create_model("test_resnet", num_classes=1000).state_dict(), weights)
    # crop_pct 0.875: eval resizes to 36 px, so the 80-140 px JPEGs would decode at half scale with a draft
    data = {"crop_pct": 0.875, "val_fraction": 0.25, "test_fraction": 0.25, "batch_size": 8}
    config = tiny_config(root, photos, trainer={"max_epochs": 1}, model={"pretrained": str(weights)}, data=data)
    cli_main(["fit", "--config", str(config)])
    weights.unlink()
    return root


def best(trained: Path) -> Path:
    return run_dir(trained, 0) / "checkpoints" / "best.ckpt"


def probabilities(predictions: Path) -> dict[str, np.ndarray]:
    """File name -> class probabilities, from a predictions.csv."""
    rows = read_csv(predictions)
    return {Path(row["path"]).name: np.array([float(row[f"prob_{c}"]) for c in CLASSES]) for row in rows}


def edited_checkpoint(source: Path, target: Path, model: dict | None = None, data: dict | None = None) -> Path:
    """A copy of `source` whose saved settings are changed, as if trained elsewhere."""
    checkpoint = torch.load(source, weights_only=True)
    checkpoint["hyper_parameters"].update(model or {})
    checkpoint["datamodule_hyper_parameters"].update(data or {})
    torch.save(checkpoint, target)
    return target


def test_a_checkpoint_tests_after_its_pretrained_weights_file_is_gone(trained: Path) -> None:
    checkpoint = torch.load(best(trained), weights_only=True)
    assert checkpoint["hyper_parameters"]["pretrained"].endswith("pretrained.pth")  # the file the fit started from
    cli_main(["test", "--ckpt_path", str(best(trained))])
    rows = read_csv(run_dir(trained, 0) / "test" / "predictions.csv")
    assert len(rows) == 9  # a quarter of 36 photos
    metrics = yaml.safe_load((run_dir(trained, 0) / "test" / "metrics.json").read_text())
    assert metrics["test/acc"] == pytest.approx(np.mean([row["target"] == row["prediction"] for row in rows]))


def test_a_checkpoint_fine_tuned_from_hub_weights_tests_offline(
    trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # a checkpoint outside a run folder files its evaluation under ./lightning_logs
    hub = edited_checkpoint(best(trained), tmp_path / "hub.ckpt", model={"pretrained": True})
    output = tmp_path / "predictions.csv"
    cli_main(["validate", "--ckpt_path", str(hub), "--predictions.output", str(output)])
    predictor = Predictor.from_checkpoint(hub)
    expected = predictor.predict([Path(row["path"]) for row in read_csv(output)]).numpy()
    np.testing.assert_allclose(np.stack(list(probabilities(output).values())), expected, atol=1e-6)


def test_machine_settings_stay_with_the_machine(trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    elsewhere = edited_checkpoint(
        best(trained),
        tmp_path / "from_a_gpu_node.ckpt",
        model={"channels_last": True, "compile": True},
        data={"decode": "gpu", "cache": "ram", "num_workers": 7},
    )
    output = tmp_path / "predictions.csv"
    monkeypatch.chdir(tmp_path)
    cli_main(["test", "--ckpt_path", str(elsewhere), "--predictions.output", str(output)])  # on a CPU
    run = Path("lightning_logs") / "evaluations" / "from_a_gpu_node" / "test"  # outside a run folder
    used = yaml.safe_load((run / "config.yaml").read_text())
    assert (used["data"]["decode"], used["data"]["cache"], used["data"]["num_workers"]) == ("auto", "none", None)
    assert (used["model"]["channels_last"], used["model"]["compile"]) == (None, False)
    assert len(read_csv(output)) == 9


@pytest.mark.slow
def test_every_eval_path_gives_the_same_probabilities(trained: Path, photos: Path, tmp_path: Path) -> None:
    val = [photos / row["path"] for row in read_csv(run_dir(trained, 0) / "splits.csv") if row["split"] == "val"]
    assert {path.suffix for path in val} == {".jpg", ".png"}
    runs = {
        "validate": [],
        "validate, RAM cache": ["--data.cache", "ram"],
        "validate, 2 loader workers": ["--data.num_workers", "2"],
    }
    found = {}
    for name, flags in runs.items():
        output = tmp_path / f"{name}.csv"
        cli_main(["validate", "--ckpt_path", str(best(trained)), "--predictions.output", str(output), *flags])
        found[name] = probabilities(output)
    listing = tmp_path / "val.txt"
    listing.write_text("\n".join(str(path) for path in val))
    cli_main(["predict", "--ckpt_path", str(best(trained)), "--data.predict_dir", str(listing),
              "--predictions.output", str(tmp_path / "predict.csv")])  # fmt: skip
    found["predict"] = probabilities(tmp_path / "predict.csv")
    predictor = Predictor.from_checkpoint(best(trained))
    names = [path.name for path in val]
    for name, inputs in {
        "Predictor on paths": val,
        "Predictor on PIL images": [Image.open(path) for path in val],
        "Predictor on uint8 arrays": [np.asarray(load_rgb(path)) for path in val],
    }.items():
        found[name] = dict(zip(names, predictor.predict(inputs).numpy(), strict=True))
    reference = found.pop("validate")
    assert sorted(reference) == sorted(names)
    for name, probs in found.items():
        assert sorted(probs) == sorted(reference), name
        for image, expected in reference.items():
            np.testing.assert_allclose(probs[image], expected, atol=1e-6, err_msg=f"{name}: {image}")


def eval_batches(photos: Path, **settings) -> list[torch.Tensor]:
    """Validation images as the model receives them, through the hooks a trainer calls, outside any trainer."""
    module = ImageFolderDataModule(str(photos), backbone="test_efficientnet", image_size=32, crop_pct=0.875,
                                   num_workers=0, **settings)  # fmt: skip
    module.setup("fit")
    cpu = torch.device("cpu")
    return [
        module.on_after_batch_transfer(module.transfer_batch_to_device(batch, cpu, 0), 0)[0]
        for batch in module.val_dataloader()
    ]


def test_gpu_decoding_evaluates_with_the_same_pixels_as_the_cpu(photos: Path) -> None:
    # --data.decode gpu outside a trainer runs its code on CPU tensors; test_efficientnet resizes bicubically
    gpu = ImageFolderDataModule(str(photos), backbone="test_efficientnet", decode="gpu", num_workers=0)
    gpu.setup("fit")
    assert isinstance(gpu.datasets["val"], ImageDataset)  # eval is never resampled on the device
    for decoded_on_gpu, decoded_on_cpu in zip(
        eval_batches(photos, decode="gpu"), eval_batches(photos, decode="cpu"), strict=True
    ):
        torch.testing.assert_close(decoded_on_gpu, decoded_on_cpu, atol=0, rtol=0)
    for cached, from_files in zip(eval_batches(photos, cache="ram"), eval_batches(photos), strict=True):
        torch.testing.assert_close(cached, from_files, atol=0, rtol=0)


def test_predictor_refuses_what_it_cannot_trust(trained: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Hostile:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    hostile = tmp_path / "hostile.ckpt"
    torch.save({"state_dict": Hostile()}, hostile)
    with pytest.raises(
        ValueError, match=f"checkpoint {hostile} holds pickled objects other than tensors and plain data"
    ):
        Predictor.from_checkpoint(hostile)
    assert not marker.exists()
    with pytest.raises(FileNotFoundError, match=f"checkpoint {tmp_path / 'gone.ckpt'} does not exist"):
        Predictor.from_checkpoint(tmp_path / "gone.ckpt")
    weights_only = tmp_path / "weights.pth"
    torch.save(timm.create_model("test_resnet").state_dict(), weights_only)
    with pytest.raises(ValueError, match=f"{weights_only} holds no network description"):
        Predictor.from_checkpoint(weights_only)
    for name, content in (("notes.ckpt", b"not a checkpoint"), ("cut.ckpt", best(trained).read_bytes()[:5000])):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=f"checkpoint {tmp_path / name} is not a readable checkpoint"):
            Predictor.from_checkpoint(tmp_path / name)
    predictor = Predictor.from_checkpoint(best(trained))
    with pytest.raises(ValueError, match="arrays must be uint8 HWC RGB or HW grey images, not float64"):
        predictor.predict(np.zeros((40, 40, 3)))
    with pytest.raises(TypeError, match="cannot predict on a int: pass paths, PIL images or uint8 arrays"):
        predictor.predict([3])


def test_predictor_carries_class_names_and_preprocessing(trained: Path, tmp_path: Path) -> None:
    moved = tmp_path / "elsewhere" / "model.ckpt"
    moved.parent.mkdir()
    shutil.copy(best(trained), moved)
    predictor = Predictor.from_checkpoint(moved)
    assert predictor.class_names == CLASSES
    assert predictor.preprocessing == {
        "input_size": [3, 32, 32],
        "interpolation": "bilinear",
        "crop_pct": 0.875,
        "crop_mode": "center",
        "mean": [0.5, 0.5, 0.5],
        "std": [0.5, 0.5, 0.5],
    }
    image = np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    one = predictor.predict(image)
    assert one.shape == (3,) and float(one.sum()) == pytest.approx(1.0, abs=1e-6)
    flipped = Predictor.from_checkpoint(edited_checkpoint(moved, tmp_path / "tta.ckpt", model={"tta": "flip"}))
    assert flipped.tta == "flip"
    expected = (predictor.predict(image) + predictor.predict(np.ascontiguousarray(image[:, ::-1]))) / 2
    torch.testing.assert_close(flipped.predict(image), expected, atol=1e-6, rtol=0)
    assert Predictor.from_checkpoint(tmp_path / "tta.ckpt", tta="none").tta is None


def test_evaluation_keeps_the_preprocessing_the_checkpoint_was_trained_with(
    trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # a checkpoint outside a run folder files its evaluation under ./lightning_logs
    # as if a newer timm had changed the backbone's defaults since the fit: the checkpoint's own copy rules
    checkpoint = torch.load(best(trained), weights_only=True)
    checkpoint["net"]["preprocessing"].update(mean=[0.2, 0.3, 0.4], std=[0.3, 0.2, 0.25], interpolation="bicubic")
    stored = tmp_path / "stored.ckpt"
    torch.save(checkpoint, stored)
    cli_main(["validate", "--ckpt_path", str(stored), "--predictions.output", str(tmp_path / "val.csv")])
    paths = [Path(row["path"]) for row in read_csv(tmp_path / "val.csv")]
    (tmp_path / "val.txt").write_text("\n".join(str(path) for path in paths))
    cli_main(["predict", "--ckpt_path", str(stored), "--data.predict_dir", str(tmp_path / "val.txt"),
              "--predictions.output", str(tmp_path / "predict.csv")])  # fmt: skip
    probs = Predictor.from_checkpoint(stored).predict(paths).numpy()
    expected = dict(zip([path.name for path in paths], probs, strict=True))
    for output in ("val.csv", "predict.csv"):
        found = probabilities(tmp_path / output)
        assert sorted(found) == sorted(expected)
        for name, probs in found.items():
            np.testing.assert_allclose(probs, expected[name], atol=1e-6, err_msg=f"{output}: {name}")
