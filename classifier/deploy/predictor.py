"""Class probabilities, the scores that say how familiar an image is, and the labels they decide, from a checkpoint
alone, on any machine: for scripts, export, serving and explanations."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from classifier.core.imageio import as_rgb_image
from classifier.deploy.inputs import Classifies, ImageInput, Scored, join_scored, predict_in_chunks
from classifier.model.checkpoints import read_checkpoint
from classifier.model.net import ClassifierNet, eval_transform, normalisation
from classifier.model.ood import scored_logits
from classifier.model.tta import TTA, predict_logits


class Predictor(Classifies):
    """A trained `ClassifierNet` with the eval transform it was trained for, on one device."""

    def __init__(
        self, net: ClassifierNet, device: str | torch.device = "cpu", tta: TTA | None = None, batch_size: int = 64
    ) -> None:
        self.device = torch.device(device)
        self.net = net.eval().to(self.device)
        self.tta = tta
        self.batch_size = batch_size
        self.transform = eval_transform(net.preprocessing)
        self.mean, self.std = normalisation(net.preprocessing, self.device)

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        device: str | torch.device = "cpu",
        tta: TTA | Literal["none", "checkpoint"] = "checkpoint",
        batch_size: int = 64,
    ) -> Predictor:
        """Rebuild the network from the checkpoint's own description and weights; nothing else is read.

        `tta` is the test-time augmentation the checkpoint was configured with by default; "none" turns it off.
        """
        checkpoint = read_checkpoint(path, "checkpoint")
        net = ClassifierNet.from_checkpoint(checkpoint, str(path))
        if tta == "checkpoint":
            tta = checkpoint.get("hyper_parameters", {}).get("tta")
        return cls(net, device, None if tta == "none" else tta, batch_size)

    @classmethod
    def from_pretrained(cls, source: str, device: str | torch.device = "cpu", batch_size: int = 64) -> Predictor:
        """Predict with a model repo `classifier push` wrote: hf-hub:ID, local-dir:PATH, or its folder."""
        return cls(ClassifierNet.from_repo(str(source)), device, None, batch_size)

    @property
    def class_names(self) -> list[str]:
        return self.net.class_names

    @property
    def task(self) -> str:
        """The network's task: multiclass (one class per image) or multilabel (a set of labels per image)."""
        return self.net.task

    @property
    def thresholds(self) -> np.ndarray | None:
        """Multi-label: each label's decision threshold, as the checkpoint was tuned (float64); None otherwise."""
        return self.net.thresholds.cpu().double().numpy() if self.net.multilabel else None

    @property
    def rejection(self) -> dict | None:
        """{"score", "threshold", "keep"} of a checkpoint calibrated with a rejection: below it, an image is unknown."""
        return self.net.rejection

    @property
    def preprocessing(self) -> dict:
        """Input size, interpolation, crop_pct, crop_mode, mean and std: what export and serving must reproduce."""
        return self.net.preprocessing

    def preprocess(self, image: ImageInput) -> Tensor:
        """One image (a path, a PIL image or an HWC/HW uint8 array) as the uint8 CHW tensor the network sees."""
        return self.transform(as_rgb_image(image))

    @torch.inference_mode()
    def predict_batch(self, images: Tensor) -> Tensor:
        """Probabilities for a preprocessed uint8 NCHW batch: over the classes, or per label under multi-label."""
        images = (images.to(self.device).float() - self.mean) / self.std
        return self.net.probabilities(predict_logits(self.net, images, self.tta, self.net.multilabel)).cpu()

    @torch.inference_mode()
    def scored_batch(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """`predict_batch`'s probabilities, and each image's (N,) OOD score (`classifier.model.ood.scored_logits`)."""
        net, images = self.net, (images.to(self.device).float() - self.mean) / self.std
        logits, scores = scored_logits(net, images, self.tta, net.rejection, net.multilabel)
        return self.net.probabilities(logits).cpu(), scores.cpu()

    def predict(self, images: ImageInput | Sequence[ImageInput]) -> Tensor:
        """(N, classes) probabilities for a sequence of images, or (classes,) for one image."""
        empty = torch.zeros(0, len(self.class_names))
        return predict_in_chunks(images, self.batch_size, self._predict_chunk, torch.cat, empty)

    def _predict_chunk(self, images: list[ImageInput]) -> Tensor:
        return self.predict_batch(torch.stack([self.preprocess(image) for image in images]))

    def predict_scored(self, images: list[ImageInput]) -> Scored:
        """(N, C) probabilities and (N,) scores (None without a rejection) of a list of images, as numpy arrays: what
        `classify` decides from."""
        empty = (np.zeros((0, len(self.class_names)), dtype=np.float32), np.zeros(0, dtype=np.float32))
        return predict_in_chunks(images, self.batch_size, self._scored_chunk, join_scored, empty)

    def _scored_chunk(self, images: list[ImageInput]) -> Scored:
        batch = torch.stack([self.preprocess(image) for image in images])
        if self.rejection is None:  # no threshold to compare a score with: none computed, as OnnxPredictor's
            return self.predict_batch(batch).numpy(), None
        probabilities, scores = self.scored_batch(batch)
        return probabilities.numpy(), scores.numpy()
