"""Datasets listed in a manifest (CSV, TSV, Parquet, JSON Lines) instead of class folders: images under opaque names,
labels only in the file, its split, fold and group columns honoured, and every manifest error one line naming the
row."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pyarrow
import pyarrow.parquet
import pytest
import torch

from classifier import cli_main
from tests.helpers import classifier_here, read_csv, run_dir, tiny_config


@pytest.fixture(scope="module")
def listed(small_digits: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, str]]]:
    """The small digits copied flat under opaque names, and their rows: path, label, a split (every fifth test,
    the next one val), a group (pairs of consecutive scans)."""
    root = tmp_path_factory.mktemp("listed")
    (root / "images").mkdir()
    rows = []
    for index, image in enumerate(sorted(small_digits.rglob("*.png"))):
        name = f"images/{index * 7919 % 100003:06d}.png"
        shutil.copy(image, root / name)
        split = "test" if index % 5 == 0 else "val" if index % 5 == 1 else "train"
        rows.append({"path": name, "label": image.parent.name, "split": split, "group": f"g{index // 2}"})
    return root, rows


def write_csv(path: Path, rows: list[dict[str, str]], delimiter: str = ",") -> Path:
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]), delimiter=delimiter)
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_a_manifest_with_a_split_column_trains_and_tests_on_exactly_that_split(
    listed: tuple[Path, list[dict[str, str]]], tmp_path: Path
) -> None:
    root, rows = listed
    manifest = write_csv(root / "split.csv", [{key: row[key] for key in ("path", "label", "split")} for row in rows])
    config = tiny_config(tmp_path, tmp_path / "unused", trainer={"max_epochs": 1})
    cli_main(["fit", "--config", str(config), "--data.manifest", str(manifest)])
    run = run_dir(tmp_path, 0)
    recorded = [(row["path"], row["label"], row["split"]) for row in read_csv(run / "splits.csv")]
    assert sorted(recorded) == sorted((row["path"], row["label"], row["split"]) for row in rows)

    moved = manifest.rename(tmp_path / "gone.csv")  # the checkpoint holds the split: test needs no manifest
    extra = shutil.copy(root / rows[0]["path"], root / "images" / "not_listed.png")  # the manifest says what is in
    try:
        cli_main(["test", "--ckpt_path", str(run / "checkpoints" / "best.ckpt")])
    finally:
        moved.rename(manifest)
        Path(extra).unlink()
    assert not list(run.rglob("unlisted_images.txt"))
    tested = read_csv(run / "test" / "predictions.csv")
    expected = sorted(str(root / row["path"]) for row in rows if row["split"] == "test")
    assert sorted(row["path"] for row in tested) == expected
    checkpoint = torch.load(run / "checkpoints" / "best.ckpt", weights_only=False, map_location="cpu")
    assert checkpoint["datamodule_hyper_parameters"]["data_dir"] == str(root)


@pytest.mark.parametrize("kind", ["tsv", "jsonl", "parquet"])
def test_every_format_with_absolute_paths_a_root_and_other_columns(
    kind: str, listed: tuple[Path, list[dict[str, str]]], tmp_path: Path
) -> None:
    """Absolute paths stay as they are, relative ones start at --data.manifest_root; without a split column the
    fractions hold out whole groups, stratified by label; the column names are options."""
    root, rows = listed
    table = [
        {"file": str(root / row["path"]) if index % 2 else row["path"], "digit": row["label"], "group": row["group"]}
        for index, row in enumerate(rows)
    ]
    manifest = tmp_path / f"manifest.{kind}"
    if kind == "tsv":
        write_csv(manifest, table, "\t")
    elif kind == "jsonl":
        manifest.write_text("".join(json.dumps(row) + "\n" for row in table))
    else:
        pyarrow.parquet.write_table(pyarrow.Table.from_pylist(table), manifest)
    config = tiny_config(tmp_path, tmp_path / "unused", trainer={"max_epochs": 1, "limit_train_batches": 1})
    options = ["--data.manifest", str(manifest), "--data.manifest_root", str(root)]
    options += ["--data.path_column", "file", "--data.label_column", "digit"]
    cli_main(["fit", "--config", str(config), *options])
    recorded = read_csv(run_dir(tmp_path, 0) / "splits.csv")
    assert sorted(row["path"] for row in recorded) == sorted(row["path"] for row in rows)  # relative to the root
    group_of = {row["path"]: row["group"] for row in rows}
    parts: dict[str, set[str]] = {}
    for row in recorded:
        parts.setdefault(group_of[row["path"]], set()).add(row["split"])
    assert all(len(found) == 1 for found in parts.values())  # no group straddles
    counts = {name: sum(row["split"] == name for row in recorded) for name in ("train", "val", "test")}
    assert 20 <= counts["test"] <= 40 and 20 <= counts["val"] <= 40  # about 15% of 200 each, in whole groups
    assert {row["label"] for row in recorded if row["split"] == "test"} == {str(d) for d in range(10)}


def test_k_fold_on_a_manifest_keeps_groups_within_a_fold(listed: tuple[Path, list[dict[str, str]]]) -> None:
    from classifier.data.manifests import manifest_splits, read_manifest

    root, rows = listed
    manifest = write_csv(root / "groups.csv", [{k: row[k] for k in ("path", "label", "group")} for row in rows])
    splits = manifest_splits(read_manifest(manifest), num_folds=3, fold=1)
    fold_of = {}
    for path, fold in zip(splits.paths, splits.fold, strict=True):
        group = next(row["group"] for row in rows if row["path"] == path.as_posix())
        fold_of.setdefault(group, set()).add(int(fold))
    assert all(len(folds) == 1 for folds in fold_of.values())
    assert set(splits.fold.tolist()) == {-1, 0, 1, 2}  # -1: the test split, the same for every fold


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda rows: rows[3].update(path=""), "row 4: the 'path' column is empty"),
        (lambda rows: rows[5].update(path="images/nowhere.png"), "row 6: {root}/images/nowhere.png does not exist"),
        (lambda rows: rows[6].update(label=""), "row 7: images/"),
        (lambda rows: rows[7].update(split="training"), "row 8: split 'training' is not one of train, val, test"),
        (lambda rows: rows.append(dict(rows[0])), "row 201: {first} is listed again (row 1), a duplicate"),
        (
            lambda rows: rows.append({**rows[0], "label": "7" if rows[0]["label"] != "7" else "8"}),
            "row 201: {first} is listed again (row 1), a conflict: labelled",
        ),
    ],
    ids=["empty path", "missing file", "empty label", "unknown split", "duplicate", "conflict"],
)
def test_manifest_errors_are_one_line_naming_the_row(
    change, message: str, listed: tuple[Path, list[dict[str, str]]], tmp_path: Path
) -> None:
    root, rows = listed
    rows = [{key: row[key] for key in ("path", "label", "split")} for row in rows]
    first = rows[0]["path"]
    change(rows)
    manifest = write_csv(root / f"bad-{tmp_path.name}.csv", rows)
    config = tiny_config(tmp_path, tmp_path / "unused")
    done = classifier_here("fit", "--config", str(config), "--data.manifest", str(manifest))
    manifest.unlink()
    assert done.returncode == 2, done.stderr[-2000:]
    (line,) = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert line.startswith(f"error: --data.manifest {manifest}, " + message.format(root=root, first=first)), line
    assert not (tmp_path / "lightning_logs").exists()  # refused before anything is written


def test_a_manifest_without_its_columns_or_of_another_format_is_refused(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(b"")
    wrong = write_csv(tmp_path / "wrong.csv", [{"file": "a.png", "label": "x"}])
    config = tiny_config(tmp_path, tmp_path / "unused")
    done = classifier_here("fit", "--config", str(config), "--data.manifest", str(wrong))
    assert done.returncode == 2 and f"--data.manifest {wrong} has no column 'path' (--data.path_column)" in done.stderr
    other = tmp_path / "list.xlsx"
    other.write_text("")
    done = classifier_here("fit", "--config", str(config), "--data.manifest", str(other))
    assert done.returncode == 2 and "a manifest is one of .csv, .tsv, .parquet, .jsonl, .ndjson" in done.stderr


def test_check_data_audits_a_manifest_and_finds_a_copy_under_another_name(
    listed: tuple[Path, list[dict[str, str]]], tmp_path: Path
) -> None:
    root, rows = listed
    rows = [{key: row[key] for key in ("path", "label", "split")} for row in rows]
    train = next(row for row in rows if row["split"] == "train")
    copy = tmp_path / "copy.png"
    shutil.copy(root / train["path"], copy)  # the same scan, listed again as a test image, by absolute path
    manifest = write_csv(
        tmp_path / "manifest.csv", [*rows, {"path": str(copy), "label": train["label"], "split": "test"}]
    )
    out = tmp_path / "audit"
    done = classifier_here(
        "check-data", "--data.manifest", str(manifest), "--data.manifest_root", str(root), "--out", str(out)
    )
    assert done.returncode == 0, done.stderr[-2000:]
    issues = read_csv(out / "issues.csv")
    (leak,) = [row for row in issues if row["kind"] == "leakage"]
    assert {leak["path"], leak["related"]} == {str(copy), str(root / train["path"])}


def test_check_data_reports_a_path_listed_twice_instead_of_stopping(
    listed: tuple[Path, list[dict[str, str]]], tmp_path: Path
) -> None:
    root, rows = listed
    rows = [{key: row[key] for key in ("path", "label")} for row in rows]
    other = "7" if rows[0]["label"] != "7" else "8"
    manifest = write_csv(tmp_path / "twice.csv", [*rows, {**rows[0], "label": other}, dict(rows[1])])
    options = ["--data.manifest", str(manifest), "--data.manifest_root", str(root)]
    done = classifier_here("check-data", *options, "--out", str(tmp_path / "audit"), "--strict")
    assert done.returncode == 1, done.stderr[-2000:]  # a label conflict stops --strict, as copies' conflicts do
    found = {row["kind"]: row for row in read_csv(tmp_path / "audit" / "issues.csv") if row["kind"] != "split_error"}
    assert found["label_conflict"]["path"] == str(root / rows[0]["path"])
    assert (
        found["label_conflict"]["detail"]
        == f"manifest row 201 lists it again (row 1), labelled {other} and {rows[0]['label']}"
    )
    assert found["duplicate_row"]["path"] == str(root / rows[1]["path"])
    assert "row 202 lists it again (row 2), with the same label" in found["duplicate_row"]["detail"]
