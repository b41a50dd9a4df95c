"""The network a checkpoint holds: a timm backbone, our head, and the eval preprocessing as plain data.

It is a plain `nn.Module`, rebuilt from `ClassifierNet.config()` alone: no file, hub or trainer is needed to
test, predict, export or serve it. Pretrained weights are loaded into it at the start of a fresh fit
(`load_pretrained`), never when it is rebuilt.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from PIL import Image
from safetensors.torch import load_file
from timm.data import create_transform
from timm.data.transforms import ResizeKeepRatio
from torch import Tensor, nn

from classifier.core.geometry import RESIZE_MODES, image_hw
from classifier.model.backbones import backbone_data_config, backbone_kwargs, create_backbone, load_pretrained
from classifier.model.repos import OURS, is_repo, load_repo_weights, repo_files

# the eval preprocessing a network was trained with; what export and serving need to feed it
PREPROCESSING_KEYS = ("input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std")
TASKS = ("multiclass", "multilabel")  # one class per image, or a set of them


def resolve_preprocessing(
    backbone: str,
    image_size: int | list[int] | tuple[int, int] | None = None,
    crop_pct: float | None = None,
    resize_mode: str | None = None,
) -> dict:
    """The backbone's timm data config with our overrides, as plain data (lists, not tuples). `squash` and
    `letterbox` keep the whole image in view: their crop_pct is 1 unless `crop_pct` says otherwise."""
    config = backbone_data_config(backbone)
    if image_size:
        config["input_size"] = (3, *image_hw(image_size))
    if resize_mode is not None:
        if resize_mode not in RESIZE_MODES:
            raise ValueError(f"--data.resize_mode {resize_mode!r}: choose one of {', '.join(RESIZE_MODES)}")
        config["crop_mode"] = RESIZE_MODES[resize_mode]
        config["crop_pct"] = 1.0 if resize_mode != "crop" else config.get("crop_pct")
    if crop_pct:
        config["crop_pct"] = crop_pct
    config.setdefault("crop_mode", "center")
    return {key: list(value) if isinstance(value, tuple) else value for key, value in config.items()}


def eval_transform(preprocessing: dict) -> Callable[[Image.Image], Tensor]:
    """The one eval transform: timm's PIL resize (antialiased) and centre crop, squash or letterbox (padded with the
    mean), to a uint8 CHW tensor.

    validate, test, predict, `Predictor` and the RAM cache all render exactly this, whatever the hardware; the
    torch-free `classifier.deploy.preprocess.resize_and_crop` renders the same pixels.
    """
    config = {key: preprocessing[key] for key in ("interpolation", "crop_pct", "crop_mode", "mean")}
    transform = create_transform(input_size=tuple(preprocessing["input_size"]), **config, normalize=False)
    if preprocessing["crop_mode"] == "border":
        transform.transforms[0] = LetterboxFit(transform.transforms[0].size, preprocessing["interpolation"])
    return transform


class LetterboxFit(ResizeKeepRatio):
    """timm's letterbox resize (ResizeKeepRatio, longest side), except that an image far wider or taller than the
    model keeps one pixel on its shorter side rather than none."""

    def __init__(self, size: tuple[int, int], interpolation: str) -> None:
        super().__init__(size, longest=1.0, interpolation=interpolation)

    @staticmethod
    def get_params(*args: Any, **kwargs: Any) -> list[int]:
        return [max(1, side) for side in ResizeKeepRatio.get_params(*args, **kwargs)]


def normalisation(preprocessing: dict, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """Mean and std on the 0-255 scale, shaped to broadcast over NCHW uint8 batches."""
    mean = torch.tensor(preprocessing["mean"], dtype=torch.float32).view(1, -1, 1, 1) * 255
    std = torch.tensor(preprocessing["std"], dtype=torch.float32).view(1, -1, 1, 1) * 255
    return mean.to(device), std.to(device)


def mlp_head(features: int, hidden: list[int] | None, num_classes: int, drop_rate: float) -> nn.Module:
    """Linear -> BatchNorm -> ReLU -> Dropout per hidden size, then the class layer; Identity without hidden sizes."""
    if not hidden:
        return nn.Identity()
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(features, width), nn.BatchNorm1d(width), nn.ReLU(inplace=True), nn.Dropout(drop_rate)]
        features = width
    return nn.Sequential(*layers, nn.Linear(features, num_classes))


class ClassifierNet(nn.Module):
    """Normalised images in, class logits out; carries the class names and the preprocessing it expects.

    `temperature` divides the logits (temperature scaling, fitted by `classifier calibrate`), so that every consumer
    of the network (test, predict, `Predictor`, export, serving) gets calibrated probabilities with no code of its own.
    `rejection` ({"score": "energy" or "msp", "threshold": float, "keep": float}, also fitted by `calibrate`) says
    below which `classifier.model.ood.ood_score` an image is unknown.
    """

    def __init__(
        self,
        backbone: str,
        class_names: list[str],
        drop_rate: float = 0.0,
        image_size: int | list[int] | None = None,
        head_hidden_dims: list[int] | None = None,
        preprocessing: dict | None = None,
        temperature: float = 1.0,
        task: str = "multiclass",
        rejection: dict | None = None,
    ) -> None:
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"the task must be one of {', '.join(TASKS)}, not {task!r}")
        self.task = task
        self.backbone_name = backbone
        self.class_names = list(class_names)
        self.drop_rate = drop_rate
        self.image_size = image_size
        self.head_hidden_dims = list(head_hidden_dims) if head_hidden_dims else None
        self.preprocessing = dict(preprocessing or resolve_preprocessing(backbone, image_size))
        if not temperature > 0:
            raise ValueError(f"the temperature must be positive, not {temperature}")
        self.temperature = float(temperature)
        self.rejection = dict(rejection) if rejection else None  # {"score", "threshold", "keep"}: see model.ood
        num_classes = len(self.class_names)
        self.backbone = create_backbone(backbone, self._backbone_outputs, drop_rate, image_size)
        self.head = mlp_head(self.backbone.num_features, head_hidden_dims, num_classes, drop_rate)
        if self.multilabel:  # each class's decision threshold: tuned on validation, saved with the weights
            self.register_buffer("thresholds", torch.full((num_classes,), 0.5))

    @classmethod
    def from_checkpoint(cls, checkpoint: dict, source: str) -> ClassifierNet:
        """The network a checkpoint (as `read_checkpoint` gives it) describes, with its weights; `source` names the
        checkpoint in the error for one that `fit` did not write."""
        if "net" not in checkpoint:
            raise ValueError(f"{source} holds no network description: was it written by `classifier fit`?")
        net = cls(**checkpoint["net"])
        state = {key.removeprefix("net."): value for key, value in checkpoint["state_dict"].items()}
        net.load_state_dict({key: state[key] for key in net.state_dict()})
        return net

    @classmethod
    def from_repo(cls, source: str) -> ClassifierNet:
        """The network of a repo `classifier push` wrote (hf-hub:ID, local-dir:PATH or its folder), as its checkpoint
        had it: class names, preprocessing, temperature, rejection and multi-label thresholds."""
        config, weights = repo_files(source, "the repo")
        if OURS not in config:
            raise ValueError(
                f"{source}: its config.json is a timm model's, without {OURS!r} (task, temperature, preprocessing): "
                f"fine-tune from it with --model.pretrained {source} instead"
            )
        description = dict(config[OURS])
        thresholds = description.pop("thresholds", None)
        net = cls(**description)
        net.backbone.load_state_dict(load_file(str(weights)))
        if thresholds is not None:
            net.thresholds.copy_(torch.tensor(thresholds))
        return net

    @property
    def multilabel(self) -> bool:
        """Whether each class is a yes/no of its own (sigmoid outputs) rather than one of the classes (softmax)."""
        return self.task == "multilabel"

    def probabilities(self, logits: Tensor) -> Tensor:
        """Class probabilities: softmax over the classes, or one sigmoid per class under multi-label."""
        return logits.float().sigmoid() if self.multilabel else logits.float().softmax(dim=-1)

    @property
    def _backbone_outputs(self) -> int:
        """The backbone's own head size: the classes, or 0 (pooled features) under an MLP head."""
        return 0 if self.head_hidden_dims else len(self.class_names)

    def load_pretrained(self, pretrained: bool | str) -> None:
        """Start from the hub's (True), a local file's or a model repo's weights: once, at the start of a fresh fit."""
        if is_repo(pretrained):  # a model repo: a whole network, its head too when its classes are ours
            load_repo_weights(self.backbone, pretrained, self.backbone_name, self.class_names)
            return
        kwargs = backbone_kwargs(self.backbone_name, self._backbone_outputs, self.drop_rate, self.image_size)
        load_pretrained(self.backbone, self.backbone_name, pretrained, kwargs)

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.backbone(images)) / self.temperature

    def config(self) -> dict[str, Any]:
        """The constructor's arguments, as plain data: enough to rebuild this network anywhere."""
        return {
            "backbone": self.backbone_name,
            "class_names": self.class_names,
            "drop_rate": self.drop_rate,
            "image_size": self.image_size,
            "head_hidden_dims": self.head_hidden_dims,
            "preprocessing": self.preprocessing,
            "temperature": self.temperature,
            "task": self.task,
            "rejection": self.rejection,
        }

    def classifier_parameters(self) -> list[nn.Parameter]:
        """The classifier's parameters: the MLP head's, or the backbone's own linear head's."""
        return list(self.head.parameters()) or list(self.backbone.get_classifier().parameters())
