"""`classifier check-data`: audit a data folder with fit's listing, image rules and split, before it costs a run.

Read-only: it decodes every image once (through the verification cache `fit` shares) and writes only its report.
"""

from __future__ import annotations

import argparse
import csv
import logging
from dataclasses import asdict
from pathlib import Path

from rich.table import Table

from classifier.cli.base import ParsedCLI
from classifier.cli.run_folders import logger_root, new_timestamped_dir
from classifier.core.atomic import atomic_open, write_json
from classifier.core.console import lightning_silenced, print_table
from classifier.core.errors import DataCheckFailed
from classifier.core.figures import save_figure
from classifier.data.duplicates import MAX_THRESHOLD
from classifier.data.file_facts import FileFacts, cache_location, verify_files
from classifier.data.manifests import Repeat, manifest_splits, read_manifest
from classifier.data.splits import Splits, build_splits, partitions
from classifier.data.workers import available_cores
from classifier.quality.audit import GATING, NO_LABEL, Audit, Finding, audit, label_name
from classifier.quality.figures import class_counts_figure, image_sizes_figure, near_duplicates_figure
from classifier.quality.label_issues import (
    LabelIssue,
    LabelSetIssue,
    find_label_issues,
    find_label_set_issues,
    write_label_issues,
)

log = logging.getLogger(__name__)

SHOWN_PER_KIND = 3  # example rows per kind in the terminal; issues.csv has them all


def check_data(argv: list[str]) -> Path:
    """Audit the data that `fit` would train on with the same options; returns the report folder."""
    parser = argparse.ArgumentParser(
        prog="classifier check-data",
        description="Audit the data fit would see (with fit's --config and --data options): bad files, odd images, "
        "class balance, exact and near duplicates, leakage across splits and, given out-of-fold predictions, "
        "likely label errors. It never changes a file.",
    )
    parser.add_argument("--splits", help="a run's splits.csv: audit that frozen split")
    parser.add_argument("--near_dup_threshold", type=int, default=10, help="Hamming distance of 64-bit pHashes")
    parser.add_argument("--oof", type=Path, help="a cv folder's oof_predictions.csv: rank likely label errors "
                        "(multi-label: missing and wrong labels, per image and label)")  # fmt: skip
    parser.add_argument("--strict", action="store_true", help="exit 1 on leakage, label conflicts or unreadable files")
    parser.add_argument("--out", type=Path, help="the report folder (default: <logs>/check_data/<time>)")
    options, fit_args = parser.parse_known_args(argv)
    if not 0 <= options.near_dup_threshold <= MAX_THRESHOLD:
        raise ValueError(
            f"--near_dup_threshold {options.near_dup_threshold}: a Hamming distance from 0 to {MAX_THRESHOLD} is "
            "needed (64-bit hashes; copies measure 0-10)"
        )
    if options.oof is not None and not options.oof.is_file():
        raise FileNotFoundError(f"--oof {options.oof} does not exist: give a cv folder's oof_predictions.csv")
    if options.splits:
        fit_args += ["--data.splits", options.splits]
    with lightning_silenced():
        cli = ParsedCLI(args=fit_args, run=False)
    data, multilabel = cli.datamodule.hparams, cli.datamodule.task == "multilabel"
    labels = None  # read before the images: a bad file stops before the long part
    if options.oof:
        labels = find_label_set_issues(options.oof) if multilabel else find_label_issues(options.oof)
    repeated: list[Repeat] = []
    try:
        splits, split_error = cli.datamodule.splits, None
    except ValueError as error:  # the split fit would fail on: audit the images as they are, and say why
        if data.manifest:  # a path listed twice is reported below, not refused
            listed = read_manifest(data.manifest, data.manifest_root, data.path_column, data.label_column, False,
                                   data.label_delimiter, data.label_columns)  # fmt: skip
            splits = manifest_splits(listed, data.classes, 0.0, 0.0, data.seed, multilabel=multilabel)
            repeated = listed.repeated
        else:
            splits = build_splits(Path(data.data_dir), data.classes, 0.0, 0.0, data.seed)
        split_error = str(error)
    paths = [splits.root / path for path in splits.paths]
    facts = list(verify_files(paths, splits.root, num_threads=2 * available_cores()).values())
    result = audit(splits, facts, options.near_dup_threshold, data.num_folds)
    if split_error:
        where = str(data.manifest or data.data_dir)
        result.findings[:0] = [
            Finding(where, "split_error", split_error),
            *(repeat_finding(r, splits.root) for r in repeated),
        ]
    out = options.out or new_timestamped_dir((logger_root(cli.config.trainer) or Path("lightning_logs")) / "check_data")
    out.mkdir(parents=True, exist_ok=True)
    result.findings += [label_finding(issue) for issue in labels or []]
    write_report(out, splits, facts, result, options, labels)
    show(result, out)
    failed = {kind: result.count(kind) for kind in GATING if result.count(kind)}
    if options.strict and failed:
        counts = ", ".join(f"{n} {kind}" for kind, n in failed.items())
        raise DataCheckFailed(f"check-data --strict: {counts}; see {out / 'issues.csv'}")
    return out


def repeat_finding(repeat: Repeat, root: Path) -> Finding:
    """A manifest row listing an image again: a label conflict when the labels (label sets) differ, else a
    duplicate row."""
    where, path = f"manifest row {repeat.row} lists it again (row {repeat.first_row})", str(root / repeat.path)
    if repeat.label != repeat.first_label:
        named = (repeat.label or NO_LABEL, repeat.first_label or NO_LABEL)
        return Finding(path, "label_conflict", f"{where}, labelled {named[0]} and {named[1]}")
    return Finding(path, "duplicate_row", f"{where}, with the same label")


def label_finding(issue: LabelIssue | LabelSetIssue) -> Finding:
    """An issues.csv row: the image, its given and predicted class (multi-label: the label and its probability)."""
    if isinstance(issue, LabelSetIssue):
        said = f"{issue.label} {'given' if issue.given else 'not given'}"
        detail = f"{said}, p({issue.label}) {issue.probability:.3f}: a {issue.problem} label?, rank {issue.rank}"
        return Finding(str(issue.path), "label_issue", detail)
    confidences = f"p(given) {issue.self_confidence:.3f}, p({issue.predicted}) {issue.predicted_confidence:.3f}"
    detail = f"given {issue.given}, predicted {issue.predicted} ({confidences}), rank {issue.rank}"
    return Finding(str(issue.path), "label_issue", detail)


def write_report(
    out: Path,
    splits: Splits,
    facts: list[FileFacts],
    result: Audit,
    options: argparse.Namespace,
    labels: list[LabelIssue] | list[LabelSetIssue] | None,
) -> None:
    """data_report.json, issues.csv, duplicates.csv and the figures; label_issues.csv and .png given --oof."""
    names = [str(splits.root / path) for path in splits.paths]
    parts = partitions(splits)
    classes = [label_name(splits, row) for row in range(len(splits.paths))]
    crossing = sorted(  # leaks and label conflicts first; near copies before exact ones, the harder to see
        result.pairs,
        key=lambda p: (parts[p.first] == parts[p.second] and classes[p.first] == classes[p.second], p.match != "near"),
    )
    with atomic_open(out / "issues.csv", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=["path", "kind", "detail", "related"])
        writer.writeheader()
        writer.writerows(asdict(finding) for finding in result.findings)
    with atomic_open(out / "duplicates.csv", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(
            ["path", "related", "match", "distance", "rms", "class", "related_class", "part", "related_part"]
        )
        for p in crossing:
            a, b = p.second, p.first
            writer.writerow(
                [names[a], names[b], p.match, p.distance, p.rms, classes[a], classes[b], parts[a], parts[b]]
            )
    report = {
        "data_dir": str(splits.root),
        "split_source": options.splits or "made from the folder, as fit makes it",
        "near_dup_threshold": options.near_dup_threshold,
        "verification_cache": str(cache_location(splits.root)),
        **result.report,
        "findings": {kind: result.count(kind) for kind in sorted({f.kind for f in result.findings})},
        "duplicate_pairs": {
            match: sum(p.match == match for p in result.pairs) for match in ("bytes", "pixels", "near")
        },
    }
    if labels is not None:
        report["label_issues"] = len(labels)
        write_label_issues(labels, out, multilabel=splits.multilabel)
    write_json(out / "data_report.json", report)
    counts = result.report["class_counts"]
    if splits.multilabel:
        counts = {**counts, NO_LABEL: result.report["images_without_label"]}
    save_figure(class_counts_figure(counts), out / "class_counts.png")
    save_figure(image_sizes_figure(facts), out / "image_sizes.png")
    captions = [f"{part} / {name}" for part, name in zip(parts, classes, strict=True)]
    save_figure(near_duplicates_figure(crossing, names, captions), out / "near_duplicates.png")


def show(result: Audit, out: Path) -> None:
    """The data in one line; one table row per kind of finding, the gating kinds first, with a few examples."""
    report = result.report
    splits = ", ".join(
        f"{name} {report['splits'][name]}" for name in ("train", "val", "test") if name in report["splits"]
    )
    log.info(
        "%d images in %d classes (%s); largest over smallest training class: %s",
        report["images"], report["classes"], splits, report["imbalance_ratio"],
    )  # fmt: skip
    if "images_without_label" in report:  # multi-label: the class counts are of images carrying each label
        log.info("Images with no label: %s", ", ".join(f"{k} {n}" for k, n in report["images_without_label"].items()))
    kinds = sorted({f.kind for f in result.findings}, key=lambda kind: (kind not in GATING, kind))
    table = Table(title="check-data findings")
    for column in ("finding", "count", "examples"):
        table.add_column(column, justify="right" if column == "count" else "left")
    for kind in kinds:
        rows = [f for f in result.findings if f.kind == kind]
        examples = "\n".join(
            f"{f.path}: {f.detail}" + (f" ({f.related})" if f.related else "") for f in rows[:SHOWN_PER_KIND]
        )
        table.add_row(kind, str(len(rows)), examples, style="bold red" if kind in GATING else None)
    if table.rows:
        print_table(table)
    else:
        log.info("Nothing found: every image decodes, and no image is a copy of another.")
    log.info("Report: %s (issues.csv has every finding)", out)
