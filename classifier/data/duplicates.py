"""Exact and near duplicates among checked images: groups of equal bytes or pixels, and near copies found by a
multi-index on perceptual-hash bands (never all pairs), each verified on the two images, aligned."""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from itertools import combinations
from pathlib import Path

import numpy as np

from classifier.core.imageio import load_rgb
from classifier.data.file_facts import HASHED_SIDE, THUMB_SIDE, WINDOWS, FileFacts, area_rows, hashed_copy, window_rows
from classifier.data.file_lists import listing
from classifier.data.splits import Splits, partitions

log = logging.getLogger(__name__)

BANDS = 4  # 16-bit substrings of the 64-bit hash, indexed apart
MAX_THRESHOLD = 16  # beyond it the probes per band explode, and most pairs are not copies anyway
PROBED_HITS = 4_000_000  # table hits compared at a time
PREFILTERED = 8192  # candidate pairs whose thumbnails are compared at a time
PREFILTER_RMS = 16.0  # candidates whose 8x8 thumbnails differ more (RMS on 0-255, best crop window) are dropped
COARSE_SIDE, NEAR_L4 = 8, 7.5  # a near copy aligned at 8x8 differs by at most this L4 mean (0-255) ...
FINE_SIDE, NEAR_RMS = 32, 12.0  # ... and at 32x32 (or less: the smaller image's side) by at most this RMS
STEP = 0.01  # the alignment's resolution, as a share of the side
MAX_CUT = 0.15  # the most the alignment cuts off one side of either image
START_CUTS = (0, 4, 8, 12)  # the grid of cuts (in STEPs) the alignment starts from
MOVES = np.array([  # the steps the alignment tries on the cuts (left, top, right, bottom): one side, a shift, a zoom
    (1, 0, 0, 0), (0, 0, 1, 0), (1, 0, -1, 0), (1, 0, 1, 0), (0, 1, 0, 0), (0, 0, 0, 1), (0, 1, 0, -1), (0, 1, 0, 1),
])  # fmt: skip
MOVES = np.concatenate([MOVES, -MOVES])


@dataclass(frozen=True)
class Pair:
    """Two images that are copies: `match` is `bytes`, `pixels` (same decoded image, other file) or `near`."""

    first: int
    second: int
    match: str
    distance: int  # Hamming distance of the perceptual hashes, of a crop's for a cropped copy (0 for exact copies)
    rms: float  # RMS difference at FINE_SIDE once aligned (0 for exact copies)


def exact_pairs(facts: list[FileFacts]) -> list[Pair]:
    """Each readable image paired with the first of its group of equal bytes, else of equal pixels: n - 1 pairs per
    group of n, not n² / 2."""
    readable = [i for i, item in enumerate(facts) if item.reason is None]
    by_bytes: dict[str, list[int]] = defaultdict(list)
    for i in readable:
        by_bytes[facts[i].file_hash].append(i)
    by_pixels: dict[str, list[int]] = defaultdict(list)
    for members in by_bytes.values():  # one file per content: copies of the same bytes are paired already
        by_pixels[facts[members[0]].pixel_hash].append(members[0])
    return [
        Pair(members[0], other, match, 0, 0.0)
        for groups, match in ((by_bytes, "bytes"), (by_pixels, "pixels"))
        for members in groups.values()
        if len(members) > 1
        for other in members[1:]
    ]


def cross_split_copies(splits: Splits, checked: dict[Path, FileFacts]) -> dict[str, int]:
    """How many images are exact copies of one in another part of the data, by kind: what `fit` can tell from the
    verification cache for free (near copies take `check-data`)."""
    parts = partitions(splits)
    facts = [checked[splits.root / path] for path in splits.paths]
    counted = Counter(pair.match for pair in exact_pairs(facts) if parts[pair.first] != parts[pair.second])
    named = {"bytes": "byte-for-byte copies", "pixels": "pixel-for-pixel copies (other bytes)"}
    return {named[match]: count for match, count in counted.items()}


def within_distance(queries: np.ndarray, codes: np.ndarray, threshold: int) -> np.ndarray:
    """Index pairs (query, code) of the 64-bit `queries` and `codes` at Hamming distance <= `threshold`.

    Multi-index hashing (Norouzi et al.): split each code into BANDS 16-bit bands, with radii that add up, each plus
    one, to more than the threshold (2, 2, 2, 1 for 10): two codes within it are within the radius on some band. So
    each band's table is probed with every value that close to the query's, and only those candidates are compared
    in full. A pair is kept in the first band that finds it, and the table hits are expanded PROBED_HITS at a time,
    so memory stays bounded where hashes crowd together.
    """
    queries, codes = queries.view(np.uint64), codes.view(np.uint64)
    least, extra = divmod(threshold + 1, BANDS)
    radii = [least - 1 + (band < extra) for band in range(BANDS)]  # -1: a band that is never probed
    masks = [np.uint64(0xFFFF << (16 * band)) for band in range(BANDS)]
    found = [np.empty(0, dtype=np.int64)]
    for band, radius in enumerate(radii):
        if radius < 0 or not len(queries):
            continue
        flips = [sum(1 << bit for bit in bits) for r in range(radius + 1) for bits in combinations(range(16), r)]
        values, asked = (((array & masks[band]) >> np.uint64(16 * band)).astype(np.int64) for array in (codes, queries))
        order = np.argsort(values, kind="stable")
        counts = np.bincount(values, minlength=1 << 16)
        starts = np.cumsum(counts) - counts  # where each band value's run begins in `order`
        probes = (asked[:, None] ^ np.array(flips)[None, :]).ravel()
        low, hits = starts[probes], counts[probes]
        ends = np.cumsum(hits)
        cuts = np.unique(np.r_[0, np.searchsorted(ends, np.arange(PROBED_HITS, ends[-1], PROBED_HITS)), len(probes)])
        for start, stop in zip(cuts[:-1], cuts[1:], strict=True):
            some = hits[start:stop]
            probe = np.repeat(np.arange(start, stop), some)  # the probe of each table hit
            matched = order[(low[start:stop] - np.cumsum(some) + some)[probe - start] + np.arange(len(probe))]
            asker = probe // len(flips)
            differing = queries[asker] ^ codes[matched]
            keep = np.bitwise_count(differing) <= threshold
            for mask, earlier in zip(masks[:band], radii[:band], strict=True):  # found there already
                keep &= np.bitwise_count(differing & mask) > earlier
            found.append(asker[keep] * len(codes) + matched[keep])
    pairs = np.concatenate(found)
    return np.stack([pairs // len(codes), pairs % len(codes)], axis=1)


def candidates(facts: list[FileFacts], kept: np.ndarray, threshold: int) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (a < b, positions in `kept`) where one image's whole pHash is within `threshold` of the other's whole
    pHash or of the pHash of one of its crops, and that smallest distance."""
    whole = np.array([facts[i].phash for i in kept], dtype=np.int64)
    crops = np.frombuffer(b"".join(facts[i].crop_hashes for i in kept), np.int64).reshape(len(kept), -1)
    codes = np.concatenate([whole[:, None], crops], axis=1)
    hits = within_distance(whole, codes.ravel(), threshold)
    first, second = hits[:, 0], hits[:, 1] // codes.shape[1]
    distances = np.bitwise_count(whole.view(np.uint64)[first] ^ codes.ravel().view(np.uint64)[hits[:, 1]])
    other = first != second
    keys = np.minimum(first, second)[other] * len(kept) + np.maximum(first, second)[other]
    order = np.lexsort((distances[other], keys))  # by pair, the smallest distance first
    keys, distances = keys[order], distances[other][order]
    unique = np.r_[True, keys[1:] != keys[:-1]]
    keys = keys[unique]
    return np.stack([keys // len(kept), keys % len(kept)], axis=1), distances[unique].astype(np.int64)


def window_thumbs(thumbs: np.ndarray) -> np.ndarray:
    """(images, windows, 64): each image's thumbnail averaged onto 8x8 over the whole and over each crop window."""
    rows = [window_rows(WINDOWS, axis, THUMB_SIDE, 8).astype(np.float32) for axis in (0, 1)]
    return np.einsum("wyi,nij,wxj->nwyx", rows[1], thumbs, rows[0], optimize=True).reshape(len(thumbs), -1, 64)


def prefiltered(facts: list[FileFacts], kept: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Which candidate pairs have 8x8 thumbnails, one whole and the other over its best crop window, within
    PREFILTER_RMS: a cheap bound that drops most look-alikes before any image is decoded."""
    used = np.unique(pairs)
    thumbs = np.frombuffer(b"".join(facts[kept[i]].thumb for i in used), np.uint8)
    windows = window_thumbs(thumbs.reshape(len(used), THUMB_SIDE, THUMB_SIDE).astype(np.float32))
    norms = (windows**2).sum(axis=2)
    first, second = np.searchsorted(used, pairs[:, 0]), np.searchsorted(used, pairs[:, 1])
    keep = np.zeros(len(pairs), dtype=bool)
    for start in range(0, len(pairs), PREFILTERED):  # |x - y|² = |x|² + |y|² - 2 x.y, PREFILTERED pairs at a time
        a, b = first[start : start + PREFILTERED], second[start : start + PREFILTERED]
        squares = np.minimum(
            norms[a, :1] + norms[b] - 2 * (windows[b] @ windows[a, 0, :, None])[..., 0],
            norms[b, :1] + norms[a] - 2 * (windows[a] @ windows[b, 0, :, None])[..., 0],
        )
        keep[start : start + PREFILTERED] = squares.min(axis=1) <= 64 * PREFILTER_RMS**2
    return keep


def near_pairs(facts: list[FileFacts], paths: Sequence[str | Path], threshold: int, exact: list[Pair]) -> list[Pair]:
    """Near copies among the readable images that are not exact copies of an earlier one: pHash candidates (of the
    whole images and of their crops), prefiltered on thumbnails, then verified on the images themselves, aligned
    (perceptual hashes alone pair look-alike images, such as two hand-written 1s)."""
    copies = {pair.second for pair in exact}
    kept = np.array([i for i, item in enumerate(facts) if item.reason is None and i not in copies], dtype=np.int64)
    if len(kept) < 2:
        return []
    pairs, distances = candidates(facts, kept, threshold)
    if not len(pairs):
        return []
    kept_pairs = prefiltered(facts, kept, pairs)
    checked, distances = pairs[kept_pairs].tolist(), distances[kept_pairs].tolist()
    last_use = {image: k for k, pair in enumerate(checked) for image in pair}
    checks = Checks([Path(paths[i]) for i in kept], [facts[i] for i in kept])
    found = []
    for k, ((a, b), distance) in enumerate(zip(checked, distances, strict=True)):
        l4, rms = checks.difference(a, b)
        if l4 <= NEAR_L4 and rms <= NEAR_RMS:
            found.append(Pair(int(kept[a]), int(kept[b]), "near", distance, round(rms, 2)))
        checks.forget(image for image in (a, b) if last_use[image] == k)  # bounded memory on crowded candidates
    return found


@lru_cache(maxsize=FINE_SIDE)
def cut_rows(side: int) -> np.ndarray:
    """(cuts, cuts, side, HASHED_SIDE): the averaging onto `side` cells of a line cut by i STEPs at its start and
    j STEPs at its end, for every i and j up to MAX_CUT."""
    cuts = np.arange(round(MAX_CUT / STEP) + 1) * STEP * HASHED_SIDE
    starts, ends = np.repeat(cuts, len(cuts)), HASHED_SIDE - np.tile(cuts, len(cuts))
    rows = area_rows(HASHED_SIDE, starts, ends, side).astype(np.float32)
    return rows.reshape(len(cuts), len(cuts), side, HASHED_SIDE)


def aligned(
    image: np.ndarray, whole: np.ndarray, side: int, box: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The difference between `whole` (side x side) and the crop of `image` (HASHED_SIDE²) averaged onto side x side
    that is closest to it in least squares, and that crop's cuts (left, top, right, bottom, in STEPs): from the best
    of a grid of cuts, the cuts take the best of the MOVES by 2 STEPs, then by 1, while one helps; from `box` (found
    at a smaller side), by 1."""
    rows = cut_rows(side)
    steps = (1,)
    if box is None:
        grid = np.array(START_CUTS)
        crossed = rows[grid[:, None], grid[None, :]].reshape(-1, side, HASHED_SIDE)  # every (start, end) pair
        views = crossed[:, None] @ (image @ crossed.transpose(0, 2, 1))[None]  # (y cuts, x cuts, side, side)
        y, x = np.unravel_index(((views - whole) ** 2).mean(axis=(2, 3)).argmin(), views.shape[:2])
        box, steps = (
            np.array([grid[x // len(grid)], grid[y // len(grid)], grid[x % len(grid)], grid[y % len(grid)]]),
            (2, 1),
        )
    best = rows[box[1], box[3]] @ image @ rows[box[0], box[2]].T - whole
    error = (best**2).mean()
    for step in steps:
        while True:
            trials = box + step * MOVES
            trials = trials[((trials >= 0) & (trials < len(rows))).all(axis=1)]
            views = rows[trials[:, 1], trials[:, 3]] @ image @ rows[trials[:, 0], trials[:, 2]].transpose(0, 2, 1)
            errors = ((views - whole) ** 2).mean(axis=(1, 2))
            if errors.min() >= error:
                break
            box, best, error = trials[errors.argmin()], views[errors.argmin()] - whole, errors.min()
    return best, box


def whole(image: np.ndarray, side: int) -> np.ndarray:
    rows = cut_rows(side)[0, 0]
    return rows @ image @ rows.T


class Checks:
    """The candidates' images, decoded once (small: JPEGs at a reduced DCT scale) as HASHED_SIDE² grey copies, and
    compared aligned: either image cropped by up to MAX_CUT a side, so that a copy cropped by a few pixels, or
    shrunk to a few dozen, still matches its original."""

    def __init__(self, paths: list[Path], facts: list[FileFacts]) -> None:
        self.paths = paths
        self.sides = [min(item.width, item.height) for item in facts]
        self.copies: dict[int, np.ndarray] = {}

    def copy(self, index: int) -> np.ndarray | None:
        """The grey copy, or None when the file no longer decodes (it changed since it was checked)."""
        if index not in self.copies:
            try:
                grey = load_rgb(self.paths[index], min_size=HASHED_SIDE).convert("L")
            except OSError:
                grey = None
            self.copies[index] = None if grey is None else hashed_copy(grey).astype(np.float32)
        return self.copies[index]

    def forget(self, indices: Iterable[int]) -> None:
        for index in indices:
            self.copies.pop(index, None)

    def difference(self, a: int, b: int) -> tuple[float, float]:
        """How much the two images differ (0-255) once one is cropped to match the other best, either way round:
        the L4 mean (fourth root of the mean fourth power) of the pixel differences at COARSE_SIDE, which weighs a
        stroke that differs over the noise of recompression (spread thin), and the RMS at FINE_SIDE, which sees the
        details that tell look-alike photos apart; each side at most the smaller image's. The crop is found at
        COARSE_SIDE, then refined; the RMS is inf when no crop comes within NEAR_L4."""
        images, side = (self.copy(a), self.copy(b)), min(self.sides[a], self.sides[b])
        if images[0] is None or images[1] is None:
            return np.inf, np.inf
        coarse, fine = min(COARSE_SIDE, side), min(FINE_SIDE, side)
        found = []
        for image, other in (images, images[::-1]):
            rough, box = aligned(image, whole(other, coarse), coarse)
            l4 = float((rough**4).mean() ** 0.25)
            if l4 <= NEAR_L4:
                close = rough if fine == coarse else aligned(image, whole(other, fine), fine, box)[0]
                found.append((l4, float(np.sqrt((close**2).mean()))))
            else:
                found.append((l4, np.inf))
        return min(found, key=lambda measured: (measured[1], measured[0]))


def warn_before_fit(splits: Splits, checked: dict[Path, FileFacts], trained: set[Path]) -> None:
    """One line per kind: exact copies across splits, and the test split's bad files, which `test` stops on."""
    for match, count in cross_split_copies(splits, checked).items():
        log.warning(
            "%d images are %s of an image in another split (leakage: scores are inflated). `classifier "
            "check-data` lists them, and finds near copies too.", count, match
        )  # fmt: skip
    bad = {path: facts.reason for path, facts in checked.items() if facts.reason and path not in trained}
    if bad:
        log.warning("%d test images cannot be read; `classifier test` will stop on them:\n%s", len(bad), listing(bad))
