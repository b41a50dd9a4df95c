"""Classification losses; each is a small module with `forward(logits, target) -> Tensor`."""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.utils.class_weight import compute_class_weight
from torch import Tensor, nn


class FocalLoss(nn.Module):
    """Focal loss (Lin et al., 2017): down-weights easy examples.

    Targets are class indices, or class probabilities (mixup, cutmix) as `nn.CrossEntropyLoss` takes them. With
    label smoothing every class's term counts with its smoothed target; with gamma=0 the loss equals
    `nn.CrossEntropyLoss(weight, label_smoothing=...)` for either kind of target, class weights included.
    """

    def __init__(self, gamma: float = 2.0, weight: Tensor | None = None, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.gamma = gamma
        self.label_smoothing = label_smoothing
        self.register_buffer("weight", weight)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        log_p = F.log_softmax(logits.float(), dim=-1)
        classes = log_p.shape[-1]
        soft = target.is_floating_point()
        probs = target.float() if soft else F.one_hot(target, classes).float()
        smoothed = probs * (1 - self.label_smoothing) + self.label_smoothing / classes
        weight = self.weight if self.weight is not None else torch.ones(classes, device=log_p.device)
        loss = -(weight * smoothed * (1 - log_p.exp()).pow(self.gamma) * log_p).sum()
        # normalised as cross-entropy is: by the targets' total weight for indices, by the batch for probabilities
        return loss / (len(target) if soft else weight[target].sum())


def build_loss(
    name: Literal["ce", "focal"], num_classes: int, weighted: bool, label_smoothing: float, focal_gamma: float
) -> nn.Module:
    """The loss module; `weighted` gives it a per-class `weight` buffer that is saved with the checkpoint."""
    weight = torch.ones(num_classes) if weighted else None
    if name == "ce":
        return nn.CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing)
    if name == "focal":
        return FocalLoss(gamma=focal_gamma, weight=weight, label_smoothing=label_smoothing)
    raise ValueError(f"--model.loss {name!r} is not one of: ce, focal")


def inverse_frequency_weights(class_counts: list[int], class_names: list[str]) -> Tensor:
    """scikit-learn's "balanced" weights, n / (k * count): every class contributes equally to the loss."""
    empty = [name for name, count in zip(class_names, class_counts, strict=True) if count == 0]
    if empty:
        raise ValueError(
            f"--model.class_weights auto needs every class in the train split; {empty} have no train images. "
            "Add images or pass an explicit --model.class_weights list"
        )
    labels = np.repeat(np.arange(len(class_counts)), class_counts)
    weights = compute_class_weight("balanced", classes=np.arange(len(class_counts)), y=labels)
    return torch.tensor(weights, dtype=torch.float)
