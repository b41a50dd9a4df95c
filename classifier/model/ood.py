"""Scores of how much an image looks like the training data, from the network's logits: higher is more familiar.

A model trained on ten kinds of things gives one of them to anything; these scores let it say "unknown" instead.
`energy` is the negative free energy of the logits (Liu et al., 2020, "Energy-based Out-of-distribution
Detection"): `logsumexp` over the classes, or for a multi-label network the sum of each label's `softplus` (Wang et
al., 2021, "Can multi-label classification networks know what they don't know?"). `msp` is the maximum softmax
(multi-label: sigmoid) probability (Hendrycks and Gimpel, 2017).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

OOD_SCORES = ("energy", "msp")


def ood_score(logits: Tensor, score: str = "energy", multilabel: bool = False) -> Tensor:
    """(N,) float32 scores of (N, C) logits (the network's own, already divided by its temperature)."""
    logits = logits.float()
    if score == "energy":
        return F.softplus(logits).sum(-1) if multilabel else logits.logsumexp(-1)
    if score == "msp":
        return (logits.sigmoid() if multilabel else logits.softmax(-1)).amax(-1)
    raise ValueError(f"--ood_score {score!r}: choose one of {', '.join(OOD_SCORES)}")
