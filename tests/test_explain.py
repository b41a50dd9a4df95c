"""`classifier explain`: class activation maps of CNNs and of ViTs with register tokens at any input size, the run's
maps and page of examples worst mistakes first, seeded embeddings with TensorBoard projector files, and bad input."""

from __future__ import annotations

import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image

from classifier import ClassifierNet, Predictor, cli_main
from classifier.cli.entry import main
from classifier.commands.explain import unique_names
from classifier.evaluation.cams import (
    class_activation_maps,
    is_vit,
    patch_grid,
    reshape_for,
    target_layer,
    token_reshape,
)
from classifier.evaluation.embeddings import penultimate, sprite_thumb_size
from tests.helpers import read_csv, run_dir, save_image, tiny_config

CLASSES = ["0", "1", "2"]


@pytest.fixture(scope="module")
def three_digits(digits_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """30 scans each of the digits 0, 1 and 2."""
    root = tmp_path_factory.mktemp("three") / "digits"
    for name in CLASSES:
        (root / name).mkdir(parents=True)
        for image in sorted((digits_dir / name).iterdir())[:30]:
            shutil.copy(image, root / name / image.name)
    return root


@pytest.fixture(scope="module")
def checkpoint(three_digits: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """best.ckpt of one epoch of `test_resnet` at 32 px on the three digits, and its run's test split."""
    root = tmp_path_factory.mktemp("run")
    cli_main(["fit", "--config", str(tiny_config(root, three_digits, trainer={"max_epochs": 1}))])
    return run_dir(root, 0) / "checkpoints" / "best.ckpt"


def test_split(checkpoint: Path, three_digits: Path) -> tuple[list[Path], list[int]]:
    rows = [row for row in read_csv(checkpoint.parents[1] / "splits.csv") if row["split"] == "test"]
    return [three_digits / row["path"] for row in rows], [CLASSES.index(row["label"]) for row in rows]


test_split.__test__ = False  # a helper, not a test


def plain_resnet(checkpoint: Path) -> torch.nn.Module:
    """The checkpoint's network as plain timm, from its state dict alone."""
    state = torch.load(checkpoint, weights_only=True)["state_dict"]
    model = timm.create_model("test_resnet", num_classes=len(CLASSES))
    model.load_state_dict({key.removeprefix("net.backbone."): value for key, value in state.items()})
    return model.eval()


def plain_pixels(paths: list[Path]) -> torch.Tensor:
    """Normalised 32 px inputs from PIL: 8 px digits resized to 33 (32 / test_resnet's crop_pct 0.95), cropped to 32."""
    pixels = [np.asarray(Image.open(path).convert("RGB").resize((33, 33), Image.BILINEAR))[:32, :32] for path in paths]
    images = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float() / 255
    return (images - 0.5) / 0.5  # test_resnet's mean and std


def reference_gradcam(
    model: torch.nn.Module, images: torch.Tensor, layer: str, targets: list[int], channels_last: bool = False
) -> torch.Tensor:
    """Grad-CAM (Selvaraju et al., 2017) in plain PyTorch: the layer's maps weighted by their mean gradient for the
    target logit, ReLU, scaled to [0, 1], upsampled bilinearly to the input."""
    captured = {}
    hook = dict(model.named_modules())[layer].register_forward_hook(lambda m, i, output: captured.update(a=output))
    logits = model(images)
    hook.remove()
    activations = captured["a"]
    (gradients,) = torch.autograd.grad(logits[range(len(targets)), targets].sum(), activations)
    if channels_last:
        activations, gradients = activations.permute(0, 3, 1, 2), gradients.permute(0, 3, 1, 2)
    cam = (gradients.mean(dim=(2, 3), keepdim=True) * activations).sum(dim=1).relu().detach()
    cam = cam - cam.amin(dim=(1, 2), keepdim=True)
    cam = cam / (cam.amax(dim=(1, 2), keepdim=True) + 1e-7)
    return F.interpolate(cam[:, None], size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]


def assert_maps(maps: np.ndarray, shape: tuple[int, ...]) -> None:
    """Finite, in [0, 1], and spread over it: each map spans most of [0, 1] unless ReLU left nothing, and most do."""
    assert maps.shape == shape
    assert np.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1
    spread = maps.max(axis=(1, 2)) - maps.min(axis=(1, 2))
    assert np.all((spread > 0.9) | (maps.max(axis=(1, 2)) == 0)), spread
    assert (spread > 0.9).mean() >= 0.5, spread


@pytest.mark.slow  # the module's 1-epoch fit
def test_a_cnn_checkpoints_gradcam_is_plain_pytorchs_on_the_stage_that_still_has_a_map(
    checkpoint: Path, three_digits: Path
) -> None:
    predictor = Predictor.from_checkpoint(checkpoint)
    # layer4 of test_resnet reduces 32 px to 1x1, a map that is the same everywhere; layer3 leaves 2x2
    assert target_layer(predictor.net) == "backbone.layer3"
    paths, labels = test_split(checkpoint, three_digits)
    images = plain_pixels(paths)
    model = plain_resnet(checkpoint)
    with torch.no_grad():
        predicted = model(images).argmax(dim=1).tolist()
    maps = class_activation_maps(predictor.net, images, predicted, "gradcam")
    assert_maps(maps, (len(paths), 32, 32))
    np.testing.assert_allclose(maps, reference_gradcam(model, images, "layer3", predicted).numpy(), atol=1e-4)
    others = [(label + 1) % 3 for label in labels]  # the target is honoured: another class, another map
    maps = class_activation_maps(predictor.net, images, others, "gradcam")
    np.testing.assert_allclose(maps, reference_gradcam(model, images, "layer3", others).numpy(), atol=1e-4)
    for method in ("gradcam++", "eigencam"):
        assert_maps(class_activation_maps(predictor.net, images, predicted, method), (len(paths), 32, 32))


def test_the_token_reshape_lays_each_patch_on_its_grid_cell_and_drops_class_and_register_tokens() -> None:
    rows, columns, prefix = 3, 4, 2
    tokens = torch.full((2, prefix + rows * columns, 5), -1.0)
    for r in range(rows):
        for c in range(columns):
            tokens[:, prefix + r * columns + c] = 10 * r + c
    maps = token_reshape(prefix, (rows, columns))(tokens)
    assert maps.shape == (2, 5, rows, columns)
    assert torch.equal(maps[0, 0], torch.tensor([[10.0 * r + c for c in range(columns)] for r in range(rows)]))
    with pytest.raises(ValueError, match="13 tokens are not 2 prefix tokens and a 3x4 patch grid"):
        token_reshape(prefix, (rows, columns))(tokens[:, 1:])


@pytest.mark.parametrize(
    ("name", "kwargs", "prefix"),
    [
        ("test_vit2", {}, 1),  # a register token and no class token; sizes taken from the input
        (
            "vit_tiny_patch16_224",
            {"img_size": (48, 64), "reg_tokens": 1, "depth": 2, "embed_dim": 48, "num_heads": 2},
            2,
        ),  # a class and a register token; built for 48x64
    ],  # fmt: skip
)
def test_a_vits_maps_follow_its_patch_grid_at_a_non_224_input(name: str, kwargs: dict, prefix: int) -> None:
    torch.manual_seed(0)
    net = ClassifierNet("test_vit2", CLASSES, image_size=48)
    net.backbone = timm.create_model(name, num_classes=len(CLASSES), **kwargs)
    for module in net.backbone.modules():  # timm draws a ViT's weights with std 0.02: its gradients at the last block
        if isinstance(module, torch.nn.Linear):  # (about 1e-9) fall under grad-cam's epsilon (1e-7), a flat map
            module.reset_parameters()
    assert is_vit(net.backbone) and net.backbone.num_prefix_tokens == prefix
    layer = target_layer(net)
    assert layer == f"backbone.blocks.{len(net.backbone.blocks) - 1}.norm1"
    assert patch_grid(net.backbone, 48, 64) == (3, 4)
    images = torch.randn(4, 3, 48, 64)
    captured = {}
    dict(net.named_modules())[layer].register_forward_hook(lambda m, i, output: captured.update(tokens=output))
    net.eval()(images)
    assert reshape_for(net, 48, 64)(captured["tokens"]).shape == (4, net.backbone.embed_dim, 3, 4)
    for method in ("gradcam", "gradcam++", "eigencam"):
        assert_maps(class_activation_maps(net, images, [0, 1, 2, 0], method), (4, 48, 64))


def test_a_channels_last_backbones_stages_are_read_channels_first() -> None:
    torch.manual_seed(0)
    net = ClassifierNet("test_mambaout", CLASSES, image_size=64).eval()  # stages output (B, H, W, C)
    layer = target_layer(net)
    captured = {}
    dict(net.named_modules())[layer].register_forward_hook(lambda m, i, output: captured.update(maps=output))
    images = torch.randn(3, 3, 64, 64)
    net(images)
    channels = net.backbone.feature_info[-1]["num_chs"]
    assert captured["maps"].shape == (3, 2, 2, channels)
    maps = class_activation_maps(net, images, [0, 1, 2], "gradcam")
    assert_maps(maps, (3, 64, 64))
    expected = reference_gradcam(net, images, layer, [0, 1, 2], channels_last=True).numpy()
    np.testing.assert_allclose(maps, expected, atol=1e-4)


@pytest.mark.slow  # the module's 1-epoch fit
def test_explain_maps_the_test_split_worst_mistakes_first(checkpoint: Path, three_digits: Path) -> None:
    cli_main(["explain", "--ckpt_path", str(checkpoint)])
    (folder,) = (checkpoint.parents[1] / "explain").iterdir()  # explain/<timestamp> in the run's folder
    paths, labels = test_split(checkpoint, three_digits)
    rows = read_csv(folder / "cams.csv")
    assert sorted(row["path"] for row in rows) == sorted(map(str, paths))
    with torch.no_grad():
        probs = plain_resnet(checkpoint)(plain_pixels(paths)).softmax(dim=1).numpy()
    label_of = dict(zip(map(str, paths), labels, strict=True))
    expected = {str(path): p for path, p in zip(paths, probs, strict=True)}
    mistakes = [row["label"] != row["prediction"] for row in rows]
    assert any(mistakes) and mistakes == sorted(mistakes, reverse=True)  # every mistake before every right answer
    losses = [-math.log(expected[row["path"]][label_of[row["path"]]]) for row in rows]
    for group in (True, False):
        in_group = [loss for loss, mistake in zip(losses, mistakes, strict=True) if mistake == group]
        assert in_group == sorted(in_group, reverse=True)
    for row in rows:
        p = expected[row["path"]]
        assert row["label"] == CLASSES[label_of[row["path"]]] and row["prediction"] == CLASSES[p.argmax()]
        assert row["target"] == row["prediction"] and float(row["target_probability"]) == pytest.approx(p.max())
        with Image.open(folder / row["overlay"]) as overlay:
            assert overlay.size == (32, 32) and overlay.mode == "RGB"
    assert len(list((folder / "cams").iterdir())) == len(rows)
    with Image.open(folder / "cam_grid.png") as grid:
        assert grid.width > 800


@pytest.mark.slow  # the module's 1-epoch fit
def test_explain_on_a_folder_labels_by_subfolder_keeps_colliding_names_apart_and_limits(
    checkpoint: Path, three_digits: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "images"
    for name in CLASSES:  # the same file name in every class folder
        save_image(folder / name / "scan.png", Image.open(sorted((three_digits / name).iterdir())[-1]))
    (folder / "0" / "broken.png").write_bytes(b"not a png")  # skipped, with a warning
    out = tmp_path / "out"
    cli_main(["explain", "--ckpt_path", str(checkpoint), "--data.predict_dir", str(folder), "--target", "true",
              "--method", "gradcam++", "--out", str(out)])  # fmt: skip
    broken = folder / "0" / "broken.png"
    assert f"Skipping 1 unreadable images of --data.predict_dir {folder}:\n  {broken}: " in caplog.text
    rows = read_csv(out / "cams.csv")
    assert sorted(row["overlay"] for row in rows) == ["cams/scan-2.png", "cams/scan-3.png", "cams/scan.png"]
    assert sorted(row["label"] for row in rows) == CLASSES and all(row["target"] == row["label"] for row in rows)
    cli_main(["explain", "--ckpt_path", str(checkpoint), "--data.predict_dir", str(folder), "--target", "2",
              "--limit", "2", "--out", str(tmp_path / "two")])  # fmt: skip
    limited = read_csv(tmp_path / "two" / "cams.csv")
    assert [row["path"] for row in limited] == [row["path"] for row in rows[:2]]  # the two worst, as ranked before
    assert [row["target"] for row in limited] == ["2", "2"]
    assert unique_names([Path("a/x.png"), Path("b/x.png"), Path("x-2.jpg"), Path("c/x.png")]) == [
        "x.png", "x-2.png", "x-2-2.png", "x-3.png"
    ]  # fmt: skip


@pytest.mark.slow  # the module's 1-epoch fit
def test_embeddings_are_the_last_linears_input_seeded_and_ready_for_the_projector(
    checkpoint: Path, three_digits: Path, tmp_path: Path
) -> None:
    runs = [tmp_path / "first", tmp_path / "second"]
    for out in runs:
        cli_main(["explain", "--ckpt_path", str(checkpoint), "--embeddings", "--seed", "3", "--out", str(out)])
    first, second = (read_csv(out / "embeddings.csv") for out in runs)
    assert first == second  # the same seed, the same t-SNE
    paths, labels = test_split(checkpoint, three_digits)
    assert [row["path"] for row in first] == list(map(str, paths))
    assert [row["label"] for row in first] == [CLASSES[label] for label in labels]
    features = np.load(runs[0] / "embeddings.npy")
    model, captured = plain_resnet(checkpoint), {}
    model.fc.register_forward_pre_hook(lambda module, inputs: captured.update(features=inputs[0]))
    with torch.no_grad():
        logits = model(plain_pixels(paths))
    np.testing.assert_allclose(features, captured["features"].numpy(), atol=1e-5)
    assert [row["prediction"] for row in first] == [CLASSES[i] for i in logits.argmax(dim=1)]
    projector = runs[0] / "projector" / "00000" / "penultimate"
    metadata = (projector / "metadata.tsv").read_text().splitlines()
    assert metadata[0] == "path\tlabel\tprediction" and len(metadata) == len(paths) + 1
    assert metadata[1:] == [f"{row['path']}\t{row['label']}\t{row['prediction']}" for row in first]
    assert (projector / "tensors.tsv").read_text().count("\n") == len(paths)
    with Image.open(projector / "sprite.png") as sprite:
        assert sprite.size == (math.ceil(math.sqrt(len(paths))) * 64,) * 2
    assert (runs[0] / "embedding.png").is_file()
    cli_main(["explain", "--ckpt_path", str(checkpoint), "--embeddings", "--projection", "pca", "--out",
              str(tmp_path / "pca")])  # fmt: skip
    xy = np.array([[float(row["x"]), float(row["y"])] for row in read_csv(tmp_path / "pca" / "embeddings.csv")])
    centred = features - features.mean(axis=0)
    _, _, components = np.linalg.svd(centred, full_matrices=False)
    np.testing.assert_allclose(np.abs(xy), np.abs(centred @ components[:2].T), rtol=1e-4, atol=1e-4)


def test_an_mlp_heads_embeddings_are_its_last_hidden_layer() -> None:
    torch.manual_seed(0)
    net = ClassifierNet("test_resnet", CLASSES, head_hidden_dims=[16, 8]).eval()
    captured = {}
    net.head[-1].register_forward_pre_hook(lambda module, inputs: captured.update(features=inputs[0]))
    images = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        features, logits = penultimate(net, images)
        torch.testing.assert_close(logits, net(images))
    torch.testing.assert_close(features, captured["features"])
    assert features.shape == (5, 8)


def test_the_sprite_stays_within_8192_pixels() -> None:
    for count in (1, 14, 10_000, 100_000, 8192**2):
        side = sprite_thumb_size(count)
        assert 1 <= side <= 64 and math.ceil(math.sqrt(count)) * side <= 8192
    assert sprite_thumb_size(10_000) == 64 and sprite_thumb_size(100_000) == 25
    assert sprite_thumb_size(8192**2 + 1) == 0  # not even one pixel each: no sprite


@pytest.mark.slow  # the module's 1-epoch fit
def test_bad_input_is_one_clear_error_before_any_work(
    checkpoint: Path, three_digits: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    ckpt = str(checkpoint)
    out = tmp_path / "out"
    unlabelled = save_image(tmp_path / "flat" / "scan.png", Image.open(next((three_digits / "0").iterdir()))).parent
    cases = [
        (["--target", "7"], "--target 7: give pred, true or one of the checkpoint's classes: 0, 1, 2"),
        (["--data.predict_dir", str(unlabelled), "--target", "true"],
         f"--target true needs labels, and --data.predict_dir {unlabelled} (1 images) has none"),
        (["--layer", "layer9"], "--layer layer9 is not a module of test_resnet. Did you mean backbone.layer4 or "
         "backbone.layer3 or backbone.layer2? Names are those of `net.named_modules()`"),
        (["--limit", "0"], "--limit 0: give a positive number"),
        (["--data.data_dir", str(tmp_path / "moved")], f"--data.data_dir {tmp_path / 'moved'} does not exist: pass "
         "--data.data_dir where the run's images are now"),
    ]  # fmt: skip
    for args, message in cases:
        with pytest.raises((ValueError, FileNotFoundError), match=re.escape(message)):
            cli_main(["explain", "--ckpt_path", ckpt, "--out", str(out), *args])
        assert not out.exists()  # nothing written
    missing = tmp_path / "missing.ckpt"
    capsys.readouterr()  # what the cases above logged
    with pytest.raises(SystemExit) as stopped:
        main(["explain", "--ckpt_path", str(missing)])
    assert stopped.value.code == 2
    assert capsys.readouterr().err.splitlines()[0] == f"error: --ckpt_path {missing} does not exist"
