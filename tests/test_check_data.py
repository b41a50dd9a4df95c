"""`classifier check-data`: every kind of finding planted in a real folder, the strict gate, the read-only promise,
no false alarms on the distinct bundled digits, and the verification cache that `fit` shares."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from classifier.cli.entry import cli_main
from classifier.data.datamodule import ImageFolderDataModule
from classifier.data.file_facts import BESIDE_DATA, CACHE_ENV, CACHE_FILE, verify_files
from classifier.data.photos import CLASSES
from examples.planted_digits import plant as plant_digits
from tests.helpers import REPO, classifier_here, read_csv, tiny_config, write_photos

GATING = {"unreadable", "leakage", "label_conflict"}


def plant(root: Path) -> dict[tuple[str, str], str]:
    """train/ and test/ of distinct photo-like images, plus one file per problem; (relative path, kind) -> related."""
    write_photos(root / "train", per_class=8, sizes=(90, 150))
    write_photos(root / "test", per_class=3, seed=1, sizes=(90, 150))
    train, test = root / "train", root / "test"
    (train / "disc" / "truncated.jpg").write_bytes((train / "disc" / "disc_001.jpg").read_bytes()[:900])
    (train / "square" / "empty.png").write_bytes(b"")
    (train / "stripes" / "notes.jpg").write_text("not an image\n")
    shutil.copy(train / "disc" / "disc_000.png", train / "disc" / "really_png.jpg")  # also a copy of disc_000
    other = write_photos(root.parent / "other", per_class=1, seed=7) / "disc" / "disc_000.png"  # unlike any other
    Image.open(other).convert("CMYK").save(train / "square" / "cmyk.jpg", quality=95)
    deep = (np.arange(100 * 120, dtype=np.uint32).reshape(100, 120) * 5 % 65536).astype(np.uint16)
    Image.fromarray(deep).save(train / "stripes" / "sixteen.png")
    Image.new("RGB", (600, 90), (20, 120, 40)).save(train / "stripes" / "banner.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (10, 10, 3), dtype=np.uint8)).save(
        train / "disc" / "speck.png"
    )
    ramp = np.broadcast_to(np.linspace(0, 255, 2100, dtype=np.uint8), (2000, 2100))
    Image.fromarray(np.ascontiguousarray(ramp)).save(train / "square" / "poster.png")
    shutil.copy(train / "disc" / "disc_004.jpg", test / "disc" / "exact_copy.jpg")
    original = Image.open(train / "square" / "square_004.jpg")
    smaller = original.resize((round(original.width * 0.8), round(original.height * 0.8)), Image.Resampling.BICUBIC)
    smaller.save(test / "square" / "resized.jpg", quality=70)
    shutil.copy(train / "disc" / "disc_005.jpg", train / "stripes" / "mislabelled.jpg")
    Image.open(train / "square" / "square_003.png").save(test / "square" / "same_pixels.png", compress_level=1)
    sideways = [f"{split}/{label}/{label}_{i:03d}.{'png' if i % 3 == 0 else 'jpg'}" for label in CLASSES
                for split, count in (("train", 8), ("test", 3)) for i in range(2, count, 4)]  # fmt: skip
    return {(path, "exif_rotated"): "" for path in sideways} | {
        ("train/disc/truncated.jpg", "unreadable"): "",
        ("train/square/empty.png", "unreadable"): "",
        ("train/stripes/notes.jpg", "unreadable"): "",
        ("train/disc/really_png.jpg", "format_mismatch"): "",
        ("train/disc/really_png.jpg", "duplicate"): "train/disc/disc_000.png",
        ("train/square/cmyk.jpg", "unusual_mode"): "",
        ("train/stripes/sixteen.png", "unusual_mode"): "",
        ("train/stripes/banner.png", "extreme_aspect"): "",
        ("train/disc/speck.png", "tiny_image"): "",
        ("train/square/poster.png", "huge_image"): "",
        ("test/disc/exact_copy.jpg", "leakage"): "train/disc/disc_004.jpg",
        ("test/square/resized.jpg", "leakage"): "train/square/square_004.jpg",
        ("train/stripes/mislabelled.jpg", "label_conflict"): "train/disc/disc_005.jpg",
        ("test/square/same_pixels.png", "leakage"): "train/square/square_003.png",
    }


def relative(path: str, root: Path) -> str:
    return Path(path).relative_to(root).as_posix() if path else ""


def tree_digest(root: Path) -> dict[str, tuple[str, int, int]]:
    """Every file under `root`: its hash, mode and mtime."""
    return {
        path.relative_to(root).as_posix(): (
            hashlib.sha256(path.read_bytes()).hexdigest(),
            path.stat().st_mode,
            path.stat().st_mtime_ns,
        )
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def check_data(*args: str) -> subprocess.CompletedProcess:
    return classifier_here("check-data", *args)


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, dict]:
    """The planted folder, what was planted, and the digest of every file before any audit."""
    root = tmp_path_factory.mktemp("planted") / "photos"
    expected = plant(root)
    return root, expected, tree_digest(root)


@pytest.fixture(scope="module")
def audited(planted: tuple[Path, dict, dict], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """`classifier check-data --strict` on the planted folder, as a CI job would run it: (report folder, stderr)."""
    root, _, _ = planted
    out = tmp_path_factory.mktemp("report") / "audit"
    done = check_data("--data.data_dir", str(root), "--data.val_fraction", "0", "--strict", "--out", str(out))
    assert done.returncode == 1, done.stderr[-3000:]
    return out, done.stdout + done.stderr


def test_every_planted_problem_is_found_and_nothing_else(planted, audited) -> None:
    root, expected, _ = planted
    out, _ = audited
    rows = read_csv(out / "issues.csv")
    found = {(relative(row["path"], root), row["kind"]): relative(row["related"], root) for row in rows}
    assert found == expected


def test_exact_and_near_copies_are_paired_with_how_they_match(planted, audited) -> None:
    root, _, _ = planted
    out, _ = audited
    pairs = {
        relative(row["path"], root): (relative(row["related"], root), row["match"], row["part"], row["related_part"])
        for row in read_csv(out / "duplicates.csv")
    }
    assert pairs == {
        "test/disc/exact_copy.jpg": ("train/disc/disc_004.jpg", "bytes", "test", "train"),
        "test/square/resized.jpg": ("train/square/square_004.jpg", "near", "test", "train"),
        "train/stripes/mislabelled.jpg": ("train/disc/disc_005.jpg", "bytes", "train", "train"),
        "test/square/same_pixels.png": ("train/square/square_003.png", "pixels", "test", "train"),
        "train/disc/really_png.jpg": ("train/disc/disc_000.png", "bytes", "train", "train"),
    }
    resized = next(row for row in read_csv(out / "duplicates.csv") if row["path"].endswith("resized.jpg"))
    assert 0 < int(resized["distance"]) <= 10 and 0 < float(resized["rms"]) <= 8


def test_strict_ends_with_one_line_that_counts_what_gates(audited) -> None:
    out, output = audited
    (line,) = [line for line in output.splitlines() if line.startswith("error:")]
    assert line == f"error: check-data --strict: 3 unreadable, 3 leakage, 1 label_conflict; see {out / 'issues.csv'}"


def test_the_report_counts_images_classes_modes_and_sizes(planted, audited) -> None:
    root, _, _ = planted
    out, _ = audited
    report = json.loads((out / "data_report.json").read_text())
    images = sorted(path for path in root.rglob("*") if path.is_file())
    assert report["images"] == len(images) == 24 + 10 + 9 + 3 and report["readable"] == len(images) - 3
    assert report["splits"] == {"train": 34, "test": 12}
    assert report["class_counts"]["stripes"] == {"train": 8 + 4, "test": 3}
    assert report["modes"]["CMYK"] == 1 and report["modes"]["I;16"] == 1
    assert report["exif_rotated"] == 3 * 2 + 3 * 1  # write_photos stores i % 4 == 2 sideways
    assert report["findings"]["leakage"] == 3 and report["duplicate_pairs"] == {"bytes": 3, "pixels": 1, "near": 1}
    for figure in ("class_counts.png", "image_sizes.png", "near_duplicates.png"):
        assert Image.open(out / figure).size[0] > 300


def test_check_data_changes_no_file(planted, audited) -> None:
    root, _, before = planted
    assert tree_digest(root) == before


def test_no_false_copies_or_leakage_among_the_distinct_digits(digits_dir: Path, tmp_path: Path) -> None:
    cli_main(["check-data", "--data.data_dir", str(digits_dir), "--out", str(tmp_path), "--strict"])
    assert read_csv(tmp_path / "issues.csv") == [] and read_csv(tmp_path / "duplicates.csv") == []
    report = json.loads((tmp_path / "data_report.json").read_text())
    assert report["images"] == 1797 and report["splits"] == {"train": 1257, "val": 270, "test": 270}


def test_frozen_split_and_folds_are_audited_as_fit_sees_them(small_digits: Path, tmp_path: Path) -> None:
    data = tmp_path / "digits"
    shutil.copytree(small_digits, data)
    rows = []  # path, label, split, fold: the first 2 images of each class in test, the others in folds 0-3
    for label in sorted(os.listdir(data)):
        names = sorted(os.listdir(data / label))
        rows += [[f"{label}/{name}", label, "test", ""] for name in names[:2]]
        rows += [[f"{label}/{name}", label, "train", str(i % 4)] for i, name in enumerate(names[2:])]
    fold_of = {row[0]: row[3] for row in rows}
    planted = {}  # copy -> its original
    copies = [
        ("3", 3, "other_fold.png", "train", "2"),  # fold 1's image in fold 2
        ("5", 3, "same_fold.png", "train", "1"),  # fold 1's image in fold 1
        ("7", 4, "held_out.png", "test", ""),  # fold 2's image in test
        ("8", 3, "validated.png", "train", "0"),  # fold 1's image in fold 0, which validates
    ]
    for label, index, copy, split, fold in copies:
        original = f"{label}/{sorted(os.listdir(data / label))[index]}"
        shutil.copy(data / original, data / label / copy)
        rows.append([f"{label}/{copy}", label, split, fold])
        planted[f"{label}/{copy}"] = original
    assert [fold_of[original] for original in planted.values()] == ["1", "1", "2", "1"]
    table = tmp_path / "folds.csv"
    table.write_text("path,label,split,fold\n" + "".join(",".join(row) + "\n" for row in rows))
    out = tmp_path / "folds"
    cli_main(["check-data", "--data.data_dir", str(data), "--splits", str(table), "--data.num_folds", "4",
              "--out", str(out)])  # fmt: skip
    # fold 0 validates; under k-fold every fold validates once, so a copy in another fold leaks whichever validates
    found = {(relative(row["path"], data), row["kind"], row["detail"], relative(row["related"], data))
             for row in read_csv(out / "issues.csv")}  # fmt: skip
    assert found == {
        ("3/other_fold.png", "leakage", "same bytes in fold 2 as in fold 1", planted["3/other_fold.png"]),
        ("5/same_fold.png", "duplicate", "same bytes in fold 1, class 5", planted["5/same_fold.png"]),
        ("7/held_out.png", "leakage", "same bytes in test as in fold 2", planted["7/held_out.png"]),
        ("8/validated.png", "leakage", "same bytes in fold 0 as in fold 1", planted["8/validated.png"]),
    }
    pairs = read_csv(out / "duplicates.csv")
    parts = {relative(row["path"], data): (row["part"], row["related_part"]) for row in pairs}
    assert parts == {"3/other_fold.png": ("fold 2", "fold 1"), "5/same_fold.png": ("fold 1", "fold 1"),
                     "7/held_out.png": ("test", "fold 2"), "8/validated.png": ("fold 0", "fold 1")}  # fmt: skip
    table = tmp_path / "splits.csv"
    table.write_text("path,label,split\n" + "".join(f"3/{name},3,train\n" for name in os.listdir(data / "3")))
    cli_main(["check-data", "--data.data_dir", str(data), "--splits", str(table), "--out", str(tmp_path / "frozen")])
    report = json.loads((tmp_path / "frozen" / "data_report.json").read_text())
    assert report["images"] == 21 and report["splits"] == {"train": 21}


def test_a_class_too_small_for_the_split_is_reported_not_a_crash(small_digits: Path, tmp_path: Path) -> None:
    data = tmp_path / "digits"
    shutil.copytree(small_digits, data)
    for extra in sorted((data / "7").iterdir())[1:]:
        extra.unlink()
    cli_main(["check-data", "--data.data_dir", str(data), "--out", str(tmp_path / "out")])
    kinds = {(row["path"], row["kind"]) for row in read_csv(tmp_path / "out" / "issues.csv")}
    assert (str(data), "split_error") in kinds and ("7", "small_class") in kinds


def test_bad_options_end_with_one_line_naming_them(tmp_path: Path) -> None:
    missing = check_data("--oof", str(tmp_path / "nope.csv"))
    assert missing.returncode == 2 and error_line(missing) == (
        f"error: --oof {tmp_path / 'nope.csv'} does not exist: give a cv folder's oof_predictions.csv"
    )
    threshold = check_data("--data.data_dir", "data/digits", "--near_dup_threshold", "40", "--out", str(tmp_path))
    assert threshold.returncode == 2
    assert error_line(threshold).startswith("error: --near_dup_threshold 40: a Hamming distance from 0 to 16")
    assert not list(tmp_path.iterdir())  # refused before anything is written


def error_line(done: subprocess.CompletedProcess) -> str:
    (line,) = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    return line


def opened_files(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The files the verification opens from now on (every decode starts with one)."""
    import classifier.data.file_facts as verification

    opened: list[str] = []
    original = verification.open_image

    def counting(source, *args):
        opened.append(source)
        return original(source, *args)

    monkeypatch.setattr(verification, "open_image", counting)
    return opened


def test_a_second_setup_decodes_nothing_and_a_touched_file_only_it(
    small_digits: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    data = tmp_path / "digits"
    shutil.copytree(small_digits, data)
    opened = opened_files(monkeypatch)
    ImageFolderDataModule(data_dir=str(data), num_workers=0).setup("fit")
    assert len(opened) == 200  # fit checks every split, test included
    opened.clear()
    ImageFolderDataModule(data_dir=str(data), num_workers=0).setup("fit")
    assert opened == []
    touched = data / "4" / sorted(os.listdir(data / "4"))[0]
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10**9))
    shutil.copy(data / "5" / sorted(os.listdir(data / "5"))[0], data / "5" / "new.png")
    ImageFolderDataModule(data_dir=str(data), num_workers=0).setup("fit")
    assert len(opened) == 2


def test_a_file_replaced_with_its_mtime_kept_is_checked_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`cp -p` and `rsync -t` keep the mtime of a file they replace: its new size alone tells the cache."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    path = tmp_path / "images" / "a" / "picture.png"
    path.parent.mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(path)
    old = path.read_bytes()
    before = verify_files([path])[path]
    stat = path.stat()
    Image.fromarray(rng.integers(0, 256, (20, 16, 3), dtype=np.uint8)).save(path)  # 16 wide, 20 high
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    new = path.read_bytes()
    assert path.stat().st_mtime_ns == stat.st_mtime_ns and len(new) != len(old)
    after = verify_files([path])[path]
    assert before.file_hash == f"{len(old)}-{hashlib.blake2b(old, digest_size=8).hexdigest()}"
    assert after.file_hash == f"{len(new)}-{hashlib.blake2b(new, digest_size=8).hexdigest()}"
    assert (before.width, before.height, after.width, after.height) == (12, 12, 16, 20)


def test_two_processes_fill_one_cache_at_once(
    digits_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both finish, agree, and leave a cache that a third reader takes everything from."""
    script = (
        "import sys; from pathlib import Path; from classifier.core.imageio import list_images; "
        "from classifier.data.file_facts import verify_files; "
        "facts = verify_files(list_images(Path(sys.argv[1])), num_threads=2); "
        "print(sum(f.reason is None for f in facts.values()), len({f.file_hash for f in facts.values()}))"
    )
    env = {**os.environ, CACHE_ENV: str(tmp_path / "cache")}
    both = [
        subprocess.Popen([sys.executable, "-c", script, str(digits_dir)], env=env, cwd=REPO, stdout=subprocess.PIPE)
        for _ in range(2)
    ]
    assert [process.communicate(timeout=300)[0].split() for process in both] == [[b"1797", b"1797"]] * 2
    assert [process.returncode for process in both] == [0, 0]
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    opened = opened_files(monkeypatch)
    assert len(verify_files(sorted(digits_dir.rglob("*.png")))) == 1797 and opened == []


def test_an_unusable_cache_is_warned_about_and_never_fatal(
    small_digits: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / CACHE_FILE).write_text("not a database")
    paths = sorted(small_digits.rglob("*.png"))
    facts = verify_files(paths)
    assert len(facts) == 200 and all(f.reason is None for f in facts.values())
    assert "cannot be used" in caplog.text and (tmp_path / "cache" / CACHE_FILE).read_text() == ("not a database")
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache" / CACHE_FILE))  # a file, not a folder
    assert len(verify_files(paths, small_digits)) == 200
    assert "is not a writable folder: the images are checked without a cache" in caplog.text
    assert not (small_digits / BESIDE_DATA).exists()  # not beside the data instead


@pytest.mark.slow
def test_fit_warns_once_per_kind_about_cross_split_copies_and_rechecks_nothing(
    small_digits: Path, tmp_path: Path
) -> None:
    data = tmp_path / "digits"
    shutil.copytree(small_digits, data / "train")
    (data / "test" / "0").mkdir(parents=True)
    for name in sorted(os.listdir(data / "train" / "0"))[:2]:
        shutil.copy(data / "train" / "0" / name, data / "test" / "0" / name)
    config = tiny_config(tmp_path, data, trainer={"max_epochs": 1, "limit_train_batches": 1, "limit_val_batches": 1})
    env = {**os.environ, CACHE_ENV: str(tmp_path / "cache")}
    runs = [
        subprocess.run(
            [sys.executable, "-m", "classifier", "fit", "--config", str(config)],
            cwd=REPO,
            capture_output=True,
            text=True,
            env=env,
        )  # fmt: skip
        for _ in range(2)
    ]
    assert [run.returncode for run in runs] == [0, 0], runs[0].stderr[-3000:]
    first, second = (run.stdout + run.stderr for run in runs)
    warned = [line for line in first.splitlines() if "another split" in line]
    assert warned == [
        "2 images are byte-for-byte copies of an image in another split (leakage: scores are inflated). "
        "`classifier check-data` lists them, and finds near copies too."
    ]
    assert "Checked 202 new or changed images (0 unchanged" in first
    assert "Checked" not in second and [line for line in second.splitlines() if "another split" in line] == warned


def test_the_readme_example_finds_every_planted_copy_and_conflict(tmp_path: Path) -> None:
    planted = [row for row in plant_digits(tmp_path / "my_digits") if row["kind"] != "flipped"]
    cli_main(["check-data", "--config", str(REPO / "configs/resnet18.yaml"), "--data.data_dir",
              str(tmp_path / "my_digits"), "--out", str(tmp_path / "audit")])  # fmt: skip
    pairs = {frozenset((row["path"], row["related"])) for row in read_csv(tmp_path / "audit" / "duplicates.csv")}
    assert pairs == {frozenset((row["path"], row["original"])) for row in planted}
    conflicts = {row["path"] for row in read_csv(tmp_path / "audit" / "issues.csv") if row["kind"] == "label_conflict"}
    assert len(conflicts) == sum(row["kind"] == "conflict" for row in planted) == 3


CLOSE_SCANS = {"1": (1585, 1648, 1076, 1134), "7": (1000,)}  # the 1s: the two closest pairs of distinct scans


def small_copies(root: Path) -> dict[str, str]:
    """Bundled digits rendered at 36 px (bicubic, from the 8x8 scan), each with a copy shrunk to 60% and saved as
    JPEG quality 50, and one with 10% cut off its left and top (JPEG quality 85): copy -> original, under `root`."""
    scans = load_digits().images
    planted = {}
    for label, indices in CLOSE_SCANS.items():
        (root / label).mkdir(parents=True)
        for index in indices:
            scan = Image.fromarray(np.rint(scans[index] * 255 / 16).astype(np.uint8), "L")
            original = scan.resize((36, 36), Image.Resampling.BICUBIC)
            original.save(root / label / f"{index}.png")
            original.resize((22, 22), Image.Resampling.BICUBIC).save(root / label / f"{index}_small.jpg", quality=50)
            original.crop((4, 4, 36, 36)).save(root / label / f"{index}_cropped.jpg", quality=85)
            planted |= {f"{label}/{index}_{kind}.jpg": f"{label}/{index}.png" for kind in ("small", "cropped")}
    return planted


def test_shrunk_and_cropped_copies_of_small_digits_are_found_and_nothing_else(tmp_path: Path) -> None:
    root = tmp_path / "digits"
    planted = small_copies(root)
    rows = [f"{path.relative_to(root).as_posix()},{path.parent.name}\n" for path in sorted(root.rglob("*.*"))]
    (root / "labels.csv").write_text("path,label\n" + "".join(rows))
    pairs = set(planted.items()) | {(a, b) for a, b in combinations(planted, 2) if planted[a] == planted[b]}
    for source in (["--data.data_dir", str(root)], ["--data.manifest", str(root / "labels.csv")]):
        out = tmp_path / source[0].rsplit(".", 1)[1]
        done = check_data(*source, "--data.val_fraction", "0", "--data.test_fraction", "0", "--out", str(out))
        assert done.returncode == 0, done.stderr[-3000:]
        found = {
            tuple(sorted(relative(row[key], root) for key in ("path", "related")))
            for row in read_csv(out / "duplicates.csv")
        }
        assert found == {tuple(sorted(pair)) for pair in pairs}
        assert {row["match"] for row in read_csv(out / "duplicates.csv")} == {"near"}
