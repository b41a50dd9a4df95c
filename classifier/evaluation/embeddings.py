"""What a `ClassifierNet` makes of its images just before it classifies them: the penultimate features, a seeded
2-D map of them, and TensorBoard's projector files."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.figure import Figure
from sklearn.decomposition import PCA
from sklearn.manifold import TSNE
from threadpoolctl import threadpool_limits
from torch import Tensor

from classifier.model.net import ClassifierNet

PROJECTIONS = ("tsne", "pca")
SPRITE_SIDE = 8192  # TensorBoard's projector draws sprites up to this many pixels a side
THUMB = 64  # a sprite thumbnail's side when the sprite has room for it
LEGEND_CLASSES = 30  # more classes than this get no legend


def penultimate(net: ClassifierNet, images: Tensor) -> tuple[Tensor, Tensor]:
    """(features, logits) of normalised images: the features are the input of the last Linear (the MLP head's
    last hidden layer, or the backbone's pooled pre-logits), the logits those of `net(images)`."""
    backbone = net.backbone
    if net.head_hidden_dims:
        features = net.head[:-1](backbone(images))
        classifier = net.head[-1]
    else:
        features = backbone.forward_head(backbone.forward_features(images), pre_logits=True)
        classifier = backbone.get_classifier()
    return features, classifier(features) / net.temperature


def project(features: np.ndarray, projection: str = "tsne", seed: int = 0) -> np.ndarray:
    """(N, 2) coordinates: t-SNE (PCA-initialised, perplexity at most 30 and below N) or PCA, the same for the
    same features and seed. The t-SNE runs on one OpenMP thread: its Barnes-Hut gradient adds the threads' partial
    sums in the order they finish, which with three or more threads changes the map from run to run."""
    count = len(features)
    if count < 2:
        raise ValueError(f"a 2-D map needs at least 2 images, not {count}")
    if projection == "pca":
        return PCA(n_components=2, svd_solver="full").fit_transform(features).astype(np.float32)
    perplexity = min(30.0, max(1.0, (count - 1) / 3))
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto", random_state=seed)
    with threadpool_limits(limits=1, user_api="openmp"):
        return tsne.fit_transform(features).astype(np.float32)


def sprite_thumb_size(count: int, preferred: int = THUMB, limit: int = SPRITE_SIDE) -> int:
    """The side of each of `count` projector thumbnails, so that the square sprite of them, ceil(sqrt(count))
    thumbnails a side, stays within `limit` pixels; 0 when not even 1 pixel fits."""
    return min(preferred, limit // max(1, math.ceil(math.sqrt(count))))


def thumbnails(images: Tensor, side: int) -> Tensor:
    """uint8 NCHW images as side x side floats in [0, 1], antialiased: the projector's label images."""
    scaled = torch.nn.functional.interpolate(images.float() / 255, size=(side, side), mode="bilinear", antialias=True)
    return scaled.clamp(0, 1)


def write_projector(folder: Path, features: np.ndarray, metadata: list[list[str]], thumbs: Tensor | None) -> None:
    """TensorBoard's projector files under `folder` (`tensorboard --logdir folder`, PROJECTOR tab): the features,
    a header and one tab-separated metadata line per image, and the sprite of thumbnails."""
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(log_dir=str(folder)) as writer:
        header = ["path", "label", "prediction"]
        writer.add_embedding(features, metadata=metadata, label_img=thumbs, metadata_header=header, tag="penultimate")


def embedding_figure(
    xy: np.ndarray, colour_by: np.ndarray, mistakes: np.ndarray, classes: list[str], title: str
) -> Figure:
    """The 2-D map, one colour per class (`colour_by`: labels, or predictions when unlabelled), mistakes ringed in
    black."""
    figure = Figure(figsize=(9, 7.5), dpi=100, layout="constrained")
    axes = figure.subplots()
    palette = colormaps["tab10" if len(classes) <= 10 else "tab20" if len(classes) <= 20 else "turbo"]
    for index, name in enumerate(classes):
        chosen = colour_by == index
        if chosen.any():
            colour = palette(index if len(classes) <= 20 else index / max(1, len(classes) - 1))
            axes.scatter(*xy[chosen].T, s=14, color=colour, label=name, alpha=0.8, linewidths=0)
    if mistakes.any():
        axes.scatter(*xy[mistakes].T, s=40, facecolors="none", edgecolors="black", linewidths=0.8, label="mistake")
    if len(classes) <= LEGEND_CLASSES:
        figure.legend(loc="outside right upper", fontsize=8, markerscale=1.5)
    axes.set(xticks=[], yticks=[], title=title)
    return figure
