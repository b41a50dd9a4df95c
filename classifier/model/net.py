"""The network a checkpoint holds: a timm backbone, our head, and the eval preprocessing as plain data.

It is a plain `nn.Module`, rebuilt from `ClassifierNet.config()` alone: no file, hub or trainer is needed to
test, predict, export or serve it. Pretrained weights are loaded into it at the start of a fresh fit
(`load_pretrained`), never when it is rebuilt.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from PIL import Image
from timm.data import create_transform
from torch import Tensor, nn

from classifier.model.backbones import backbone_data_config, backbone_kwargs, create_backbone, load_pretrained

# the eval preprocessing a network was trained with; what export and serving need to feed it
PREPROCESSING_KEYS = ("input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std")
TASKS = ("multiclass", "multilabel")  # one class per image, or a set of them


def resolve_preprocessing(backbone: str, image_size: int | None = None, crop_pct: float | None = None) -> dict:
    """The backbone's timm data config with our overrides, as plain data (lists, not tuples)."""
    config = backbone_data_config(backbone)
    if image_size:
        config["input_size"] = (3, image_size, image_size)
    if crop_pct:
        config["crop_pct"] = crop_pct
    config.setdefault("crop_mode", "center")
    return {key: list(value) if isinstance(value, tuple) else value for key, value in config.items()}


def scale_size(preprocessing: dict) -> int:
    """The shorter side eval resizes to before its centre crop (timm's `floor(size / crop_pct)`)."""
    return math.floor(preprocessing["input_size"][-1] / preprocessing["crop_pct"])


def eval_transform(preprocessing: dict) -> Callable[[Image.Image], Tensor]:
    """The one eval transform: timm's PIL resize (antialiased) and centre crop, to a uint8 CHW tensor.

    validate, test, predict, `Predictor` and the RAM cache all render exactly this, whatever the hardware.
    """
    config = {key: preprocessing[key] for key in ("interpolation", "crop_pct", "crop_mode")}
    return create_transform(input_size=tuple(preprocessing["input_size"]), **config, normalize=False)


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
    """

    def __init__(
        self,
        backbone: str,
        class_names: list[str],
        drop_rate: float = 0.0,
        image_size: int | None = None,
        head_hidden_dims: list[int] | None = None,
        preprocessing: dict | None = None,
        temperature: float = 1.0,
        task: str = "multiclass",
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
        num_classes = len(self.class_names)
        self.backbone = create_backbone(backbone, self._backbone_outputs, drop_rate, image_size)
        self.head = mlp_head(self.backbone.num_features, head_hidden_dims, num_classes, drop_rate)
        if self.multilabel:  # each class's decision threshold: tuned on validation, saved with the weights
            self.register_buffer("thresholds", torch.full((num_classes,), 0.5))

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
        """Start from the hub's (True) or a local file's backbone weights: once, at the start of a fresh fit."""
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
        }

    def classifier_parameters(self) -> list[nn.Parameter]:
        """The classifier's parameters: the MLP head's, or the backbone's own linear head's."""
        return list(self.head.parameters()) or list(self.backbone.get_classifier().parameters())
