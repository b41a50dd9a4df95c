"""Scores of how much an image looks like the training data, from the network's logits: higher is more familiar.

A model trained on ten kinds of things gives one of them to anything; these scores let it say "unknown" instead.
`energy` is the negative free energy of the logits (Liu et al., 2020, "Energy-based Out-of-distribution
Detection"): `logsumexp` over the classes, or for a multi-label network the sum of each label's `softplus` (Wang et
al., 2021, "Can multi-label classification networks know what they don't know?"). `msp` is the maximum softmax
(multi-label: sigmoid) probability (Hendrycks and Gimpel, 2017).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch.nn.functional as F
from torch import Tensor

from classifier.model.tta import TTA, predict_logits

OOD_SCORES = ("energy", "msp")


def ood_score(logits: Tensor, score: str = "energy", multilabel: bool = False) -> Tensor:
    """(N,) float32 scores of (N, C) logits (the network's own, already divided by its temperature)."""
    logits = logits.float()
    if score == "energy":
        return F.softplus(logits).sum(-1) if multilabel else logits.logsumexp(-1)
    if score == "msp":
        return (logits.sigmoid() if multilabel else logits.softmax(-1)).amax(-1)
    raise ValueError(f"--ood_score {score!r}: choose one of {', '.join(OOD_SCORES)}")


def score_kind(rejection: Mapping | None) -> str:
    """The score a network is judged by: its rejection's (fitted by `classifier calibrate`), else energy."""
    return rejection["score"] if rejection else "energy"


def plain_scores(
    model: Callable[[Tensor], Tensor],
    images: Tensor,
    logits: Tensor,
    tta: TTA | None,
    rejection: Mapping | None,
    multilabel: bool,
) -> Tensor:
    """Each image's score of `rejection`'s kind, from the image itself (the view calibrate fitted the threshold on):
    `logits` without TTA; with it, one more forward pass, since the views' combined logits are log-probabilities,
    whose energy is 0."""
    plain = logits if tta is None else model(images)
    return ood_score(plain, score_kind(rejection), multilabel)


def scored_logits(
    model: Callable[[Tensor], Tensor], images: Tensor, tta: TTA | None, rejection: Mapping | None, multilabel: bool
) -> tuple[Tensor, Tensor]:
    """`classifier.model.tta.predict_logits` of normalised images, and each image's `plain_scores`."""
    logits = predict_logits(model, images, tta, multilabel)
    return logits, plain_scores(model, images, logits, tta, rejection, multilabel)
