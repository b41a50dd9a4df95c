"""Exact and near duplicates among checked images: groups of equal bytes or pixels, and near copies found by a
multi-index on perceptual-hash bands (never all pairs), each verified on its thumbnails."""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

import numpy as np

from classifier.data.file_facts import THUMB_SIDE, FileFacts
from classifier.data.file_lists import listing
from classifier.data.splits import Splits, partitions

log = logging.getLogger(__name__)

BANDS = 4  # 16-bit substrings of the 64-bit hash: a pair within distance t differs by <= t // 4 bits in one of them
MAX_THRESHOLD = 16  # beyond it the probes per band explode, and most pairs are not copies anyway
THUMB_RMS = 8.0  # the most a verified copy's 16x16 grey thumbnail differs, RMS on 0-255: resized and recompressed
# copies measured <= 4.9, 5%-cropped ones 3.2-14; the closest two distinct bundled digits 10.6


@dataclass(frozen=True)
class Pair:
    """Two images that are copies: `match` is `bytes`, `pixels` (same decoded image, other file) or `near`."""

    first: int
    second: int
    match: str
    distance: int  # Hamming distance of the perceptual hashes (0 for exact copies)
    rms: float  # RMS difference of the thumbnails (0 for exact copies)


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


def within_distance(codes: np.ndarray, threshold: int) -> np.ndarray:
    """Index pairs (i < j) of the 64-bit `codes` at Hamming distance <= `threshold`.

    Multi-index hashing (Norouzi et al.): split each code into BANDS 16-bit bands; two codes within the threshold
    agree within threshold // BANDS bits on at least one band, so each band's sorted table is probed with every
    value that close, and only those candidates are compared in full.
    """
    codes = codes.view(np.uint64)
    radius = threshold // BANDS
    flips = np.array([sum(1 << bit for bit in bits) for r in range(radius + 1) for bits in combinations(range(16), r)])
    queries = np.repeat(np.arange(len(codes)), len(flips))
    found = [np.empty(0, dtype=np.int64)]
    for band in range(BANDS):
        values = ((codes >> np.uint64(16 * band)) & np.uint64(0xFFFF)).astype(np.int64)
        order = np.argsort(values, kind="stable")
        starts = np.searchsorted(values[order], np.arange((1 << 16) + 1))  # where each band value's run begins
        probes = (values[:, None] ^ flips[None, :]).ravel()
        low, hits = starts[probes], starts[probes + 1] - starts[probes]
        offsets = np.arange(hits.sum()) - np.repeat(np.cumsum(hits) - hits, hits)
        matched, asked = order[np.repeat(low, hits) + offsets], np.repeat(queries, hits)
        keep = (asked < matched) & (np.bitwise_count(codes[asked] ^ codes[matched]) <= threshold)
        found.append(asked[keep] * len(codes) + matched[keep])
    pairs = np.unique(np.concatenate(found))  # a pair close on several bands is found once per band
    return np.stack([pairs // len(codes), pairs % len(codes)], axis=1)


def near_pairs(facts: list[FileFacts], threshold: int, exact: list[Pair]) -> list[Pair]:
    """Near copies among the readable images that are not exact copies of an earlier one, verified on their
    thumbnails (perceptual hashes alone pair look-alike images, such as two hand-written 1s)."""
    copies = {pair.second for pair in exact}
    kept = np.array([i for i, item in enumerate(facts) if item.reason is None and i not in copies], dtype=np.int64)
    if len(kept) < 2:
        return []
    codes = np.array([facts[i].phash for i in kept], dtype=np.int64)
    candidates = within_distance(codes, threshold)
    thumbs = np.frombuffer(b"".join(facts[i].thumb for i in kept), np.uint8).reshape(len(kept), THUMB_SIDE**2)
    difference = thumbs[candidates[:, 0]].astype(np.float32) - thumbs[candidates[:, 1]]
    rms = np.sqrt((difference**2).mean(axis=1))
    verified = rms <= THUMB_RMS
    candidates, rms = candidates[verified], rms[verified]
    distances = np.bitwise_count(codes.view(np.uint64)[candidates[:, 0]] ^ codes.view(np.uint64)[candidates[:, 1]])
    return [
        Pair(int(kept[a]), int(kept[b]), "near", int(d), round(float(r), 2))
        for (a, b), d, r in zip(candidates.tolist(), distances.tolist(), rms.tolist(), strict=True)
    ]


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
