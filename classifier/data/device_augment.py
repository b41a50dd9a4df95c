"""Crops planned per sample in the loader workers and rendered batched on the device (GPU decode, RAM cache).

A plan is eight numbers per sample: the crop box `x0, y0, x1, y1` in the pixels of the image it refers to,
a flip flag, and brightness, contrast and saturation factors. The workers draw plans with timm's own
random-resized-crop sampler, so the distribution is the CPU path's; the device then does the expensive part
(decode, resize, flip, colour) for the whole batch at once.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass, replace

import torch
from timm.data.transforms import RandomResizedCropAndInterpolation
from torch import Tensor
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.ops import roi_align

from classifier.core.geometry import centre_offsets, crop_resized_size

log = logging.getLogger(__name__)

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale


class CropPlanner:
    """Draws each sample's plan: timm's random-resized crop (at the model's aspect), flip and colour jitter, or its
    eval centre crop (the `crop` resize mode; squash and letterbox render on the CPU)."""

    def __init__(
        self,
        image_size: tuple[int, int],
        scale_size: tuple[int, int],
        training: bool,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
        color_jitter: float | None = None,
    ) -> None:
        self.image_size = image_size  # (height, width)
        self.scale_size = scale_size  # timm's eval resize: floor(image_size / crop_pct)
        self.training = training
        aspect = image_size[1] / image_size[0]  # crops at the model's aspect, as `classifier.data.transforms.ModeCrop`
        self.scale, self.ratio = tuple(scale), (ratio[0] * aspect, ratio[1] * aspect)
        self.hflip = hflip
        self.jitter = color_jitter or 0.0

    def __call__(self, height: int, width: int) -> Tensor:
        """The plan for one image of this size."""
        if not self.training:
            return torch.tensor([*self._centre_box(height, width), 0.0, 1.0, 1.0, 1.0])
        top, left, crop_h, crop_w = RandomResizedCropAndInterpolation.get_params(
            torch.empty(0, height, width), self.scale, self.ratio
        )
        flip = float(random.random() < self.hflip)
        low = max(0.0, 1.0 - self.jitter)
        factors = [random.uniform(low, 1.0 + self.jitter) for _ in range(3)] if self.jitter else [1.0] * 3
        return torch.tensor([left, top, left + crop_w, top + crop_h, flip, *factors], dtype=torch.float32)

    def _centre_box(self, height: int, width: int) -> tuple[float, float, float, float]:
        """timm's eval geometry (its `crop` resize to scale_size, then the centre crop) as a box in this image's
        pixels."""
        resized_h, resized_w = crop_resized_size(height, width, self.scale_size)
        out_h, out_w = self.image_size
        _, _, left, top = centre_offsets(resized_h, resized_w, out_h, out_w)
        sy, sx = height / resized_h, width / resized_w
        return left * sx, top * sy, (left + out_w) * sx, (top + out_h) * sy


def cut(image: Tensor, plan: Tensor) -> tuple[Tensor, Tensor]:
    """The whole-pixel region of `image` that the plan's box covers, and the plan with the box made relative."""
    left, top, right, bottom = plan[:4].tolist()
    x0, y0, x1, y1 = math.floor(left), math.floor(top), math.ceil(right), math.ceil(bottom)
    relative = plan.clone()
    relative[:4] -= torch.tensor([x0, y0, x0, y0], dtype=plan.dtype)
    return image[:, y0:y1, x0:x1], relative


@dataclass
class CropBatch:
    """A batch the device renders: CPU-decoded crops in one padded canvas, then JPEGs to decode there.

    Rows of `plans`, `targets` and `rows` follow the same order: canvas entries first, JPEGs after.
    """

    canvas: Tensor  # (P, 3, H, W) uint8, each crop at the top left, edge-padded
    jpegs: list[Tensor]  # encoded bytes on the CPU; after `to`, the decoded crops on the device
    plans: Tensor  # (B, 8) float32
    targets: Tensor
    rows: Tensor

    def pin_memory(self) -> CropBatch:
        """Called by the DataLoader's pin-memory thread; the JPEG bytes go to the decoder as they are."""
        return replace(
            self,
            canvas=self.canvas.pin_memory(),
            plans=self.plans.pin_memory(),
            targets=self.targets.pin_memory(),
            rows=self.rows.pin_memory(),
        )

    def to(self, device: torch.device) -> CropBatch:
        """Move to `device`, decoding the JPEGs there (nvJPEG on CUDA) and cutting out their crops."""
        plans = self.plans.clone()
        crops = []
        if self.jpegs:
            for k, image in enumerate(decode_jpegs(self.jpegs, device)):
                row = len(self.canvas) + k
                crop, plans[row] = cut(image, plans[row])
                crops.append(crop)
        return CropBatch(
            canvas=self.canvas.to(device, non_blocking=True),
            jpegs=crops,
            plans=plans.to(device, non_blocking=True),
            targets=self.targets.to(device, non_blocking=True),
            rows=self.rows.to(device, non_blocking=True),
        )

    def render(self, size: tuple[int, int], jitter: bool) -> Tensor:
        """(B, 3, height, width) on the 0-255 scale: each box resized (averaging when shrinking), flipped, jittered."""
        boxes, count = self.plans[:, :4], len(self.canvas)
        index = torch.arange(len(boxes), device=boxes.device, dtype=boxes.dtype)
        index[count:] = 0  # each decoded JPEG is a batch of one of its own
        rois = torch.cat([index[:, None], boxes], 1)  # roi_align's (batch index, x0, y0, x1, y1) rows
        parts = [resize_boxes(self.canvas, rois[:count], size)] if count else []
        parts += [resize_boxes(crop[None], rois[count + k : count + k + 1], size) for k, crop in enumerate(self.jpegs)]
        images = torch.cat(parts)
        flip = self.plans[:, 4].bool().view(-1, 1, 1, 1)
        images = torch.where(flip, images.flip(-1), images)
        if jitter:
            images = color_jitter(images, *self.plans[:, 5:8].unbind(1))
        return images


def decode_jpegs(jpegs: list[Tensor], device: torch.device) -> list[Tensor]:
    """One batched decode on `device` (nvJPEG on CUDA). Should the decoder reject the batch, each image is
    decoded on its own, and what it still rejects (JPEG features nvJPEG lacks) with libjpeg on the CPU."""
    try:
        return list(decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=device))
    except RuntimeError as error:
        images = []
        for data in jpegs:
            try:
                images.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                images.append(decode_jpeg(data, mode=ImageReadMode.RGB).to(device))
        log.warning("The %s JPEG decoder rejected a batch (%s); decoded it image by image", device, error)
        return images


def resize_boxes(images: Tensor, boxes: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize of each (index, x0, y0, x1, y1) box to `size` (height, width); shrinking averages
    ceil(box/size)^2 samples per output pixel, so it antialiases like PIL's resize. A box of exactly `size` pixels is
    copied unchanged."""
    return roi_align(images.float(), boxes, tuple(size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)


def color_jitter(images: Tensor, brightness: Tensor, contrast: Tensor, saturation: Tensor) -> Tensor:
    """torchvision's ColorJitter with per-image factors, batched: brightness, then contrast, then saturation."""
    weights = images.new_tensor(GRAY_WEIGHTS).view(1, 3, 1, 1)
    images = (images * brightness.view(-1, 1, 1, 1)).clamp(0, 255)
    mean = (images * weights).sum(1, keepdim=True).mean((-2, -1), keepdim=True)
    factor = contrast.view(-1, 1, 1, 1)
    images = (factor * images + (1 - factor) * mean).clamp(0, 255)
    gray = (images * weights).sum(1, keepdim=True)
    factor = saturation.view(-1, 1, 1, 1)
    return (factor * images + (1 - factor) * gray).clamp(0, 255)


def collate_crops(samples: list[tuple[Tensor, Tensor, int, int]]) -> CropBatch:
    """(pixels or JPEG bytes, plan, target, row) samples into a CropBatch; pixels are 3-D, JPEG bytes 1-D."""
    pixels = [sample for sample in samples if sample[0].dim() == 3]
    jpegs = [sample for sample in samples if sample[0].dim() == 1]
    height = max((crop.shape[1] for crop, *_ in pixels), default=0)
    width = max((crop.shape[2] for crop, *_ in pixels), default=0)
    canvas = torch.empty(len(pixels), 3, height, width, dtype=torch.uint8)
    for slot, (crop, *_) in zip(canvas, pixels, strict=True):
        _, crop_h, crop_w = crop.shape
        slot[:, :crop_h, :crop_w] = crop
        slot[:, :crop_h, crop_w:] = crop[:, :, -1:]  # edge padding: resampling at the border sees the crop's edge,
        slot[:, crop_h:, :] = slot[:, crop_h - 1 : crop_h, :]  # as PIL's does, not the neighbouring padding
    ordered = pixels + jpegs
    return CropBatch(
        canvas=canvas,
        jpegs=[data for data, *_ in jpegs],
        plans=torch.stack([plan for _, plan, _, _ in ordered]),
        targets=torch.stack([torch.as_tensor(target) for _, _, target, _ in ordered]),
        rows=torch.tensor([row for *_, row in ordered]),
    )
