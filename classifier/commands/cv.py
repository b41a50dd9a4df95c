"""`classifier cv`: k-fold cross-validation as one command, or the aggregation of folds trained apart."""

from __future__ import annotations

import argparse
import csv
import json
import logging
from pathlib import Path

import numpy as np
import torch
import yaml
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from rich.table import Table

from classifier.cli.base import ClassifierCLI, ParsedCLI
from classifier.core.atomic import atomic_open, write_json
from classifier.core.console import print_table
from classifier.data.splits import LABEL_SEPARATOR
from classifier.evaluation.multilabel_reports import multilabel_scores, write_multilabel_report
from classifier.evaluation.predictions import write_predictions
from classifier.evaluation.reports import write_evaluation_report
from classifier.model.checkpoints import MACHINE_SETTINGS, read_checkpoint
from classifier.model.losses import checkpoints_criterion, probabilities_loss
from classifier.model.module import classification_metrics
from classifier.training.tracking import log_cross_validation

log = logging.getLogger(__name__)


def cross_validate(argv: list[str]) -> Path:
    """Fit every fold of `--data.num_folds`, one after another, then aggregate them; returns the cv folder."""
    parser = argparse.ArgumentParser(
        prog="classifier cv",
        description="Train every fold (the other options are fit's), or --aggregate folds trained separately.",
    )
    parser.add_argument("--aggregate", type=Path, help="a folder of fold runs (version_*/) to aggregate")
    options, fit_args = parser.parse_known_args(argv)
    if options.aggregate:
        return aggregate(find_fold_runs(options.aggregate), evaluation_args(fit_args))
    num_folds = ParsedCLI(args=fit_args, run=False).datamodule.hparams.num_folds  # parse; no model, no loggers
    if not num_folds:
        raise ValueError("classifier cv needs --data.num_folds K (2 or more)")
    fits = (ClassifierCLI(args=["fit", *fit_args, "--data.fold", str(fold)]) for fold in range(num_folds))
    return aggregate([Path(cli.trainer.log_dir) for cli in fits], evaluation_args(fit_args))


def evaluation_args(args: list[str]) -> list[str]:
    """The user's options for the validate and test runs: all but the model's and the data's, which each fold's
    checkpoint brings, except the machine's (workers, decode, cache); a --config file is passed on likewise."""
    kept, tokens = [], iter(args)
    for token in tokens:
        name, has_value, _ = token.partition("=")
        value = [] if has_value else [next(tokens, "")]  # every option takes a value
        if name in ("--config", "-c"):
            path = token.partition("=")[2] if has_value else value[0]
            kept += ["--config", yaml.safe_dump(machine_part(yaml.safe_load(Path(path).read_text()) or {}))]
        elif not name.startswith(("--model", "--data")) or name.removeprefix("--") in MACHINE_SETTINGS:
            kept += [token, *value]
    return kept


def machine_part(config: dict) -> dict:
    """A config without its model and data settings, but for those of the machine."""
    kept = {key: value for key, value in config.items() if key not in ("model", "data")}
    for group in ("model", "data"):
        machine = {k: v for k, v in (config.get(group) or {}).items() if f"{group}.{k}" in MACHINE_SETTINGS}
        if machine:
            kept[group] = machine
    return kept


def global_rank() -> int:
    """This process's rank: the strategy's once a trainer has run, before that the launcher's environment's."""
    return rank_zero_only.rank


def new_cv_dir(root: Path) -> Path:
    """A cv_N folder never used before: one past the highest N, made here so that no other process takes it."""
    while True:
        taken = [int(path.name[3:]) for path in root.glob("cv_*") if path.name[3:].isdigit()]
        try:
            (path := root / f"cv_{max(taken, default=-1) + 1}").mkdir(parents=True)
            return path
        except FileExistsError:  # another process made it first
            continue


def shared_cv_dir(root: Path) -> Path:
    """Rank 0 makes the cv folder; the other ranks of a multi-GPU run take its name."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        name = [new_cv_dir(root).name if global_rank() == 0 else None]
        torch.distributed.broadcast_object_list(name, src=0)
        return root / name[0]
    if global_rank() == 0:
        return new_cv_dir(root)
    # started by rank 0's first trainer, after rank 0 made the folder: the newest one is its
    return max(root.glob("cv_*"), key=lambda path: int(path.name[3:]) if path.name[3:].isdigit() else -1)


def find_fold_runs(folder: Path) -> list[Path]:
    """The newest run of each fold under `folder`, in fold order; every fold of one k-fold split must be there."""
    if not folder.is_dir():
        raise FileNotFoundError(f"--aggregate {folder} does not exist")
    newest: dict[tuple[int, int], Path] = {}
    for best in sorted(folder.glob("version_*/checkpoints/best.ckpt"), key=lambda path: path.stat().st_mtime):
        data = read_checkpoint(best, "--aggregate")["datamodule_hyper_parameters"]
        if data.get("num_folds"):
            newest[(data["num_folds"], data["fold"])] = best.parent.parent
    counts = {k for k, _ in newest}
    if len(counts) != 1:
        raise ValueError(f"--aggregate {folder}: expected the runs of one k-fold split, found num_folds {counts}")
    (num_folds,) = counts
    missing = [fold for fold in range(num_folds) if (num_folds, fold) not in newest]
    if missing:
        raise ValueError(f"--aggregate {folder}: no finished run (checkpoints/best.ckpt) for folds {missing}")
    return [newest[(num_folds, fold)] for fold in range(num_folds)]


def aggregate(runs: list[Path], options: list[str]) -> Path:
    """Out-of-fold predictions, per-fold metrics with mean and std, and the fold ensemble on the test split.

    Every rank evaluates (validate, and test where there is a test split) with the user's `options`; rank 0
    aggregates.
    """
    cv_dir = shared_cv_dir(runs[0].parent)
    with open(runs[0] / "splits.csv", newline="") as file:
        stages = ("validate", "test") if any(row["split"] == "test" for row in csv.DictReader(file)) else ("validate",)
    for fold, run in enumerate(runs):
        for stage in stages:
            ClassifierCLI(args=[stage, *options, "--ckpt_path", str(run / "checkpoints" / "best.ckpt"),
                                "--trainer.logger", "lightning.pytorch.loggers.TensorBoardLogger",
                                "--trainer.logger.save_dir", str(cv_dir), "--trainer.logger.name", f"fold_{fold}",
                                "--trainer.logger.version", stage])  # fmt: skip
    if global_rank() != 0:
        return cv_dir
    folds, oof_rows, test_probs = [], [], []
    for fold in range(len(runs)):
        folds.append(json.loads((cv_dir / f"fold_{fold}" / "validate" / "metrics.json").read_text()))
        oof_rows += [{**row, "fold": str(fold)} for row in _read(cv_dir / f"fold_{fold}" / "validate")]
        if "test" in stages:
            test_probs.append(_read(cv_dir / f"fold_{fold}" / "test"))
    names = sorted(set.intersection(*(set(metrics) for metrics in folds)))
    summary = {
        "runs": [str(run) for run in runs],
        "folds": folds,
        "mean": {name: float(np.mean([metrics[name] for metrics in folds])) for name in names},
        "std": {name: float(np.std([metrics[name] for metrics in folds])) for name in names},
    }
    write_json(cv_dir / "cv_summary.json", summary)
    _write_rows(cv_dir / "oof_predictions.csv", oof_rows)
    ensemble = {}
    if test_probs:
        checkpoints = [read_checkpoint(run / "checkpoints" / "best.ckpt", "--aggregate") for run in runs]
        criterion, thresholds = checkpoints_criterion(checkpoints), fold_thresholds(checkpoints)
        ensemble = _ensemble(test_probs, cv_dir / "ensemble", criterion, thresholds)
    log_cross_validation(runs, cv_dir, summary, ensemble)  # when the folds ran with MLflow
    _show(summary, ensemble)
    log.info("Cross-validation of %d folds: %s", len(runs), cv_dir)
    return cv_dir


def _read(run: Path) -> list[dict[str, str]]:
    with open(run / "predictions.csv", newline="") as file:
        return list(csv.DictReader(file))


def _write_rows(path: Path, rows: list[dict[str, str]]) -> None:
    with atomic_open(path, newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def fold_thresholds(checkpoints: list[dict]) -> np.ndarray | None:
    """The mean of the fold models' per-label decision thresholds, as their checkpoints keep them; None for
    single-label models."""
    states = [checkpoint["state_dict"] for checkpoint in checkpoints]
    if "net.thresholds" not in states[0]:
        return None
    return np.stack([state["net.thresholds"].float().numpy() for state in states]).mean(axis=0)


def _ensemble(
    per_fold: list[list[dict[str, str]]], out: Path, criterion: torch.nn.Module, thresholds: np.ndarray | None
) -> dict[str, float]:
    """Average the fold models' test probabilities; score and report the ensemble as `test` does one model: its loss
    by the folds' criterion, multi-label deciding each label at `thresholds`, the mean of the folds'."""
    classes = [column.removeprefix("prob_") for column in per_fold[0][0] if column.startswith("prob_")]
    paths = [row["path"] for row in per_fold[0]]
    if any([row["path"] for row in rows] != paths for rows in per_fold):
        raise ValueError("the folds' test predictions cover different images; were they trained on the same data?")
    probs = np.mean([[[float(row[f"prob_{c}"]) for c in classes] for row in rows] for rows in per_fold], axis=0)
    out.mkdir(parents=True, exist_ok=True)
    image_paths = [Path(path) for path in paths]
    if thresholds is not None:
        return _label_ensemble(per_fold[0], probs, classes, criterion, thresholds, image_paths, out)
    targets = np.array([classes.index(row["target"]) for row in per_fold[0]])
    metrics = classification_metrics(len(classes), prefix="test/")
    scores = {name: float(value) for name, value in metrics(torch.from_numpy(probs), torch.from_numpy(targets)).items()}
    scores["test/loss"] = probabilities_loss(criterion, torch.from_numpy(probs), torch.from_numpy(targets))
    write_json(out / "metrics.json", dict(sorted(scores.items())))
    image_paths = [Path(path) for path in paths]
    write_predictions(out / "predictions.csv", image_paths, torch.from_numpy(targets), torch.from_numpy(probs), classes)
    write_evaluation_report(out, image_paths, targets, probs, classes)
    return scores


def _label_ensemble(
    rows: list[dict[str, str]],
    probs: np.ndarray,
    classes: list[str],
    criterion: torch.nn.Module,
    thresholds: np.ndarray,
    paths: list[Path],
    out: Path,
) -> dict[str, float]:
    """The multi-label ensemble's scores (those `test` logs), predictions.csv and report files."""
    targets = np.array([[int(name in row["target"].split(LABEL_SEPARATOR)) for name in classes] for row in rows])
    scores = {f"test/{name}": value for name, value in multilabel_scores(targets, probs, thresholds).items()}
    scores["test/loss"] = probabilities_loss(criterion, torch.from_numpy(probs), torch.from_numpy(targets))
    write_json(out / "metrics.json", dict(sorted(scores.items())))
    tensors = torch.from_numpy(targets), torch.from_numpy(probs), torch.from_numpy(thresholds)
    write_predictions(out / "predictions.csv", paths, tensors[0], tensors[1], classes, thresholds=tensors[2])
    write_multilabel_report(out, paths, targets, probs, classes, thresholds)
    return scores


def _show(summary: dict, ensemble: dict[str, float]) -> None:
    names = [name for name in summary["mean"] if name != "val/loss"] + ["val/loss"]
    table = Table(title=f"Cross-validation, {len(summary['folds'])} folds (best checkpoint of each)")
    table.add_column("fold")
    for name in names:
        table.add_column(name.removeprefix("val/"), justify="right")
    for fold, metrics in enumerate(summary["folds"]):
        table.add_row(str(fold), *(f"{metrics[name]:.4f}" for name in names))
    table.add_section()
    table.add_row("mean ± std", *(f"{summary['mean'][n]:.4f} ± {summary['std'][n]:.4f}" for n in names))
    ensemble_row = [f"{ensemble.get(name.replace('val/', 'test/'), float('nan')):.4f}" for name in names]
    table.add_row("ensemble on test", *ensemble_row)
    print_table(table)
