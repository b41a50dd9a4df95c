"""The shipped recipes (configs/recipes/), each run as shipped on a small folder of its layout: only the data folder,
the epochs and the image size (16 px, which every recipe's backbone takes) are overridden, on folders of a few dozen
images: an epoch is one or two steps. Pretrained weights come from a Hugging Face cache the test fills, read offline,
as a machine that downloaded them once would."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import huggingface_hub
import mlflow
import numpy as np
import pytest
import timm
import torch
import yaml
from safetensors.torch import save_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from classifier import cli_main
from classifier.data.scenes import LABELS, write_scenes
from classifier.model.checkpoints import read_checkpoint
from tests.helpers import REPO, read_csv

RECIPES = REPO / "configs" / "recipes"
SIZE = ["--data.image_size", "16"]
OVERRIDES = ["--trainer.max_epochs", "1", *SIZE]


def plant_hub_weights(hf_home: Path, backbone: str) -> dict[str, torch.Tensor]:
    """Put a `backbone` state dict where timm's `pretrained=True` finds it in the Hugging Face cache; returns it."""
    repo_id = timm.models.get_pretrained_cfg(backbone).hf_hub_id
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(snapshot.name)
    state = {key: value.contiguous() for key, value in timm.create_model(backbone).state_dict().items()}
    save_file(state, str(snapshot / "model.safetensors"))
    return state


def copy_digits(digits_dir: Path, dest: Path, counts: dict[str, int], offset: int = 0) -> Path:
    """`counts[digit]` scans of each digit (from the `offset`-th on) under dest/<digit>/."""
    for digit, count in counts.items():
        (dest / digit).mkdir(parents=True)
        for path in sorted((digits_dir / digit).glob("*.png"))[offset : offset + count]:
            shutil.copy(path, dest / digit / path.name)
    return dest


def classifier(cwd: Path, *args: str) -> None:
    """The `classifier` command in `cwd` (the recipes log under ./lightning_logs), offline, with the hub weights
    planted in a cache of its own. It runs in this process, as the other tests' commands do (a process of its own
    spends 5 s importing): HF_HOME and HF_HUB_OFFLINE are set, and so is what huggingface_hub read of them when it
    was imported."""
    hf_home = cwd / "hf"
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(cwd)
        patch.setenv("HF_HOME", str(hf_home))
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setattr(huggingface_hub.constants, "HF_HOME", str(hf_home))
        patch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hf_home / "hub"))
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        cli_main(list(args))


@pytest.mark.parametrize("recipe", sorted(RECIPES.glob("*.yaml")), ids=lambda path: path.stem)
def test_every_recipe_parses_with_its_settings(recipe: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli_main(["fit", "--config", str(recipe), "--print_config"])
    assert exit_.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    shipped = yaml.safe_load(recipe.read_text())
    for group in ("model", "data"):
        for key, value in shipped[group].items():
            if not isinstance(value, dict):
                assert printed[group][key] == (list(value) if isinstance(value, tuple) else value), (group, key)
    loggers = printed["trainer"]["logger"]
    first = loggers[0] if isinstance(loggers, list) else loggers
    assert first["class_path"].endswith("TensorBoardLogger")  # its folder is the run folder


def test_the_recipes_are_the_ones_the_readme_documents() -> None:
    readme = (REPO / "docs" / "recipes.md").read_text()
    for recipe in RECIPES.glob("*.yaml"):
        assert f"configs/recipes/{recipe.name}" in readme


@pytest.mark.slow
def test_binary_small_trains_the_head_on_a_frozen_pretrained_backbone_then_thaws_it(
    tmp_path: Path, digits_dir: Path
) -> None:
    """Five frozen epochs leave every backbone tensor as the hub gave it (BatchNorm statistics too); the sixth,
    resumed, trains it."""
    planted = plant_hub_weights(tmp_path / "hf", "resnet50")
    data = copy_digits(digits_dir, tmp_path / "binary_small", {"1": 50, "3": 50})
    recipe = str(RECIPES / "binary_small.yaml")
    args = ["fit", "--config", recipe, "--data.data_dir", str(data), *SIZE]
    classifier(tmp_path, *args, "--trainer.max_epochs", "5")
    run = tmp_path / "lightning_logs" / "binary_small" / "version_0"
    splits = Counter(row["split"] for row in read_csv(run / "splits.csv"))
    # 15% of 100; two steps an epoch: the cosine of the first run's 10 steps is back at 0 for the 11th, not the 12th
    assert splits == {"train": 70, "val": 15, "test": 15}

    def backbone(checkpoint: Path) -> dict[str, torch.Tensor]:
        state = read_checkpoint(checkpoint)["state_dict"]
        return {key.removeprefix("net.backbone."): value for key, value in state.items() if ".backbone." in key}

    frozen = backbone(run / "checkpoints" / "last.ckpt")
    assert set(frozen) == {key for key in planted if not key.startswith("fc.")}
    assert all(torch.equal(frozen[key], planted[key]) for key in frozen)
    head = read_checkpoint(run / "checkpoints" / "last.ckpt")["state_dict"]
    assert [tuple(head[f"net.head.{i}.weight"].shape) for i in (0, 1, 4)] == [(256, 2048), (256,), (2, 256)]

    classifier(tmp_path, *args, "--trainer.max_epochs", "6", "--ckpt_path", "last")
    thawed = backbone(run / "checkpoints" / "last.ckpt")
    assert not torch.equal(thawed["conv1.weight"], planted["conv1.weight"])
    assert json.loads((run / "summary.json").read_text())["epochs"] == 6


@pytest.mark.slow
def test_train_val_test_folders_resumes_logs_confusion_matrices_and_scores_every_test_image(
    tmp_path: Path, digits_dir: Path
) -> None:
    data = tmp_path / "split"
    for split, (offset, count) in {"train": (0, 8), "val": (8, 4), "test": (12, 4)}.items():
        copy_digits(digits_dir, data / split, dict.fromkeys(("3", "5", "8"), count), offset)
    plant_hub_weights(tmp_path / "hf", "resnet18")
    args = ["fit", "--config", str(RECIPES / "train_val_test_folders.yaml"), "--data.data_dir", str(data)]
    classifier(tmp_path, *args, *OVERRIDES)
    classifier(tmp_path, *args, *SIZE, "--trainer.max_epochs", "2", "--ckpt_path", "last")
    run = tmp_path / "lightning_logs" / "train_val_test_folders" / "version_0"
    assert not run.with_name("version_1").exists()  # resumed in place
    assert Counter(row["split"] for row in read_csv(run / "splits.csv")) == {"train": 24, "val": 12, "test": 12}
    images = []
    for events in run.glob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events), size_guidance={"images": 0}).Reload()
        if "val/confusion_matrix" in accumulator.Tags()["images"]:
            images += [event.step for event in accumulator.Images("val/confusion_matrix")]
    assert sorted(images) == [0, 1]

    classifier(tmp_path, "test", "--ckpt_path", str(run / "checkpoints" / "best.ckpt"))
    rows = read_csv(run / "test" / "predictions.csv")
    expected = sorted(str(path.resolve()) for path in (data / "test").rglob("*.png"))
    assert sorted(str(Path(row["path"]).resolve()) for row in rows) == expected
    assert {row["target"] for row in rows} == {"3", "5", "8"}


@pytest.mark.slow
def test_cifar_vit_trains_with_its_regularisers_and_reports_calibration(tmp_path: Path, digits_dir: Path) -> None:
    data = tmp_path / "cifar"
    copy_digits(digits_dir, data / "train", dict.fromkeys("0123456789", 10))  # 10% held out: one val image a class
    copy_digits(digits_dir, data / "test", dict.fromkeys("0123456789", 2), offset=10)
    plant_hub_weights(tmp_path / "hf", "vit_small_patch16_224")
    args = ["--config", str(RECIPES / "cifar_vit.yaml"), "--data.data_dir", str(data), *OVERRIDES]
    classifier(tmp_path, "fit", *args)
    run = tmp_path / "lightning_logs" / "cifar_vit" / "version_0"
    hparams = read_checkpoint(run / "checkpoints" / "best.ckpt")["hyper_parameters"]
    assert (hparams["ema_decay"], hparams["layer_decay"], hparams["mixup_alpha"]) == (0.9998, 0.75, 0.8)
    classifier(tmp_path, "test", "--ckpt_path", str(run / "checkpoints" / "best.ckpt"))
    metrics = json.loads((run / "test" / "metrics.json").read_text())
    assert 0 <= metrics["test/ece"] <= 1
    assert (run / "test" / "reliability_diagram.png").stat().st_size > 0


@pytest.mark.slow
def test_cat_breeds_cross_validates_five_folds_with_focal_loss_and_class_weights(
    tmp_path: Path, digits_dir: Path
) -> None:
    counts = {"0": 16, "1": 12, "2": 10, "3": 8, "4": 7, "5": 6}  # past the test split, an image a class per fold
    data = copy_digits(digits_dir, tmp_path / "cats", counts)
    plant_hub_weights(tmp_path / "hf", "efficientnet_b0")
    recipe = str(RECIPES / "cat_breeds_focal_kfold.yaml")
    classifier(tmp_path, "cv", "--config", recipe, "--data.data_dir", str(data), *OVERRIDES)
    root = tmp_path / "lightning_logs" / "cat_breeds"
    summary = json.loads((root / "cv_0" / "cv_summary.json").read_text())
    assert len(summary["folds"]) == 5
    oof = read_csv(root / "cv_0" / "oof_predictions.csv")
    run = root / "version_0"
    splits = read_csv(run / "splits.csv")
    assert len(oof) == sum(row["split"] != "test" for row in splits)
    assert {row["fold"] for row in oof} == {"0", "1", "2", "3", "4"}
    checkpoint = read_checkpoint(run / "checkpoints" / "best.ckpt")
    hparams = checkpoint["hyper_parameters"]
    assert (hparams["loss"], hparams["class_weights"]) == ("focal", "auto")
    train = Counter(row["label"] for row in splits if row["split"] == "train")
    expected = [sum(train.values()) / (len(train) * train[name]) for name in sorted(counts)]  # n / (k * n_c)
    weights = checkpoint["state_dict"]["criterion.weight"]
    assert torch.allclose(weights, torch.tensor(expected), rtol=1e-5), (weights, expected)
    # the ensemble's test/loss is the folds' criterion (focal, their class weights averaged), as each fold's is
    folds = [read_checkpoint(root / f"version_{fold}" / "checkpoints" / "best.ckpt") for fold in range(5)]
    mean_weights = torch.stack([fold["state_dict"]["criterion.weight"] for fold in folds]).mean(0).double().numpy()
    ensemble = read_csv(root / "cv_0" / "ensemble" / "predictions.csv")
    classes = sorted(counts)
    probs = np.array([[float(row[f"prob_{name}"]) for name in classes] for row in ensemble])
    targets = np.array([classes.index(row["target"]) for row in ensemble])
    smoothed = np.eye(len(classes))[targets] * (1 - hparams["label_smoothing"]) + hparams["label_smoothing"] / 6
    terms = -(mean_weights * smoothed * (1 - probs) ** hparams["focal_gamma"] * np.log(probs)).sum()
    ensemble_loss = json.loads((root / "cv_0" / "ensemble" / "metrics.json").read_text())["test/loss"]
    assert ensemble_loss == pytest.approx(terms / mean_weights[targets].sum(), rel=1e-5)
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'lightning_logs' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("cat_breeds").experiment_id])
    (parent,) = [run for run in runs if run.info.run_name == "cv_0"]
    children = [run for run in runs if run.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(run.info.run_name for run in children) == [f"version_{fold}" for fold in range(5)]
    mean = parent.data.metrics["mean/val/f1_macro"]
    assert mean == pytest.approx(summary["mean"]["val/f1_macro"], rel=5e-6)  # cv_summary.json keeps 6 digits


def test_multilabel_scenes_trains_on_the_demo_scenes_and_monitors_map(tmp_path: Path) -> None:
    write_scenes(tmp_path / "data" / "scenes", count=60, sizes=(32, 40))  # where the recipe's manifest points
    classifier(tmp_path, "fit", "--config", str(RECIPES / "multilabel_scenes.yaml"), *OVERRIDES)
    run = tmp_path / "lightning_logs" / "multilabel_scenes" / "version_0"
    checkpoint = read_checkpoint(run / "checkpoints" / "best.ckpt")
    hparams = checkpoint["hyper_parameters"]
    assert (hparams["task"], hparams["loss"], hparams["class_weights"]) == ("multilabel", "bce", "auto")
    (monitor,) = [
        state["monitor"] for key, state in checkpoint["callbacks"].items() if key.startswith("ModelCheckpoint")
    ]
    assert monitor == "val/map"
    positives = checkpoint["state_dict"]["criterion.weight"]  # negatives over positives in the train split
    train = [row["label"].split(";") for row in read_csv(run / "splits.csv") if row["split"] == "train"]
    expected = [(len(train) - n) / n for n in (sum(label in labels for labels in train) for label in LABELS)]
    torch.testing.assert_close(positives, torch.tensor(expected))


def test_speedrun_digits_trains_as_shipped_on_a_few_digits(tmp_path: Path, digits_dir: Path) -> None:
    """The speed run's whole schedule, its epochs included, on 8 digits a class: two steps an epoch at batch 32."""
    data = copy_digits(digits_dir, tmp_path / "digits", dict.fromkeys("0123456789", 8))
    classifier(tmp_path, "fit", "--config", str(RECIPES / "speedrun_digits.yaml"), "--data.data_dir", str(data))
    run = tmp_path / "lightning_logs" / "speedrun_digits" / "version_0"
    shipped = yaml.safe_load((RECIPES / "speedrun_digits.yaml").read_text())
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs"] == shipped["trainer"]["max_epochs"]
    checkpoint = read_checkpoint(run / "checkpoints" / "best.ckpt")
    assert checkpoint["hyper_parameters"]["backbone"] == shipped["model"]["backbone"]
    assert checkpoint["datamodule_hyper_parameters"]["cache"] == "ram"
