"""The training crops rendered on the device, against PIL's resampling on images with high-frequency content.

Linear ramps cannot tell resampling filters apart; noise and checkerboards can.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from classifier.data.device_augment import resize_boxes

SIDE = 128


def pictures() -> dict[str, np.ndarray]:
    """Uniform noise and checkerboards of 1- and 3-pixel squares, HWC uint8."""
    y, x = np.mgrid[:SIDE, :SIDE]
    checker = {
        f"checker{n}": np.repeat(((y // n + x // n) % 2 * 255).astype(np.uint8)[..., None], 3, 2) for n in (1, 3)
    }
    return {"noise": np.random.default_rng(0).integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8), **checker}


def rendered(image: np.ndarray, box: tuple[int, int, int, int], size: int) -> np.ndarray:
    batch = torch.from_numpy(image).permute(2, 0, 1)[None]
    return resize_boxes(batch, torch.tensor([[0.0, *box]]), (size, size))[0].permute(1, 2, 0).numpy()


def pil(image: np.ndarray, box: tuple[int, int, int, int], size: int, resample: Image.Resampling) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize((size, size), resample, box=box)).astype(np.float32)


@pytest.mark.parametrize("name", ["noise", "checker1", "checker3"])
@pytest.mark.parametrize(("box", "size"), [((0, 0, 128, 128), 32), ((0, 0, 64, 64), 32), ((32, 16, 96, 80), 16)])
def test_whole_factor_reductions_equal_pils_box_filter(name: str, box: tuple, size: int) -> None:
    image = pictures()[name]
    difference = np.abs(rendered(image, box, size) - pil(image, box, size, Image.Resampling.BOX))
    assert difference.max() <= 1.0  # PIL rounds to uint8; the device keeps floats


@pytest.mark.parametrize(("box", "size"), [((0, 0, 128, 128), 40), ((10, 20, 110, 120), 32), ((0, 0, 100, 100), 32)])
def test_other_reductions_antialias_within_a_stated_tolerance_of_pils_bilinear(box: tuple, size: int) -> None:
    """On noise, the mean difference from PIL's antialiased bilinear reached is 6.5 to 6.8 grey levels (max 35):
    roi_align averages ceil(scale)^2 bilinear samples per pixel, not PIL's triangle filter. Without
    antialiasing it would be about 34."""
    image = pictures()["noise"]
    reference = pil(image, box, size, Image.Resampling.BILINEAR)
    assert np.abs(rendered(image, box, size) - reference).mean() < 8.0
    crop = torch.from_numpy(image).permute(2, 0, 1)[None, :, box[1] : box[3], box[0] : box[2]].float()
    aliased = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False)[0].permute(1, 2, 0)
    assert np.abs(aliased.numpy() - reference).mean() > 20.0  # the tolerance does tell antialiasing apart
