"""Class activation maps of a `ClassifierNet` with the grad-cam package: which layer to explain, how a vision
transformer's tokens become a map, and the overlays and the page of examples a person looks at."""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from matplotlib.figure import Figure
from pytorch_grad_cam import EigenCAM, GradCAM, GradCAMPlusPlus
from pytorch_grad_cam.utils.image import show_cam_on_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import Tensor, nn

from classifier.model.net import ClassifierNet

METHODS = {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus, "eigencam": EigenCAM}
GRID_EXAMPLES = 24  # one page: 4 pairs (image, overlay) a row, 6 rows
GRID_COLUMNS = 4
MIN_MAP_SIDE = 2  # activation cells a side that `--layer auto` asks of a CNN stage
Reshape = Callable[[Tensor], Tensor]


def is_vit(backbone: nn.Module) -> bool:
    """A timm vision transformer or kin (DeiT, EVA, BEiT...): patch tokens after `num_prefix_tokens` class and
    register tokens, from a patch embedding, through `blocks`."""
    return all(hasattr(backbone, name) for name in ("num_prefix_tokens", "patch_embed", "blocks"))


def auto_layer(net: ClassifierNet) -> str:
    """The layer `--layer auto` explains: a ViT's last block's first norm (its tokens, before attention mixes
    them); a CNN's last feature stage (timm's `feature_info`) whose maps are at least MIN_MAP_SIDE cells a side at
    the network's input size (a 1x1 map, such as ResNet's last stage on 32 px images, is the same everywhere)."""
    backbone = net.backbone
    if is_vit(backbone):
        if not hasattr(backbone.blocks[-1], "norm1"):
            raise ValueError(
                f"--layer auto: the last block of {net.backbone_name} has no norm1; name a layer with --layer"
            )
        return f"backbone.blocks.{len(backbone.blocks) - 1}.norm1"
    modules = dict(net.named_modules())
    stages = [
        stage for stage in getattr(backbone, "feature_info", None) or [] if f"backbone.{stage['module']}" in modules
    ]
    if not stages:
        raise ValueError(
            f"--layer auto: {net.backbone_name} does not say which modules are its feature stages; name a layer "
            "with --layer (a name of `net.named_modules()`, such as backbone.layer4)"
        )
    side = min(net.preprocessing["input_size"][1:])
    spatial = [stage for stage in stages if math.ceil(side / stage["reduction"]) >= MIN_MAP_SIDE]
    return f"backbone.{(spatial or stages[:1])[-1]['module']}"


def target_layer(net: ClassifierNet, layer: str = "auto") -> str:
    """The module name to explain: `auto`'s choice, or `layer` checked against the network's modules (a name
    inside the backbone may leave out `backbone.`)."""
    if layer == "auto":
        return auto_layer(net)
    names = [name for name, _ in net.named_modules() if name]
    for name in (layer, f"backbone.{layer}"):
        if name in names:
            return name
    close = difflib.get_close_matches(layer, names, n=3, cutoff=0.6)
    close += [name for name in difflib.get_close_matches(f"backbone.{layer}", names, n=3) if name not in close]
    hint = f" Did you mean {' or '.join(close[:3])}?" if close else ""
    raise ValueError(
        f"--layer {layer} is not a module of {net.backbone_name}.{hint} Names are those of `net.named_modules()`, "
        "such as backbone.<stage>; or --layer auto"
    )


def patch_grid(backbone: nn.Module, height: int, width: int) -> tuple[int, int]:
    """Rows and columns of patch tokens a ViT makes of a height x width input (timm's own arithmetic, padding
    included); the fixed grid of a patch embedding that cannot say."""
    embed = backbone.patch_embed
    if hasattr(embed, "dynamic_feat_size"):
        return tuple(embed.dynamic_feat_size((height, width)))
    return tuple(embed.grid_size)


def token_reshape(num_prefix_tokens: int, grid: tuple[int, int]) -> Reshape:
    """(B, prefix + h*w, C) tokens -> (B, C, h, w) maps: the class and register tokens dropped, the patches laid
    out on their grid. Other outputs (a convolution's maps) pass unchanged."""
    rows, columns = grid

    def reshape(tokens: Tensor) -> Tensor:
        if tokens.ndim != 3:
            return tokens
        batch, count, channels = tokens.shape
        if count != num_prefix_tokens + rows * columns:
            raise ValueError(
                f"{count} tokens are not {num_prefix_tokens} prefix tokens and a {rows}x{columns} patch grid: "
                "this layer does not output the patch tokens; choose another --layer"
            )
        return tokens[:, num_prefix_tokens:].reshape(batch, rows, columns, channels).permute(0, 3, 1, 2)

    return reshape


def channels_first(maps: Tensor) -> Tensor:
    """(B, H, W, C) maps -> (B, C, H, W); other outputs pass unchanged."""
    return maps.permute(0, 3, 1, 2) if maps.ndim == 4 else maps


def reshape_for(net: ClassifierNet, height: int, width: int) -> Reshape | None:
    """The reshape a ViT's tokens need for a height x width input; for a backbone whose stages output channels
    last (timm's Swin, MambaOut...: `output_fmt` NHWC), channels first; None for other CNNs."""
    backbone = net.backbone
    if is_vit(backbone):
        return token_reshape(backbone.num_prefix_tokens, patch_grid(backbone, height, width))
    return channels_first if getattr(backbone, "output_fmt", "NCHW") == "NHWC" else None


def class_activation_maps(
    net: ClassifierNet, images: Tensor, targets: Sequence[int], method: str = "gradcam", layer: str = "auto"
) -> np.ndarray:
    """(N, H, W) maps in [0, 1], one per normalised image of `images` for its class in `targets`, at the input's
    size (EigenCAM's do not depend on the class)."""
    module = dict(net.named_modules())[target_layer(net, layer)]
    reshape = reshape_for(net, *images.shape[-2:])
    cam = METHODS[method](model=net, target_layers=[module], reshape_transform=reshape)
    try:
        maps = cam(input_tensor=images, targets=[ClassifierOutputTarget(int(target)) for target in targets])
    finally:
        cam.activations_and_grads.release()  # its hooks off the network; not `with`, which swallows IndexError
        net.zero_grad(set_to_none=True)
    return maps


def overlay(image: Tensor, cam: np.ndarray) -> np.ndarray:
    """The uint8 CHW image the network saw, with the map over it as a heatmap: HWC uint8 RGB."""
    rgb = image.permute(1, 2, 0).numpy().astype(np.float32) / 255
    return show_cam_on_image(rgb, cam, use_rgb=True)


@dataclass
class Example:
    """One explained image as the grid shows it."""

    image: np.ndarray  # HWC uint8, what the network saw
    overlay: np.ndarray  # HWC uint8
    caption: str
    mistake: bool


def cam_grid_figure(examples: list[Example], title: str) -> Figure:
    """Up to GRID_EXAMPLES examples in order, each as its image and its overlay, mistakes captioned in red."""
    shown = examples[:GRID_EXAMPLES]
    columns = min(GRID_COLUMNS, max(1, len(shown)))
    rows = max(1, math.ceil(len(shown) / columns))
    figure = Figure(figsize=(4.2 * columns, 2.4 * rows + 0.4), dpi=100, layout="constrained")
    grid = figure.subplots(rows, 2 * columns, squeeze=False)
    for axes in grid.flat:
        axes.axis("off")
    for k, example in enumerate(shown):
        row, column = divmod(k, columns)
        image_axes, overlay_axes = grid[row, 2 * column], grid[row, 2 * column + 1]
        image_axes.imshow(example.image, interpolation="nearest")
        overlay_axes.imshow(example.overlay, interpolation="nearest")
        image_axes.set_title(example.caption, fontsize=8, color="red" if example.mistake else "black", loc="left")
    figure.suptitle(title)
    return figure
