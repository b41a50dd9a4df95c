"""`classifier demo-data digits|photos|scenes DIR`: data to try the framework on, made offline: scikit-learn's real
handwritten digits (the bundled set), a photo-like three-class shapes set of large JPEGs and PNGs, or photo-like
multi-label scenes listed in manifests."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from classifier.data.digits import write_digits
from classifier.data.photos import CLASSES, write_photos
from classifier.data.scenes import LABELS, write_scenes

log = logging.getLogger(__name__)


def demo_data(argv: list[str]) -> Path:
    """Write the set asked for; returns its folder."""
    parser = argparse.ArgumentParser(prog="classifier demo-data", description=__doc__.splitlines()[0])
    sets = parser.add_subparsers(dest="set", required=True, metavar="{digits,photos,scenes}")
    digits = sets.add_parser("digits", help="the 1,797 8x8 digits of scikit-learn, one PNG each (data/digits)")
    digits.add_argument("root", type=Path, nargs="?", default=Path("data/digits"), help="folder to write into")
    photos = sets.add_parser("photos", help="disc, square and stripes photos, 300-640 px, JPEG and PNG")
    photos.add_argument("root", type=Path, help="folder to write <class>/ subfolders into")
    photos.add_argument("--per_class", "--per-class", type=int, default=80, help="images per class (default 80)")
    photos.add_argument("--seed", type=int, default=0, help="the same seed writes the same files (default 0)")
    scenes = sets.add_parser("scenes", help="multi-label scenes of discs, rings, squares and stripes, in manifests")
    scenes.add_argument("root", type=Path, nargs="?", default=Path("data/scenes"), help="folder to write into")
    scenes.add_argument("--count", type=int, default=300, help="scenes (default 300)")
    scenes.add_argument("--seed", type=int, default=0, help="the same seed writes the same files (default 0)")
    args = parser.parse_args(argv)
    if args.set == "digits":
        write_digits(args.root)
        log.info("Wrote the 1,797 digits into %s", args.root)
    elif args.set == "photos":
        write_photos(args.root, args.per_class, args.seed, sizes=(300, 640))
        log.info("Wrote %d images of %s into %s", args.per_class * len(CLASSES), ", ".join(CLASSES), args.root)
    else:
        write_scenes(args.root, args.count, args.seed)
        log.info("Wrote %d scenes of %s, and labels.csv and labels_onehot.csv, into %s", args.count,
                 ", ".join(LABELS), args.root)  # fmt: skip
    return args.root
