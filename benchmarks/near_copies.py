"""Near copies of small images: the bundled digits, each copied one way, through the audit's pipeline (pHash
candidates, thumbnail prefilter, aligned check) and through the pipeline before it (whole-image pHash, 16x16
thumbnails within RMS 8), printed side by side.

    python -m benchmarks.near_copies                  # all 1,797 digits, every kind: about a minute on 2 cores
    python -m benchmarks.near_copies --digits 300     # a smoke run
    python -m benchmarks.near_copies --out near_copies.json

For each kind, one folder holds the originals and one copy of each: the 36 px renderings (the 8x8 scan enlarged
with bicubic, as a scanner or a thumbnailer would), or for the kinds named "8 px", the scans as the bundled data
writes them. Reported per kind: the share of copies paired with their original, the pairs of two different
digits reported (the target is none), and the seconds the new pipeline took once the files were checked. Then the
cost of hashing the crops, per image: what `fit` pays on a folder it checks for the first time.

The last two kinds are the known limit (docs/check-data.md): JPEG at quality 70 of the 8x8 scan itself, and the
scan enlarged 4x with bicubic then saved at quality 70, change a digit as much as another writer's hand does.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

from classifier.core.imageio import load_rgb
from classifier.data.duplicates import exact_pairs, near_pairs, within_distance
from classifier.data.file_facts import CACHE_ENV, CHECK_SIDE, HASH_SIDE, LOW_DCT, hashes_of, inspect_file, verify_files

THRESHOLD = 10  # check-data's default --near_dup_threshold
OLD_THUMB_RMS = 8.0  # the pipeline before: 16x16 thumbnails within this RMS
RENDER_SIDE = 36

Copier = Callable[[Image.Image], Image.Image]


def resized(share: float) -> Copier:
    return lambda image: image.resize((round(image.width * share),) * 2, Image.Resampling.BICUBIC)


def cut(left: float, top: float, right: float, bottom: float) -> Copier:
    """Cut these shares of the sides off."""

    def crop(image: Image.Image) -> Image.Image:
        width, height = image.size
        box = (round(width * left), round(height * top), width - round(width * right), height - round(height * bottom))
        return image.crop(box)

    return crop


# name -> (the original: 36 px rendering or 8 px scan, how the copy is made, its JPEG quality)
KINDS: dict[str, tuple[int, Copier, int]] = {
    "36 px resized to 80%, JPEG q70": (RENDER_SIDE, resized(0.8), 70),
    "36 px resized to 60%, JPEG q50": (RENDER_SIDE, resized(0.6), 50),
    "36 px recompressed, JPEG q70": (RENDER_SIDE, lambda image: image, 70),
    "36 px recompressed, JPEG q50": (RENDER_SIDE, lambda image: image, 50),
    "36 px cropped 5% a side, q85": (RENDER_SIDE, cut(0.05, 0.05, 0.05, 0.05), 85),
    "36 px cropped 10% off left+top, q85": (RENDER_SIDE, cut(0.1, 0.1, 0, 0), 85),
    "36 px cropped 5% off the left, q85": (RENDER_SIDE, cut(0.05, 0, 0, 0), 85),
    "36 px enlarged to 150%, JPEG q85": (RENDER_SIDE, resized(1.5), 85),
    "8 px enlarged 4x (nearest), q85": (8, lambda image: image.resize((32, 32), Image.Resampling.NEAREST), 85),
    "8 px recompressed, JPEG q70 (limit)": (8, lambda image: image, 70),
    "8 px enlarged 4x (bicubic), q70 (limit)": (8, resized(4), 70),
}


def write_originals(root: Path, count: int) -> dict[int, list[Path]]:
    """The first `count` scans as PNGs, at 8 px as the bundled data writes them and rendered at 36 px."""
    folders = {side: root / f"originals_{side}px" for side in (8, RENDER_SIDE)}
    written: dict[int, list[Path]] = {side: [] for side in folders}
    for folder in folders.values():
        folder.mkdir(parents=True)
    for index, scan in enumerate(load_digits().images[:count]):
        small = Image.fromarray(np.rint(scan * 255 / 16).astype(np.uint8), "L")
        for side, image in ((8, small), (RENDER_SIDE, small.resize((RENDER_SIDE,) * 2, Image.Resampling.BICUBIC))):
            image.save(folders[side] / f"{index:04d}.png")
            written[side].append(folders[side] / f"{index:04d}.png")
    return written


def old_pairs(paths: list[Path]) -> set[tuple[int, int]]:
    """The pipeline before: whole-image pHash (PIL's BOX onto 32x32) within THRESHOLD, verified by 16x16 grey
    thumbnails within RMS 8."""
    codes, thumbs = [], []
    for path in paths:
        grey = load_rgb(path, min_size=CHECK_SIDE).convert("L")
        small = np.asarray(grey.resize((HASH_SIDE, HASH_SIDE), Image.Resampling.BOX), dtype=np.float64)
        low = (LOW_DCT @ small @ LOW_DCT.T).ravel()
        codes.append(int.from_bytes(np.packbits(low > np.median(low)).tobytes(), "big", signed=True))
        thumbs.append(small.reshape(16, 2, 16, 2).mean(axis=(1, 3)).round().ravel())
    codes, thumbs = np.array(codes, dtype=np.int64), np.array(thumbs)
    hits = within_distance(codes, codes, THRESHOLD)
    hits = hits[hits[:, 0] < hits[:, 1]]
    rms = np.sqrt(((thumbs[hits[:, 0]] - thumbs[hits[:, 1]]) ** 2).mean(axis=1))
    return set(map(tuple, hits[rms <= OLD_THUMB_RMS].tolist()))


def measure(kind: str, root: Path, originals: dict[int, list[Path]]) -> dict[str, float]:
    """One kind: its copies written beside the originals, then both pipelines on originals + copies."""
    side, copier, quality = KINDS[kind]
    folder = root / f"copies_{len(os.listdir(root))}"
    folder.mkdir()
    copies = []
    for original in originals[side]:
        copies.append(folder / f"{original.stem}.jpg")
        copier(Image.open(original)).convert("RGB").save(copies[-1], quality=quality)
    paths = originals[side] + copies
    count = len(copies)
    facts = list(verify_files(paths, num_threads=2).values())
    start = time.perf_counter()
    new = {(pair.first, pair.second) for pair in near_pairs(facts, paths, THRESHOLD, exact_pairs(facts))}
    seconds = time.perf_counter() - start
    old = old_pairs(paths)
    return {
        "found": sum((i, count + i) in new for i in range(count)) / count,
        "found_before": sum((i, count + i) in old for i in range(count)) / count,
        "other_digit_pairs": sum(a % count != b % count for a, b in new),
        "other_digit_pairs_before": sum(a % count != b % count for a, b in old),
        "seconds": seconds,
    }


def hashing_cost(paths: list[Path]) -> dict[str, float]:
    """Milliseconds per image: the whole first check of a file (`inspect_file`), the hashes it makes now (whole and
    crops, one resize), and the single whole-image hash it made before, on the same grey images."""
    greys = [load_rgb(path, min_size=CHECK_SIDE).convert("L") for path in paths]

    def single(grey: Image.Image) -> None:
        small = np.asarray(grey.resize((HASH_SIDE, HASH_SIDE), Image.Resampling.BOX), dtype=np.float64)
        np.median(LOW_DCT @ small @ LOW_DCT.T)

    timings = {}
    for name, run, items in (("check_ms", inspect_file, paths), ("hashes_ms", hashes_of, greys),
                             ("hash_before_ms", single, greys)):  # fmt: skip
        start = time.perf_counter()
        for item in items:
            run(item)
        timings[name] = 1000 * (time.perf_counter() - start) / len(items)
    return timings


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--digits", type=int, default=1797, help="how many of the bundled digits (default all)")
    parser.add_argument("--out", type=Path, help="write the figures as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    figures: dict = {"digits": args.digits, "kinds": {}}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.environ[CACHE_ENV] = str(root / "cache")
        originals = write_originals(root / "data", args.digits)
        print(f"{'copy kind':40} {'found':>6} {'before':>7} {'other-digit pairs':>18} {'before':>7} {'s':>6}")
        for kind in KINDS:
            row = figures["kinds"][kind] = measure(kind, root / "data", originals)
            print(f"{kind:40} {row['found']:6.3f} {row['found_before']:7.3f} {row['other_digit_pairs']:18d} "
                  f"{row['other_digit_pairs_before']:7d} {row['seconds']:6.1f}")  # fmt: skip
        figures |= hashing_cost(originals[RENDER_SIDE])
    print(f"per 36 px image: first check {figures['check_ms']:.3f} ms, of which the hashes {figures['hashes_ms']:.3f} "
          f"ms (one whole-image hash took {figures['hash_before_ms']:.3f} ms)")  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps(figures, indent=2) + "\n")
    return figures


if __name__ == "__main__":
    main()
