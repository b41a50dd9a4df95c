"""Backbone weights from local files, losses and class weights, through the public API and the CLI."""

from __future__ import annotations

from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import safetensors.torch
import timm
import torch
import torch.nn.functional as F
import torchvision
from sklearn.utils.class_weight import compute_class_weight
from torch import nn

from classifier import ClassifierNet, ImageClassifier, cli_main
from classifier.cli.base import ClassifierCLI
from classifier.model.losses import FocalLoss, inverse_frequency_weights
from tests.helpers import REPO, read_csv, run_dir, tiny_config

CLASSES = ["a", "b", "c"]


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
    with pytest.raises(ValueError, match=f"--model.pretrained {garbage} is not a readable checkpoint"):
        ClassifierNet("test_resnet", CLASSES).load_pretrained(str(garbage))


def test_pretrained_from_the_cli(small_digits: Path, tmp_path: Path) -> None:
    torch.manual_seed(1234)  # not the config's seed 7: weights no fresh network of the run starts from
    source = timm.create_model("test_resnet", num_classes=1000).state_dict()
    torch.save(source, weights := tmp_path / "w.pth")
    config = tiny_config(tmp_path, small_digits, trainer={"max_epochs": 1}, model={"pretrained": str(weights)})
    cli_main(["fit", "--config", str(config), "--model.optimizer.lr", "0"])  # lr 0: the weights stay as loaded
    state = torch.load(run_dir(tmp_path, 0) / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    backbone = {k.removeprefix("net.backbone."): v for k, v in state.items() if k.startswith("net.backbone.")}
    parameters = [name for name, _ in timm.create_model("test_resnet").named_parameters()]
    for name in (name for name in parameters if not name.startswith("fc.")):
        torch.testing.assert_close(backbone[name], source[name], rtol=0, atol=0, msg=name)
    assert backbone["fc.weight"].shape == (10, source["fc.weight"].shape[1])  # the 1000-class head is dropped


def test_hub_weights_offline_fail_with_one_message(
    small_digits: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read when huggingface_hub is imported
    config = tiny_config(tmp_path, small_digits, model={"pretrained": True})
    with pytest.raises(ConnectionError) as error:
        cli_main(["fit", "--config", str(config), "--trainer.fast_dev_run", "1"])
    assert str(error.value) == (
        "--model.pretrained true: could not download the pretrained weights of 'test_resnet' from the Hugging Face "
        "hub (LocalEntryNotFoundError). Pass a local weights file (--model.pretrained path/to/weights.pth|.safetensors)"
        " or go online."
    )
    assert error.value.__cause__ is None and error.value.__suppress_context__  # not the hub client's chain of errors


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


def test_default_schedule_is_cosine_over_every_step_of_max_epochs(small_digits: Path, tmp_path: Path) -> None:
    config = tiny_config(tmp_path, small_digits, trainer={"max_epochs": 2})
    cli_main(["fit", "--config", str(config)])
    checkpoint = torch.load(run_dir(tmp_path, 0) / "checkpoints" / "last.ckpt", weights_only=True)
    train_images = sum(row["split"] == "train" for row in read_csv(run_dir(tmp_path, 0) / "splits.csv"))
    assert checkpoint["lr_schedulers"][0]["T_max"] == 2 * (train_images // 32)  # full batches of 32, 2 epochs
    decays = {group["weight_decay"] for group in checkpoint["optimizer_states"][0]["param_groups"]}
    assert decays == {0.0, 0.01}  # none for norms and biases, AdamW's default for the others


def test_focal_loss_with_gamma_zero_is_cross_entropy_and_focuses_otherwise() -> None:
    logits, target = torch.randn(16, 5), torch.randint(0, 5, (16,))
    weight = torch.rand(5) + 0.5
    torch.testing.assert_close(FocalLoss(0.0, weight)(logits, target), F.cross_entropy(logits, target, weight=weight))
    easy = torch.tensor([[8.0, 0.0]])
    assert FocalLoss(2.0)(easy, torch.tensor([0])) < 1e-3 * F.cross_entropy(easy, torch.tensor([0]))


def test_cross_entropy_loss_is_label_smoothed() -> None:
    """`--model.label_smoothing 0.1` with the default ce loss: the training loss is torch's smoothed cross-entropy."""
    model = ImageClassifier(CLASSES, backbone="test_resnet", label_smoothing=0.1)
    images, targets = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.arange(6) % 3
    loss = model.training_step((images, targets, torch.arange(6)), 0)
    logits = model(images)
    torch.testing.assert_close(loss, F.cross_entropy(logits, targets, label_smoothing=0.1))
    assert abs(loss.item() - F.cross_entropy(logits, targets).item()) > 1e-3  # smoothing does change it


@pytest.mark.parametrize("weighted", [False, True])
def test_focal_loss_with_gamma_zero_and_label_smoothing_is_smoothed_cross_entropy(weighted: bool) -> None:
    logits, target = torch.randn(16, 5, generator=torch.Generator().manual_seed(0)), torch.arange(16) % 5
    weight = torch.tensor([0.5, 1.0, 2.0, 3.0, 0.7]) if weighted else None
    reference = torch.nn.CrossEntropyLoss(weight=weight, label_smoothing=0.1)(logits, target)
    torch.testing.assert_close(FocalLoss(0.0, weight, label_smoothing=0.1)(logits, target), reference)


@pytest.mark.parametrize("weighted", [False, True])
def test_focal_loss_takes_the_soft_targets_of_mixup(weighted: bool) -> None:
    """gamma=0 is cross-entropy on class probabilities; gamma=2 equals a per-sample loop of the formula."""
    generator = torch.Generator().manual_seed(0)
    logits, soft = torch.randn(8, 4, generator=generator), torch.rand(8, 4, generator=generator).softmax(-1)
    weight = torch.tensor([0.5, 1.0, 2.0, 3.0]) if weighted else None
    reference = torch.nn.CrossEntropyLoss(weight=weight, label_smoothing=0.1)(logits, soft)
    torch.testing.assert_close(FocalLoss(0.0, weight, label_smoothing=0.1)(logits, soft), reference)
    p = logits.double().softmax(-1).numpy()
    w = np.ones(4) if weight is None else weight.double().numpy()
    q = soft.double().numpy() * 0.9 + 0.1 / 4
    looped = sum(-(w[c] * q[i, c] * (1 - p[i, c]) ** 2 * np.log(p[i, c])) for i in range(8) for c in range(4)) / 8
    assert FocalLoss(2.0, weight, label_smoothing=0.1)(logits, soft).item() == pytest.approx(looped, rel=1e-5)


def test_focal_loss_recipe_runs_on_the_shipped_config(small_digits: Path, tmp_path: Path) -> None:
    """The README's imbalance recipe, `--model.loss focal` on configs/resnet18.yaml (label smoothing 0.1)."""
    tiny = tiny_config(tmp_path, small_digits, trainer={"max_epochs": 1, "callbacks": []}, model={"pretrained": False})
    cli_main(
        ["fit", "--config", str(REPO / "configs" / "resnet18.yaml"), "--config", str(tiny), "--model.loss", "focal"]
    )
    hparams = torch.load(run_dir(tmp_path, 0) / "checkpoints" / "last.ckpt", weights_only=True)["hyper_parameters"]
    assert (hparams["loss"], hparams["label_smoothing"]) == ("focal", 0.1)


def imbalanced_digits(small_digits: Path, root: Path) -> Path:
    """20 zeros, 10 ones and 5 twos."""
    for digit, count in (("0", 20), ("1", 10), ("2", 5)):
        (root / digit).mkdir(parents=True)
        for image in sorted((small_digits / digit).iterdir())[:count]:
            (root / digit / image.name).write_bytes(image.read_bytes())
    return root


def test_auto_class_weights_follow_the_train_split(small_digits: Path, tmp_path: Path) -> None:
    imbalanced = imbalanced_digits(small_digits, tmp_path / "imbalanced")
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


@pytest.mark.parametrize("layer_decay", [None, 0.75])
def test_norm_and_bias_parameters_get_no_weight_decay(layer_decay: float | None, small_digits: Path, tmp_path: Path):
    config = tiny_config(tmp_path, small_digits, trainer={"fast_dev_run": 1}, model={"layer_decay": layer_decay})
    cli = ClassifierCLI(["fit", "--config", str(config), "--model.optimizer.weight_decay", "0.05"])
    groups = cli.trainer.optimizers[0].param_groups
    decay_of = {id(p): group["weight_decay"] for group in groups for p in group["params"]}
    names = dict(cli.model.named_parameters())
    assert {id(p) for p in names.values()} == set(decay_of)  # every parameter, once
    for name, parameter in names.items():
        exempt = parameter.ndim <= 1  # BatchNorm weights and biases, and every bias
        assert decay_of[id(parameter)] == (0.0 if exempt else 0.05), name
    assert (
        decay_of[id(cli.model.net.backbone.fc.bias)] == 0.0 and decay_of[id(cli.model.net.backbone.fc.weight)] == 0.05
    )


class Hostile:
    """Unpickling it writes a file: what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


@pytest.fixture
def hostile_checkpoint(tmp_path: Path) -> Path:
    path = tmp_path / "hostile.ckpt"
    state = timm.create_model("test_resnet").state_dict()
    torch.save({"state_dict": state, "hyper_parameters": {"payload": Hostile(tmp_path / "marker")}}, path)
    return path


def test_a_hostile_pickle_is_refused_as_ckpt_path(hostile_checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=f"--ckpt_path {hostile_checkpoint} holds pickled objects other than tensors"):
        cli_main(["test", "--ckpt_path", str(hostile_checkpoint)])
    assert not (tmp_path / "marker").exists()


def test_a_hostile_pickle_is_refused_as_pretrained(hostile_checkpoint: Path, small_digits: Path, tmp_path: Path):
    model = {"pretrained": str(hostile_checkpoint)}
    config = tiny_config(tmp_path, small_digits, trainer={"max_epochs": 1}, model=model)
    with pytest.raises(
        ValueError, match=f"--model.pretrained {hostile_checkpoint} holds pickled objects other than tensors"
    ):
        cli_main(["fit", "--config", str(config)])
    assert not (tmp_path / "marker").exists()


def backbone_of(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The backbone's tensors in a checkpoint of this project, under the backbone's own names."""
    state = torch.load(checkpoint, weights_only=True)["state_dict"]
    return {key.split("backbone.", 1)[1]: value for key, value in state.items() if "backbone." in key}


@pytest.mark.parametrize("source", ["torchvision", "safetensors"])
def test_torchvision_and_safetensors_weights_as_pretrained(source: str, small_digits: Path, tmp_path: Path) -> None:
    if source == "torchvision":  # timm's resnet18 uses torchvision's parameter names
        backbone, weights = "resnet18", tmp_path / "resnet18.pth"
        state = torchvision.models.resnet18(weights=None).state_dict()
        torch.save(state, weights)
    else:
        backbone, weights = "test_resnet", tmp_path / "weights.safetensors"
        state = timm.create_model("test_resnet", num_classes=1000).state_dict()
        safetensors.torch.save_file(state, weights)
    trainer = {"max_epochs": 1, "limit_train_batches": 1, "limit_val_batches": 1}
    model = {"backbone": backbone, "pretrained": str(weights), "freeze_backbone": True}  # the file's weights stay
    cli_main(["fit", "--config", str(tiny_config(tmp_path, small_digits, trainer=trainer, model=model))])
    loaded = backbone_of(run_dir(tmp_path, 0) / "checkpoints" / "last.ckpt")
    assert set(loaded) == set(state)
    for name, tensor in state.items():
        if not name.startswith("fc."):  # the 1000-class head is replaced by a 10-class one
            torch.testing.assert_close(loaded[name], tensor, rtol=0, atol=0, msg=name)
    assert loaded["fc.weight"].shape == (10, state["fc.weight"].shape[1])


def test_explicit_class_weights_weight_the_cross_entropy() -> None:
    weights = [0.5, 1.0, 3.0]
    model = ImageClassifier(CLASSES, backbone="test_resnet", class_weights=weights)
    images, targets = torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 2, 1, 2])
    loss = model.training_step((images, targets, torch.arange(6)), 0)
    expected = nn.CrossEntropyLoss(weight=torch.tensor(weights))(model(images), targets)
    torch.testing.assert_close(loss, expected)
    assert not torch.allclose(loss, F.cross_entropy(model(images), targets))  # the weights matter here


def test_auto_class_weights_count_the_train_split_only(small_digits: Path, tmp_path: Path) -> None:
    """With val and test held out of 20/10/5 digits, the weights are the balanced ones of the train split alone."""
    imbalanced = imbalanced_digits(small_digits, tmp_path / "imbalanced")
    data = {"val_fraction": 0.25, "test_fraction": 0.25, "batch_size": 8}
    config = tiny_config(tmp_path, imbalanced, trainer={"max_epochs": 1}, model={"class_weights": "auto"}, data=data)
    cli_main(["fit", "--config", str(config)])
    rows = read_csv(run_dir(tmp_path, 0) / "splits.csv")
    train = np.array([int(row["label"]) for row in rows if row["split"] == "train"])
    everything = np.array([int(row["label"]) for row in rows])
    assert {row["split"] for row in rows} == {"train", "val", "test"} and len(everything) == 35
    expected = compute_class_weight("balanced", classes=np.arange(3), y=train)
    overall = compute_class_weight("balanced", classes=np.arange(3), y=everything)
    assert np.abs(expected - overall).max() > 0.1  # this split's train counts are not in the folder's proportions
    state = torch.load(run_dir(tmp_path, 0) / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    torch.testing.assert_close(state["criterion.weight"], torch.tensor(expected, dtype=torch.float))


def test_focal_loss_uses_class_weights_as_alpha() -> None:
    weights, gamma = torch.tensor([0.5, 1.0, 3.0]), 2.0
    model = ImageClassifier(CLASSES, backbone="test_resnet", loss="focal", focal_gamma=gamma, class_weights=[0.5, 1, 3])
    images, targets = torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 2, 1, 2])
    loss = model.training_step((images, targets, torch.arange(6)), 0)
    p_t = model(images).softmax(dim=-1)[torch.arange(6), targets]
    alpha = weights[targets]
    expected = (-alpha * (1 - p_t) ** gamma * p_t.log()).sum() / alpha.sum()  # Lin et al., normalised by alpha
    torch.testing.assert_close(loss, expected)


def test_focal_loss_with_auto_class_weights_trains(small_digits: Path, tmp_path: Path) -> None:
    imbalanced = imbalanced_digits(small_digits, tmp_path / "imbalanced")
    model = {"loss": "focal", "class_weights": "auto"}
    data = {"val_fraction": 0.0, "test_fraction": 0.0, "batch_size": 8}
    config = tiny_config(tmp_path, imbalanced, trainer={"max_epochs": 1}, model=model, data=data)
    cli_main(["fit", "--config", str(config), "--checkpoint.monitor", "train/loss", "--checkpoint.mode", "min"])
    checkpoint = torch.load(run_dir(tmp_path, 0) / "checkpoints" / "last.ckpt", weights_only=True)
    labels = np.repeat([0, 1, 2], [20, 10, 5])
    expected = compute_class_weight("balanced", classes=np.arange(3), y=labels)
    torch.testing.assert_close(checkpoint["state_dict"]["criterion.weight"], torch.tensor(expected, dtype=torch.float))
    assert checkpoint["global_step"] == 35 // 8  # it trained: one step per full batch


def test_inverse_frequency_weights_and_a_class_without_images() -> None:
    torch.testing.assert_close(inverse_frequency_weights([30, 10, 5], CLASSES), 45 / (3 * torch.tensor([30.0, 10, 5])))
    with pytest.raises(ValueError, match=r"auto needs every class in the train split; \['b'\] have no train images"):
        inverse_frequency_weights([3, 0, 2], CLASSES)


def test_hub_weights_keep_our_head(monkeypatch: pytest.MonkeyPatch) -> None:
    # every DDP rank built the same head before the hub model, whose head is drawn afresh on each rank
    hub = timm.create_model("test_resnet", num_classes=3)
    create = timm.create_model
    monkeypatch.setattr(
        "classifier.model.backbones.timm.create_model",
        lambda name, pretrained=False, **kwargs: hub if pretrained else create(name, **kwargs),
    )
    net = ClassifierNet("test_resnet", CLASSES)
    head = net.backbone.fc.weight.detach().clone()
    net.load_pretrained(True)
    torch.testing.assert_close(net.backbone.fc.weight, head, atol=0, rtol=0)
    torch.testing.assert_close(net.backbone.conv1[0].weight, hub.conv1[0].weight, atol=0, rtol=0)


def test_lr_find_sweeps_the_pretrained_network(small_digits: Path, tmp_path: Path, monkeypatch) -> None:
    weights = tmp_path / "w.pth"
    torch.save(timm.create_model("test_resnet", num_classes=1000).state_dict(), weights)
    swept = []
    monkeypatch.setattr(
        "classifier.training.lr_find.Tuner.lr_find", lambda self, model, **kwargs: swept.append(model) or None
    )
    config = tiny_config(tmp_path, small_digits, model={"pretrained": str(weights)})
    cli_main(["lr_find", "--config", str(config)])
    (model,) = swept
    source = torch.load(weights, weights_only=True)
    torch.testing.assert_close(model.net.backbone.conv1[0].weight, source["conv1.0.weight"], atol=0, rtol=0)
