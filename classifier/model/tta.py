"""Test-time augmentation: the views of a normalised batch whose class probabilities are averaged."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

TTA = Literal["flip", "crops", "flip_crops"]
CROP_SCALE = 0.875  # each corner crop keeps 87.5% of the side, like a standard eval centre crop


def tta_views(images: Tensor, tta: TTA | None) -> list[Tensor]:
    """The batch itself, plus its mirror image ("flip"), its four corner crops ("crops"), or both."""
    views = [images]
    if tta in ("crops", "flip_crops"):
        height, width = images.shape[-2:]
        h, w = round(height * CROP_SCALE), round(width * CROP_SCALE)
        for top, left in ((0, 0), (0, width - w), (height - h, 0), (height - h, width - w)):
            crop = images[..., top : top + h, left : left + w]
            views.append(F.interpolate(crop, size=(height, width), mode="bilinear", align_corners=False))
    if tta in ("flip", "flip_crops"):
        views += [view.flip(-1) for view in views]
    return views


def predict_logits(
    model: Callable[[Tensor], Tensor], images: Tensor, tta: TTA | None, multilabel: bool = False
) -> Tensor:
    """Logits, or with TTA the log of the views' mean probabilities (the same thing for softmax and loss);
    multi-label, the logit of the views' mean sigmoid probabilities (the same thing for sigmoid). Computed in log
    space (logsumexp), so a probability that underflows in float32 gives a finite logit, not -inf."""
    views = tta_views(images, tta)
    if len(views) == 1:
        return model(images)
    logits = torch.stack([model(view).float() for view in views])
    if multilabel:  # logit(mean p) = log mean p - log mean (1 - p)
        return F.logsigmoid(logits).logsumexp(dim=0) - F.logsigmoid(-logits).logsumexp(dim=0)
    return logits.log_softmax(dim=-1).logsumexp(dim=0) - math.log(len(views))
