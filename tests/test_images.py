"""Every image mode a real folder holds comes out as correct, upright RGB."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from classifier.data.images import load_rgb
from tests.helpers import save_image


def pixel(path: Path, xy: tuple[int, int] = (0, 0)) -> tuple[int, int, int]:
    image = load_rgb(path)
    assert image.mode == "RGB"
    return image.getpixel(xy)


def test_grayscale(tmp_path: Path) -> None:
    assert pixel(save_image(tmp_path / "l.png", Image.new("L", (4, 4), 77))) == (77, 77, 77)


def test_sixteen_bit_png_is_scaled_not_saturated(tmp_path: Path) -> None:
    array = np.full((4, 4), 32896, dtype=np.uint16)  # mid-grey in 16 bits
    path = save_image(tmp_path / "i16.png", Image.fromarray(array))
    with Image.open(path) as raw:
        assert raw.mode.startswith("I")
    assert pixel(path) == (128, 128, 128)


def test_transparency_is_composited_on_white(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red
    rgba.putpixel((1, 1), (0, 0, 255, 255))
    path = save_image(tmp_path / "rgba.png", rgba)
    assert pixel(path) == (255, 255, 255) and pixel(path, (1, 1)) == (0, 0, 255)
    la = Image.new("LA", (4, 4), (0, 128))  # black at half opacity over white
    assert pixel(save_image(tmp_path / "la.png", la)) == pytest.approx((127, 127, 127), abs=1)


def test_palette_with_transparency(tmp_path: Path) -> None:
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 255, 0, 200, 0, 0] + [0] * 762)
    palette.info["transparency"] = 1
    palette.putpixel((2, 2), 0)
    path = save_image(tmp_path / "p.png", palette, transparency=1)
    assert pixel(path) == (255, 255, 255) and pixel(path, (2, 2)) == (0, 255, 0)


def test_cmyk_jpeg(tmp_path: Path) -> None:
    path = save_image(tmp_path / "cmyk.jpg", Image.new("RGB", (16, 16), (200, 30, 30)).convert("CMYK"), quality=100)
    with Image.open(path) as raw:
        assert raw.mode == "CMYK"
    assert pixel(path, (8, 8)) == pytest.approx((200, 30, 30), abs=6)


def test_one_bit_and_bmp(tmp_path: Path) -> None:
    bilevel = Image.new("1", (4, 4), 1)
    bilevel.putpixel((0, 0), 0)
    path = save_image(tmp_path / "one.png", bilevel)
    assert pixel(path) == (0, 0, 0) and pixel(path, (1, 1)) == (255, 255, 255)
    assert pixel(save_image(tmp_path / "x.bmp", Image.new("RGB", (4, 4), (1, 2, 3)))) == (1, 2, 3)


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    # stored sideways: 20 wide, 10 tall, red on the left; orientation 6 says "rotate 90 degrees clockwise to view"
    stored = Image.new("RGB", (20, 10), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = save_image(tmp_path / "rotated.jpg", stored, exif=exif.tobytes(), quality=100)
    upright = load_rgb(path)
    assert upright.size == (10, 20)  # portrait once upright
    top, bottom = upright.getpixel((5, 2)), upright.getpixel((5, 17))
    assert top[0] > 200 and top[2] < 50  # the red half ends up on top
    assert bottom[2] > 200 and bottom[0] < 50
