"""Backbone weights from local files, losses and class weights, through the public API and the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

from classifier import ClassifierNet, ImageClassifier, cli_main
from classifier.losses import FocalLoss
from tests.helpers import run_dir, tiny_config

CLASSES = ["a", "b", "c"]
CLASSIFIER = str(Path(sys.executable).parent / "classifier")


def test_local_weights_load_and_a_mismatched_head_is_dropped(tmp_path: Path, caplog) -> None:
    source = timm.create_model("test_resnet", num_classes=1000)
    weights = tmp_path / "imagenet.pth"
    torch.save(source.state_dict(), weights)
    net = ClassifierNet("test_resnet", CLASSES)
    with caplog.at_level("INFO", logger="classifier"):
        net.load_pretrained(str(weights))
    assert "Pretrained head fc.weight, fc.bias has another shape; it is dropped" in caplog.text
    for name, tensor in net.backbone.state_dict().items():
        if not name.startswith("fc."):
            torch.testing.assert_close(tensor, source.state_dict()[name], msg=name)
    assert net.backbone.fc.out_features == 3


def test_checkpoint_of_this_project_is_accepted_as_pretrained(small_digits: Path, tmp_path: Path) -> None:
    config = tiny_config(tmp_path, small_digits, trainer={"max_epochs": 1})
    cli_main(["fit", "--config", str(config)])
    best = run_dir(tmp_path, 0) / "checkpoints" / "best.ckpt"
    trained = ImageClassifier.load_from_checkpoint(best, map_location="cpu")
    net = ClassifierNet("test_resnet", CLASSES)
    net.load_pretrained(str(best))
    torch.testing.assert_close(net.backbone.conv1[0].weight, trained.net.backbone.conv1[0].weight)


def test_weights_of_another_architecture_are_a_clear_error(tmp_path: Path) -> None:
    weights = tmp_path / "effnet.pth"
    torch.save(timm.create_model("test_efficientnet").state_dict(), weights)
    with pytest.raises(ValueError, match=f"--model.pretrained {weights} does not fit ResNet"):
        ClassifierNet("test_resnet", CLASSES).load_pretrained(str(weights))


def test_missing_or_garbage_weights_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=f"--model.pretrained {tmp_path / 'nope.pth'} does not exist"):
        ClassifierNet("test_resnet", CLASSES).load_pretrained(str(tmp_path / "nope.pth"))
    garbage = tmp_path / "garbage.pth"
    garbage.write_text("not a checkpoint")
    with pytest.raises(ValueError, match=f"--model.pretrained {garbage} is not a readable weights file"):
        ClassifierNet("test_resnet", CLASSES).load_pretrained(str(garbage))


def test_pretrained_from_the_cli(small_digits: Path, tmp_path: Path) -> None:
    weights = tmp_path / "w.pth"
    torch.save(timm.create_model("test_resnet", num_classes=1000).state_dict(), weights)
    config = tiny_config(tmp_path, small_digits, trainer={"max_epochs": 1}, model={"pretrained": str(weights)})
    cli_main(["fit", "--config", str(config)])
    assert (run_dir(tmp_path, 0) / "checkpoints" / "best.ckpt").is_file()


@pytest.mark.slow
def test_hub_weights_offline_fail_with_a_way_out(small_digits: Path, tmp_path: Path) -> None:
    config = tiny_config(tmp_path, small_digits, model={"pretrained": True})
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [CLASSIFIER, "fit", "--config", str(config), "--trainer.fast_dev_run", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    assert "could not fetch pretrained weights for 'test_resnet'" in result.stderr
    assert "--model.pretrained path/to/weights.pth" in result.stderr


def test_optimizer_and_scheduler_from_the_command_line(small_digits: Path, tmp_path: Path) -> None:
    config = tiny_config(tmp_path, small_digits, trainer={"max_epochs": 2})
    cli_main(
        [
            "fit",
            "--config",
            str(config),
            "--model.optimizer",
            "torch.optim.SGD",
            "--model.optimizer.lr",
            "0.05",
            "--model.optimizer.momentum",
            "0.9",
            "--model.scheduler",
            "torch.optim.lr_scheduler.StepLR",
            "--model.scheduler.step_size",
            "1",
            "--model.scheduler.gamma",
            "0.5",
        ]
    )
    checkpoint = torch.load(run_dir(tmp_path, 0) / "checkpoints" / "last.ckpt", weights_only=True)
    group = checkpoint["optimizer_states"][0]["param_groups"][0]
    assert group["momentum"] == 0.9 and group["lr"] == pytest.approx(0.05 * 0.5**2)
    assert checkpoint["lr_schedulers"][0]["step_size"] == 1


def test_default_schedule_is_cosine_over_max_epochs(small_digits: Path, tmp_path: Path) -> None:
    config = tiny_config(tmp_path, small_digits, trainer={"max_epochs": 2})
    cli_main(["fit", "--config", str(config)])
    checkpoint = torch.load(run_dir(tmp_path, 0) / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["lr_schedulers"][0]["T_max"] == 2
    assert checkpoint["optimizer_states"][0]["param_groups"][0]["weight_decay"] == 0.01  # AdamW's default


def test_focal_loss_with_gamma_zero_is_cross_entropy_and_focuses_otherwise() -> None:
    logits, target = torch.randn(16, 5), torch.randint(0, 5, (16,))
    weight = torch.rand(5) + 0.5
    torch.testing.assert_close(FocalLoss(0.0, weight)(logits, target), F.cross_entropy(logits, target, weight=weight))
    easy = torch.tensor([[8.0, 0.0]])
    assert FocalLoss(2.0)(easy, torch.tensor([0])) < 1e-3 * F.cross_entropy(easy, torch.tensor([0]))


def test_label_smoothing_with_focal_is_refused() -> None:
    with pytest.raises(ValueError, match="--model.label_smoothing applies to --model.loss ce only"):
        ImageClassifier(CLASSES, backbone="test_resnet", loss="focal", label_smoothing=0.1)


def test_auto_class_weights_follow_the_train_split(small_digits: Path, tmp_path: Path) -> None:
    imbalanced = tmp_path / "imbalanced"
    for digit, count in (("0", 20), ("1", 10), ("2", 5)):
        (imbalanced / digit).mkdir(parents=True)
        for image in sorted((small_digits / digit).iterdir())[:count]:
            (imbalanced / digit / image.name).write_bytes(image.read_bytes())
    config = tiny_config(
        tmp_path,
        imbalanced,
        trainer={"max_epochs": 1},
        model={"class_weights": "auto"},
        data={"val_fraction": 0.0, "test_fraction": 0.0},
    )
    cli_main(["fit", "--config", str(config), "--checkpoint.monitor", "train/loss", "--checkpoint.mode", "min"])
    state = torch.load(run_dir(tmp_path, 0) / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    torch.testing.assert_close(state["criterion.weight"], 35 / (3 * torch.tensor([20.0, 10.0, 5.0])))
    logged = {tag for tag in _scalar_tags(run_dir(tmp_path, 0)) if tag.startswith("train/")}
    assert logged == {
        "train/acc",
        "train/balanced_acc",
        "train/f1_macro",
        "train/f1_weighted",
        "train/ece",
        "train/loss",
        "train/loss_step",
    }  # no top5_acc with 3 classes


def _scalar_tags(folder: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = folder.glob("events.out.tfevents.*")
    return set(EventAccumulator(str(events)).Reload().Tags()["scalars"])


def test_explicit_class_weights_of_the_wrong_length_are_refused() -> None:
    with pytest.raises(ValueError, match="--model.class_weights has 2 values for 3 classes"):
        ImageClassifier(CLASSES, backbone="test_resnet", class_weights=[1.0, 2.0])
