"""The bundled digits with problems planted, to see what `classifier check-data` finds (README, Check your data).

    python examples/planted_digits.py my_digits      # writes my_digits/ and my_digits.planted.csv

Planted: exact copies (some land in another split: leakage), the same scan enlarged 4x and saved as a JPEG (a
near copy), scans copied under a second class (label conflicts), and scans moved to a wrong class folder (flipped
labels, which only out-of-fold predictions reveal). The planted.csv lists each with its kind and original.
"""

from __future__ import annotations

import argparse
import csv
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from classifier.data.digits import write_digits

PLANTED = {"exact": 6, "enlarged": 6, "conflict": 3, "flipped": 8}


def plant(root: Path, seed: int = 0) -> list[dict[str, str]]:
    """Write the digits into `root` and plant PLANTED problems; one row per planted file."""
    write_digits(root)
    rng = np.random.default_rng(seed)
    scans = sorted(root.rglob("*.png"))
    chosen = iter(rng.choice(len(scans), size=sum(PLANTED.values()), replace=False))
    rows = []
    for kind, count in PLANTED.items():
        for _ in range(count):
            original = scans[next(chosen)]
            digit = original.parent.name
            other = str((int(digit) + int(rng.integers(1, 10))) % 10)
            if kind == "exact":
                planted = original.with_name(f"{original.stem}_copy.png")
                shutil.copy(original, planted)
            elif kind == "enlarged":
                planted = original.with_name(f"{original.stem}_x4.jpg")
                Image.open(original).resize((32, 32), Image.Resampling.NEAREST).save(planted, quality=85)
            elif kind == "conflict":
                planted = root / other / f"{original.stem}_also_{digit}.png"
                shutil.copy(original, planted)
            else:
                planted = root / other / original.name
                original.rename(planted)
            rows.append({"path": str(planted), "kind": kind, "original": str(original), "true_label": digit})
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rows = plant(args.root, args.seed)
    with open(args.root.with_name(f"{args.root.name}.planted.csv"), "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
