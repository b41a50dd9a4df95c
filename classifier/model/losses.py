"""Classification losses; each is a small module with `forward(logits, target) -> Tensor`.

One class per image: cross-entropy or focal over the softmax, targets class indices or probabilities. A set of labels
per image: binary cross-entropy, focal or asymmetric over one sigmoid per class, targets 0/1 rows or mixed ones.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.utils.class_weight import compute_class_weight
from timm.loss import AsymmetricLossMultiLabel
from torch import Tensor, nn

LOSSES = {"multiclass": ("ce", "focal"), "multilabel": ("bce", "focal", "asl")}


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


class SigmoidLoss(nn.Module):
    """Per-class sigmoid losses on multi-hot targets (0/1 or mixed), averaged over images and classes.

    `weight` is each class's positive weight (PyTorch's `pos_weight`: a label present counts `weight` times). Label
    smoothing pulls each target towards 1/2. bce is binary cross-entropy; focal multiplies each term by
    (1 - p_t)^gamma (Lin et al., 2017; gamma=0 is bce); asl is timm's asymmetric loss (Ridnik et al., 2021), which
    focuses harder on negatives and discards the easiest of them, for the many absent labels of each image.
    """

    def __init__(
        self,
        kind: Literal["bce", "focal", "asl"] = "bce",
        weight: Tensor | None = None,
        label_smoothing: float = 0.0,
        gamma: float = 2.0,
    ) -> None:
        super().__init__()
        if kind == "asl" and weight is not None:
            raise ValueError("--model.loss asl weighs labels by itself: use it without --model.class_weights")
        self.kind = kind
        self.label_smoothing = label_smoothing
        self.gamma = gamma
        self.register_buffer("weight", weight)
        self.asymmetric = AsymmetricLossMultiLabel() if kind == "asl" else None

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        logits = logits.float()
        target = target.float() * (1 - self.label_smoothing) + self.label_smoothing / 2
        if self.asymmetric is not None:  # timm's sums over the batch and classes
            return self.asymmetric(logits, target) / logits.numel()
        terms = F.binary_cross_entropy_with_logits(logits, target, pos_weight=self.weight, reduction="none")
        if self.kind == "focal":
            p = logits.sigmoid()
            terms = terms * (1 - (p * target + (1 - p) * (1 - target))).pow(self.gamma)
        return terms.mean()


def build_loss(
    name: Literal["ce", "bce", "focal", "asl"] | None,
    num_classes: int,
    weighted: bool,
    label_smoothing: float,
    focal_gamma: float,
    task: str = "multiclass",
) -> nn.Module:
    """The loss module (None: ce, or bce for multi-label); `weighted` gives it a per-class `weight` buffer that is
    saved with the checkpoint."""
    name = name or LOSSES[task][0]
    if name not in LOSSES[task]:
        raise ValueError(f"--model.loss {name} is not a {task} loss; those are: {', '.join(LOSSES[task])}")
    weight = torch.ones(num_classes) if weighted else None
    if task == "multilabel":
        return SigmoidLoss(name, weight, label_smoothing, focal_gamma)
    if name == "ce":
        return nn.CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing)
    return FocalLoss(gamma=focal_gamma, weight=weight, label_smoothing=label_smoothing)


def loss_normaliser(criterion: nn.Module, targets: Tensor) -> Tensor:
    """What `criterion` divided a batch's summed loss by: the targets' total class weight for weighted class indices
    (PyTorch's weighted mean), else the number of images. Batch losses averaged with it give the split's loss."""
    weight = getattr(criterion, "weight", None)
    if weight is not None and not targets.is_floating_point():
        return weight[targets].sum()
    return torch.tensor(float(len(targets)), device=targets.device)


def checkpoints_criterion(checkpoints: list[dict[str, Any]]) -> nn.Module:
    """The loss the checkpoints trained with, their class weights averaged: the criterion of their ensemble (each fold
    of `cv` counts its own "auto" weights on its own train split)."""
    hparams = checkpoints[0]["hyper_parameters"]
    states = [checkpoint["state_dict"] for checkpoint in checkpoints]
    weights = [state["criterion.weight"].float() for state in states if "criterion.weight" in state]
    criterion = build_loss(
        hparams.get("loss"),
        len(hparams["class_names"]),
        bool(weights),
        hparams.get("label_smoothing", 0.0),
        hparams.get("focal_gamma", 2.0),
        hparams.get("task", "multiclass"),
    )
    if weights:
        criterion.weight.copy_(torch.stack(weights).mean(dim=0))
    return criterion


def probabilities_loss(criterion: nn.Module, probs: Tensor, targets: Tensor) -> float:
    """The criterion of probabilities (an ensemble's mean) through the logits that give them: log p for a softmax,
    logit p for sigmoids (targets 0/1 rows), clipped where a written probability is 0 or 1."""
    probs = probs.float()
    with torch.no_grad():
        if isinstance(criterion, SigmoidLoss):
            return float(criterion(probs.logit(eps=1e-7), targets.float()))
        return float(criterion(probs.clamp_min(torch.finfo(torch.float32).tiny).log(), targets))


def inverse_frequency_weights(
    class_counts: list[int], class_names: list[str], multilabel_images: int | None = None
) -> Tensor:
    """scikit-learn's "balanced" weights, n / (k * count): every class contributes equally to the loss. Multi-label
    (given the number of train images), each label's positive weight, negatives / positives, as PyTorch advises."""
    empty = [name for name, count in zip(class_names, class_counts, strict=True) if count == 0]
    if empty:
        raise ValueError(
            f"--model.class_weights auto needs every class in the train split; {empty} have no train images. "
            "Add images or pass an explicit --model.class_weights list"
        )
    if multilabel_images is not None:
        positives = torch.tensor(class_counts, dtype=torch.float)
        return (multilabel_images - positives) / positives
    labels = np.repeat(np.arange(len(class_counts)), class_counts)
    weights = compute_class_weight("balanced", classes=np.arange(len(class_counts)), y=labels)
    return torch.tensor(weights, dtype=torch.float)
