"""Training recipes, each tested so that it fails if the recipe silently does nothing."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import timm
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.tuner import Tuner
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torchvision.transforms import TrivialAugmentWide

from classifier import ImageClassifier, ImageFolderDataModule, cli_main
from classifier.cli.base import ClassifierCLI
from classifier.data.images import load_rgb
from classifier.training.lr_find import lr_find_figure, suggest
from tests.helpers import read_csv, run_dir, save_image, spy_of, tiny_config


def make_folder(root: Path, counts: dict[str, int]) -> Path:
    rng = np.random.default_rng(0)
    for name, count in counts.items():
        for i in range(count):
            save_image(root / name / f"{i:03d}.png", Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)))
    return root


def logged_lrs(run: Path) -> dict[str, list[tuple[int, float]]]:
    """(step, lr) per parameter group, as LearningRateMonitor wrote them to TensorBoard."""
    (events,) = run.glob("events.out.tfevents.*")
    accumulator = EventAccumulator(str(events)).Reload()
    tags = [tag for tag in accumulator.Tags()["scalars"] if tag.startswith("lr-")]
    return {tag: [(event.step, event.value) for event in accumulator.Scalars(tag)] for tag in tags}


def warmup_then_cosine(steps: int, warmup: int, lr: float = 1e-3) -> list[float]:
    """The documented schedule, in closed form: a linear ramp of `warmup` steps, then a cosine to 0."""
    ramp = [lr * (step + 1) / (warmup + 1) for step in range(warmup)]
    return ramp + [lr * (1 + np.cos(np.pi * step / (steps - warmup))) / 2 for step in range(steps - warmup)]


def train_batches(run: Path, batch_size: int = 32) -> int:
    """Training batches per epoch: the run's train split in full batches (the last partial one is dropped)."""
    return sum(row["split"] == "train" for row in read_csv(run / "splits.csv")) // batch_size


LR_PER_STEP = {
    "class_path": "lightning.pytorch.callbacks.LearningRateMonitor",
    "init_args": {"logging_interval": "step"},
}


def test_warmup_ramps_up_then_hands_over_to_the_schedule(small_digits: Path, tmp_path: Path) -> None:
    trainer = {"max_epochs": 4, "callbacks": [LR_PER_STEP]}
    config = tiny_config(tmp_path, small_digits, trainer=trainer, model={"warmup_epochs": 2})
    cli_main(["fit", "--config", str(config)])
    per_epoch = train_batches(run_dir(tmp_path, 0))
    lrs = logged_lrs(run_dir(tmp_path, 0))
    # the backbone's and the head's norms and biases (no weight decay), and their other weights
    assert set(lrs) == {f"lr-AdamW/pg{group}" for group in range(1, 5)}
    for logged in lrs.values():
        # AdamW's 1e-3 ramped over 2 epochs' steps, then a cosine over the other 2 epochs' steps
        assert [step for step, _ in logged] == list(range(4 * per_epoch))
        np.testing.assert_allclose([lr for _, lr in logged], warmup_then_cosine(4 * per_epoch, 2 * per_epoch))


@pytest.mark.slow
def test_cosine_schedule_spans_max_steps_with_accumulation(small_digits: Path, tmp_path: Path) -> None:
    trainer = {"max_epochs": None, "max_steps": 7, "accumulate_grad_batches": 2, "callbacks": [LR_PER_STEP]}
    config = tiny_config(tmp_path, small_digits, trainer=trainer, model={"warmup_epochs": 1})
    cli_main(["fit", "--config", str(config)])
    steps_per_epoch = -(-train_batches(run_dir(tmp_path, 0)) // 2)
    (logged,) = {tag: lrs for tag, lrs in logged_lrs(run_dir(tmp_path, 0)).items() if tag.endswith("pg2")}.values()
    by_step = dict(logged)  # logged at each batch; the two batches of an accumulated step share their step
    assert list(by_step) == list(range(7)) and len(logged) == 14
    np.testing.assert_allclose(list(by_step.values()), warmup_then_cosine(7, steps_per_epoch))


def test_mixup_and_cutmix_give_soft_targets_until_the_switch_off_epoch(monkeypatch: pytest.MonkeyPatch) -> None:
    model = ImageClassifier(["a", "b", "c"], backbone="test_resnet", mixup_alpha=0.4, cutmix_alpha=1.0,
                            mixup_off_epoch=3)  # fmt: skip
    seen = []
    model.criterion.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[1]))
    batch = (torch.randn(8, 3, 32, 32), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]), torch.arange(8))
    model.training_step(batch, 0)
    soft = seen[-1]
    assert soft.shape == (8, 3) and soft.dtype.is_floating_point
    torch.testing.assert_close(soft.sum(dim=1), torch.ones(8))
    assert ((soft > 0) & (soft < 1)).any()  # mixed, not one-hot
    monkeypatch.setattr(ImageClassifier, "current_epoch", property(lambda self: 3))  # the switch-off epoch
    model.training_step(batch, 0)
    assert seen[-1].dtype == torch.long


@pytest.mark.parametrize("size", [7, 1])
def test_mixup_mixes_odd_batches_but_their_last_image(size: int) -> None:
    model = ImageClassifier([str(c) for c in range(7)], backbone="test_resnet", mixup_alpha=1.0)
    images, soft = [], []
    model.register_forward_pre_hook(lambda module, inputs: images.append(inputs[0]))
    model.criterion.register_forward_pre_hook(lambda module, inputs: soft.append(inputs[1]))
    batch = torch.randn(size, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    targets = torch.arange(size)
    model.train(size > 1)  # BatchNorm cannot train on one image
    model.training_step((batch.clone(), targets, targets), 0)
    (mixed,), (soft,) = images, soft
    lam = soft[0, 0].item()  # image 0 is mixed with image size-2, its partner under timm's flip pairing
    pairs = batch[: size - 1]
    expected_targets = torch.eye(7)[: size - 1] * lam + torch.eye(7)[: size - 1].flip(0) * (1 - lam)
    torch.testing.assert_close(soft, torch.cat([expected_targets, torch.eye(7)[size - 1 : size]]))
    torch.testing.assert_close(mixed, torch.cat([pairs * lam + pairs.flip(0) * (1 - lam), batch[-1:]]))
    assert size == 1 or 0 < lam < 1


def test_mixup_and_cutmix_from_the_command_line(small_digits: Path, tmp_path: Path) -> None:
    """Each training batch's loss gets lam * its one-hot labels + (1 - lam) * those of the batch reversed (timm's
    pairing), with lam below 1 in some batch; label smoothing stays the loss's own."""
    config = tiny_config(tmp_path, small_digits, trainer={"max_epochs": 1,
                                                          "callbacks": [{"class_path": "tests.helpers.TrainingSpy"}]},
                         model={"mixup_alpha": 0.2, "cutmix_alpha": 1.0, "label_smoothing": 0.1})  # fmt: skip
    cli = ClassifierCLI(["fit", "--config", str(config)])
    spy = spy_of(cli.trainer)
    assert len(spy.loss_targets) == len(spy.batches) > 1
    lams = []
    for soft, batch in zip(spy.loss_targets, spy.batches, strict=True):
        labels = torch.eye(10)[batch["targets"]]
        assert soft.dtype == torch.float32 and soft.shape == labels.shape  # class probabilities, not indices
        paired = labels.flip(0)
        lam = float(((soft - paired) * (labels - paired)).sum() / (labels - paired).pow(2).sum())  # least squares
        torch.testing.assert_close(soft, lam * labels + (1 - lam) * paired)
        lams.append(lam)
    assert all(0 <= lam <= 1 for lam in lams) and min(lams) < 0.99  # mixed, not the labels as they were
    assert cli.model.criterion.label_smoothing == 0.1


def draws(datamodule: ImageFolderDataModule, epochs: int) -> Counter:
    counted = Counter()
    for _ in range(epochs):
        for _, targets, _ in datamodule.train_dataloader():
            counted.update(targets.tolist())
    return counted


def test_balanced_sampler_draws_classes_about_uniformly(tmp_path: Path) -> None:
    data_dir = str(make_folder(tmp_path / "d", {"many": 200, "some": 50, "few": 20}))
    options = {"image_size": 8, "batch_size": 32, "num_workers": 0, "val_fraction": 0.1, "test_fraction": 0.0}
    balanced = ImageFolderDataModule(data_dir, sampler="balanced", **options)
    balanced.setup("fit")
    counted = draws(balanced, epochs=6)
    total = sum(counted.values())
    assert all(abs(counted[c] / total - 1 / 3) < 0.05 for c in range(3)), counted
    plain = ImageFolderDataModule(data_dir, **options)
    plain.setup("fit")
    counted = draws(plain, epochs=1)
    assert counted[balanced.class_names.index("many")] > 5 * counted[balanced.class_names.index("few")]


def test_random_erasing_only_touches_training_batches(tmp_path: Path) -> None:
    make_folder(tmp_path / "d", {"a": 8, "b": 8})
    datamodule = ImageFolderDataModule(str(tmp_path / "d"), image_size=16, random_erasing=1.0, test_fraction=0.0)
    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    batch = (images, torch.zeros(4, dtype=torch.long), torch.arange(4))
    datamodule.trainer = SimpleNamespace(training=False)
    clean = datamodule.on_after_batch_transfer(batch, 0)[0]
    datamodule.trainer = SimpleNamespace(training=True)
    erased = datamodule.on_after_batch_transfer((images.clone(), *batch[1:]), 0)[0]
    changed = (erased != clean).any(dim=1)  # per pixel
    assert all(changed[i].any() for i in range(4))  # every image got a rectangle
    assert all(not changed[i].all() for i in range(4))  # and only a rectangle


@pytest.mark.parametrize(
    ("policy", "operation"),
    [("rand-m9-mstd0.5", "RandAugment"), ("augmix-m5-w4-d2", "AugMixAugment"), ("original", "AutoAugment"),
     ("trivialaugment", TrivialAugmentWide.__name__)],
)  # fmt: skip
def test_auto_augment_policies(policy: str, operation: str, tmp_path: Path) -> None:
    make_folder(tmp_path / "d", {"a": 4, "b": 4})
    fixed = {"image_size": 16, "hflip": 0.0, "crop_scale": (1.0, 1.0), "crop_ratio": (1.0, 1.0), "color_jitter": None}
    plain = ImageFolderDataModule(str(tmp_path / "d"), **fixed).transform(training=True)
    pipeline = ImageFolderDataModule(str(tmp_path / "d"), auto_augment=policy, **fixed).transform(training=True)
    assert operation in [type(step).__name__ for step in pipeline.transforms]
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    assert len({plain(image).numpy().tobytes() for _ in range(8)}) == 1  # a whole-image crop, nothing random
    outputs = [pipeline(image) for _ in range(8)]
    assert outputs[0].dtype == torch.uint8 and outputs[0].shape == (3, 16, 16)
    assert len({o.numpy().tobytes() for o in outputs}) > 1  # so only the policy can make them differ


def imbalanced_digits(digits_dir: Path, root: Path, counts: dict[str, int]) -> Path:
    for digit, count in counts.items():
        (root / digit).mkdir(parents=True)
        for image in sorted((digits_dir / digit).iterdir())[:count]:
            (root / digit / image.name).write_bytes(image.read_bytes())
    return root


def test_augmentation_options_from_the_command_line(digits_dir: Path, tmp_path: Path) -> None:
    data_dir = imbalanced_digits(digits_dir, tmp_path / "d", {"0": 60, "1": 60, "2": 12})
    data = {"auto_augment": "trivialaugment", "random_erasing": 1.0, "sampler": "balanced", "batch_size": 16,
            "test_fraction": 0.0, "val_fraction": 0.2}  # fmt: skip
    trainer = {"max_epochs": 2, "accumulate_grad_batches": 2, "gradient_clip_val": 0.01,
               "callbacks": [{"class_path": "tests.helpers.TrainingSpy"}]}  # fmt: skip
    cli = ClassifierCLI(["fit", "--config", str(tiny_config(tmp_path, data_dir, trainer=trainer, data=data))])
    spy = spy_of(cli.trainer)
    few = cli.datamodule.class_names.index("2")
    # trivialaugment: in the training pipeline, whose effect test_auto_augment_policies shows
    assert TrivialAugmentWide in [type(step) for step in cli.datamodule.datasets["train"].transform.transforms]
    # balanced sampler: the small class, 9% of the training images, is drawn about a third of the time
    drawn = [target for batch in spy.batches for target in batch["targets"]]
    share = np.mean(np.array(cli.datamodule.datasets["train"].targets) == few)
    assert share < 0.1 and np.mean(np.array(drawn) == few) > 0.25
    # accumulation: one optimizer step per two batches (and at each epoch's end)
    per_epoch = Counter(batch["epoch"] for batch in spy.batches)
    assert cli.trainer.global_step == sum(math.ceil(count / 2) for count in per_epoch.values()) < len(spy.batches)
    # clipping: every step's gradient norm is the clipping value (unclipped, it is far larger)
    assert len(spy.grad_norms) == cli.trainer.global_step
    np.testing.assert_allclose(spy.grad_norms, 0.01, rtol=1e-4)
    # random erasing: every training image holds noise, which no uint8 pixel normalises to; validation images none
    config = cli.datamodule.data_config
    mean, std = (torch.tensor(config[key]).view(-1, 1) * 255 for key in ("mean", "std"))
    normalised_pixels = (torch.arange(256).float().view(1, -1) - mean) / std  # (channel, 256 values)

    def noisy(image: torch.Tensor) -> bool:
        return any(not torch.isin(image[c], normalised_pixels[c]).all() for c in range(3))

    assert all(noisy(image) for batch in spy.images["train"] for image in batch)
    assert not any(noisy(image) for batch in spy.images["validate"] for image in batch)


def test_ema_weights_differ_from_the_live_ones_and_are_the_ones_evaluated(small_digits: Path, tmp_path: Path) -> None:
    config = tiny_config(tmp_path, small_digits, trainer={"max_epochs": 2}, model={"ema_decay": 0.9})
    cli_main(["fit", "--config", str(config)])
    best = run_dir(tmp_path, 0) / "checkpoints" / "best.ckpt"
    checkpoint = torch.load(best, weights_only=True)
    average, live = checkpoint["state_dict"], checkpoint["current_model_state"]
    assert not torch.equal(average["net.backbone.fc.weight"], live["net.backbone.fc.weight"])

    cli_main(["test", "--ckpt_path", str(best)])
    row = read_csv(run_dir(tmp_path, 0) / "test" / "predictions.csv")[0]
    model = ImageClassifier.load_from_checkpoint(best, map_location="cpu").eval()
    datamodule = ImageFolderDataModule(str(small_digits), backbone="test_resnet", image_size=32)
    image = datamodule.transform(training=False)(load_rgb(Path(row["path"])))[None]
    image = datamodule.on_after_batch_transfer((image, torch.zeros(1), torch.zeros(1)), 0)[0]
    with torch.no_grad():
        evaluated = model(image).softmax(dim=-1)[0]
        model.load_state_dict(live)
        with_live_weights = model(image).softmax(dim=-1)[0]
    written = torch.tensor([float(row[f"prob_{name}"]) for name in model.class_names])
    torch.testing.assert_close(evaluated, written, atol=1e-5, rtol=0)
    assert not torch.allclose(with_live_weights, written, atol=1e-4)


def test_lr_find_starts_at_chance_and_suggests_by_its_rule(
    small_digits: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    finders, figures = [], []
    lr_find = Tuner.lr_find

    def keep(*args, **kwargs):
        finders.append(lr_find(*args, **kwargs))
        return finders[-1]

    monkeypatch.setattr(Tuner, "lr_find", keep)
    monkeypatch.setattr("classifier.training.lr_find.lr_find_figure",
                        lambda *args: figures.append(lr_find_figure(*args)) or figures[-1])  # fmt: skip
    config = tiny_config(tmp_path, small_digits)
    with caplog.at_level("INFO", logger="classifier"):
        cli_main(["lr_find", "--config", str(config), "--num_training", "50", "--early_stop_threshold", "null",
                  "--min_lr", "1e-5", "--max_lr", "0.1", "--rule", "minimum"])  # fmt: skip
    (plotted,) = (tmp_path / "lightning_logs" / "tiny" / "lr_find").glob("*/lr_find.png")
    with Image.open(plotted) as plot:
        assert min(plot.size) > 300
    lrs, losses = np.array(finders[0].results["lr"]), np.array(finders[0].results["loss"])
    assert len(lrs) == 50 and lrs[0] == pytest.approx(1e-5) and lrs[-1] == pytest.approx(0.1)  # the sweep asked for
    np.testing.assert_allclose(lrs[2:] / lrs[1:-1], (0.1 / 1e-5) ** (1 / 50), rtol=1e-6)  # geometric
    # a fresh model guesses: its first loss is the chance level, ln 10, not Lightning's half of it
    assert losses[0] == pytest.approx(np.log(10), rel=0.1)
    written = np.loadtxt(plotted.with_name("lr_find.csv"), delimiter=",", skiprows=1)
    np.testing.assert_allclose(written, np.stack([lrs, losses], axis=1), rtol=1e-8)  # the points, for another rule
    # minimum: a tenth of the rate of the lowest loss past the first 10 points
    rate = lrs[10 + int(np.argmin(losses[10:]))] / 10
    suggested = [line for line in caplog.text.splitlines() if line.startswith("Use it with: --model.optimizer.lr ")]
    assert suggested == [f"Use it with: --model.optimizer.lr {rate:.3g}"]
    assert f"Suggested learning rate (rule: minimum): {rate:.3g}" in caplog.text
    axes = figures[0].axes[0]
    assert axes.get_title() == f"Suggested learning rate: {rate:.3g} (rule: minimum)"
    assert axes.lines[-1].get_xdata()[0] == pytest.approx(rate)  # the line at the suggestion


def test_each_lr_find_rule_reads_its_point_of_a_known_curve() -> None:
    """A sweep that is flat at chance for 20 points, falls along a logistic centred on point 55, bottoms out at
    point 80 and then diverges."""
    lrs = np.logspace(-6, 0, 100)
    points = np.arange(100)
    losses = np.where(points < 20, 2.3, 2.3 - 2 / (1 + np.exp(-(points - 55) / 6)))
    losses[81:] = losses[80] + np.linspace(0.1, 4, 19)
    assert suggest(lrs, losses, "minimum") == (pytest.approx(lrs[80] / 10), 80)
    assert suggest(lrs, losses, "steepest") == (pytest.approx(lrs[55]), 55)
    # the longest strict fall holds one point of the flat part and 19..80: 62 points, whose index 0 is point 19;
    # fastai starts it one before (point 18) and takes int(62/3) + int(62/6) = 20 + 10 points on: point 48
    assert suggest(lrs, losses, "valley") == (pytest.approx(lrs[48]), 48)
    rising = np.linspace(2.3, 5, 100)
    assert all(suggest(lrs, rising, rule) is None for rule in ("valley", "minimum", "steepest"))


@pytest.fixture
def imagenet_weights(tmp_path: Path) -> Path:
    """A local `test_resnet` state dict with a 1000-class head, standing in for pretrained weights."""
    path = tmp_path / "pretrained.pth"
    torch.save(timm.create_model("test_resnet", num_classes=1000).state_dict(), path)
    return path


def backbone_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    state = torch.load(checkpoint, weights_only=True)["state_dict"]
    return {
        k.removeprefix("net.backbone."): v
        for k, v in state.items()
        if k.startswith("net.backbone.") and ".fc." not in k
    }


def test_frozen_backbone_keeps_its_weights_and_statistics(small_digits: Path, tmp_path: Path, imagenet_weights: Path):
    model = {"pretrained": str(imagenet_weights), "freeze_backbone": True}
    config = tiny_config(tmp_path, small_digits, trainer={"max_epochs": 1}, model=model)
    cli_main(["fit", "--config", str(config)])
    trained = torch.load(run_dir(tmp_path, 0) / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    source = torch.load(imagenet_weights, weights_only=True)
    for name, tensor in backbone_state(run_dir(tmp_path, 0) / "checkpoints" / "last.ckpt").items():
        torch.testing.assert_close(tensor, source[name], msg=name)  # weights and BatchNorm running stats
    assert trained["net.backbone.fc.weight"].shape == (10, source["fc.weight"].shape[1])


def test_progressive_unfreezing(small_digits: Path, tmp_path: Path, imagenet_weights: Path) -> None:
    model = {"pretrained": str(imagenet_weights), "unfreeze_at_epoch": 1}
    config = tiny_config(tmp_path, small_digits, trainer={"max_epochs": 2}, model=model)
    cli_main(["fit", "--config", str(config), "--checkpoint.save_top_k", "-1", "--checkpoint.filename", "{epoch}"])
    source = torch.load(imagenet_weights, weights_only=True)
    after_first = backbone_state(run_dir(tmp_path, 0) / "checkpoints" / "epoch=0.ckpt")
    after_second = backbone_state(run_dir(tmp_path, 0) / "checkpoints" / "epoch=1.ckpt")
    assert all(torch.equal(after_first[name], source[name]) for name in after_first)
    assert not torch.equal(after_second["conv1.0.weight"], source["conv1.0.weight"])


CONSTANT_LR = {"class_path": "torch.optim.lr_scheduler.ConstantLR", "init_args": {"factor": 1.0}}


def group_lrs(checkpoint: Path) -> list[float]:
    return [group["lr"] for group in torch.load(checkpoint, weights_only=True)["optimizer_states"][0]["param_groups"]]


def test_backbone_lr_scale(small_digits: Path, tmp_path: Path) -> None:
    model = {"backbone_lr_scale": 0.1, "scheduler": CONSTANT_LR}
    config = tiny_config(tmp_path, small_digits, trainer={"max_epochs": 1}, model=model)
    cli_main(["fit", "--config", str(config)])
    lrs = group_lrs(run_dir(tmp_path, 0) / "checkpoints" / "last.ckpt")  # backbone, head; each without, with decay
    assert lrs == pytest.approx([1e-4, 1e-4, 1e-3, 1e-3])  # a tenth of AdamW's default LR, and AdamW's default


def test_layer_decay_gives_deeper_layers_smaller_rates(small_digits: Path, tmp_path: Path) -> None:
    config = tiny_config(tmp_path, small_digits, trainer={"max_epochs": 1},
                         model={"backbone": "test_vit", "layer_decay": 0.5, "scheduler": CONSTANT_LR})  # fmt: skip
    cli_main(["fit", "--config", str(config)])
    lrs = group_lrs(run_dir(tmp_path, 0) / "checkpoints" / "last.ckpt")
    head = lrs[-1]
    assert head == pytest.approx(1e-3) and max(lrs) == head
    assert len(set(lrs)) > 3 and min(lrs) <= head * 0.5**3  # test_vit's blocks, each half its successor's


def test_mlp_head(small_digits: Path, tmp_path: Path) -> None:
    model = ImageClassifier([str(d) for d in range(10)], backbone="test_resnet", head_hidden_dims=[32, 16])
    layers = [type(layer).__name__ for layer in model.net.head]
    assert layers == ["Linear", "BatchNorm1d", "ReLU", "Dropout"] * 2 + ["Linear"]
    assert model(torch.randn(4, 3, 32, 32)).shape == (4, 10)
    config = tiny_config(tmp_path, small_digits, trainer={"max_epochs": 1}, model={"head_hidden_dims": [32, 16]})
    cli_main(["fit", "--config", str(config)])
    best = run_dir(tmp_path, 0) / "checkpoints" / "best.ckpt"
    state = torch.load(best, weights_only=True)["state_dict"]
    features = timm.create_model("test_resnet").num_features  # 96: what the backbone's pooling gives the head
    shapes = {name: tuple(tensor.shape) for name, tensor in state.items() if name.startswith("net.head.")}
    assert {name: shape for name, shape in shapes.items() if not name.endswith("num_batches_tracked")} == {
        "net.head.0.weight": (32, features), "net.head.0.bias": (32,),  # Linear, then BatchNorm1d
        "net.head.1.weight": (32,), "net.head.1.bias": (32,), "net.head.1.running_mean": (32,),
        "net.head.1.running_var": (32,),
        "net.head.4.weight": (16, 32), "net.head.4.bias": (16,),
        "net.head.5.weight": (16,), "net.head.5.bias": (16,), "net.head.5.running_mean": (16,),
        "net.head.5.running_var": (16,),
        "net.head.8.weight": (10, 16), "net.head.8.bias": (10,),
    }  # fmt: skip
    assert not [name for name in state if name.startswith("net.backbone.fc.")]  # the linear head is replaced
    cli_main(["test", "--ckpt_path", str(best)])
    assert 0 <= json.loads((run_dir(tmp_path, 0) / "test" / "metrics.json").read_text())["test/acc"] <= 1


@pytest.mark.parametrize(
    ("policy", "jitter"), [(None, True), ("trivialaugment", False), ("rand-m9-mstd0.5", False), ("original", False)]
)
def test_colour_jitter_is_off_under_an_augmentation_policy(policy: str | None, jitter: bool, tmp_path: Path) -> None:
    make_folder(tmp_path / "d", {"a": 4, "b": 4})
    datamodule = ImageFolderDataModule(str(tmp_path / "d"), image_size=16, auto_augment=policy, color_jitter=0.4)
    steps = [type(step).__name__ for step in datamodule.transform(training=True).transforms]
    assert ("ColorJitter" in steps) == jitter, steps


class LogsZero(Callback):
    """Logs a validation metric that is exactly 0, for a checkpoint monitor."""

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        pl_module.log("val/zero", 0.0)


def test_a_best_score_of_zero_is_written_as_zero(small_digits: Path, tmp_path: Path) -> None:
    trainer = {"max_epochs": 1, "callbacks": [{"class_path": f"{__name__}.LogsZero"}]}
    config = tiny_config(tmp_path, small_digits, trainer=trainer)
    cli_main(["fit", "--config", str(config), "--checkpoint.monitor", "val/zero"])
    summary = json.loads((run_dir(tmp_path, 0) / "summary.json").read_text())
    assert summary["monitor"] == "val/zero" and summary["best_value"] == 0.0
