"""The files validate, test and predict leave in their run folder, all from one set of per-image predictions."""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from rich.table import Table
from torch import Tensor

from classifier.core.atomic import atomic_open, write_json
from classifier.core.console import print_table
from classifier.deploy.inputs import UNKNOWN, rejected
from classifier.evaluation.multilabel_reports import label_sets, write_multilabel_report
from classifier.evaluation.ood_reports import UnknownImages
from classifier.evaluation.ranks import gathered_by_row
from classifier.evaluation.reports import write_evaluation_report
from classifier.model.thresholds import decisions

log = logging.getLogger(__name__)
SHOWN_PREDICTIONS = 20


class PredictionWriter(Callback):
    """`predictions.csv` for validate, test and predict; `metrics.json` and the report files for validate and test.

    Probabilities are the network's own (softmax, or one sigmoid per label); a multi-label network's labels are those
    at or over its thresholds. predict marks an image unknown when the checkpoint's rejection says so (`classifier
    calibrate`; not with --model.reject false); validate and test keep the most probable class, which their metrics
    are about.
    """

    def __init__(self, output: str | None = None, topk: int = 0) -> None:
        """
        Args:
            output: Where predictions.csv goes; by default into the run folder.
            topk: Also write and print each image's K most likely classes (predict).
        """
        self.output = output
        self.topk = topk
        self._outputs: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []  # rows, targets, probabilities, OOD scores
        self.unknown_images = UnknownImages()  # test's --data.ood_dir

    def _collect(
        self, trainer: Trainer, pl_module: LightningModule, logits: Tensor, batch: Any, scores: Tensor | None = None
    ) -> None:
        if trainer.sanity_checking:
            return
        _, targets, rows = batch
        scores = torch.full((len(rows),), torch.nan) if scores is None else scores.float().cpu()
        self._outputs.append((rows.cpu(), targets.cpu(), pl_module.net.probabilities(logits).cpu(), scores))

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if trainer.state.fn == "validate":
            self._collect(trainer, pl_module, outputs, batch)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._collect(trainer, pl_module, outputs, batch)
        self.unknown_images.collect(trainer, pl_module, outputs, batch)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        logits, scores = outputs  # the scores when predict rejects (`ImageClassifier.predict_step`)
        self._collect(trainer, pl_module, logits, batch, scores)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn == "validate":
            self._write(trainer, pl_module, "val")

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._write(trainer, pl_module, "test")
        self.unknown_images.report(trainer, pl_module, Path(trainer.log_dir or trainer.default_root_dir))

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._write(trainer, pl_module, "predict")

    def _write(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        rows, targets, probs, scores = _gather(self._outputs, len(pl_module.class_names))
        self._outputs = []
        run_dir = Path(trainer.log_dir or trainer.default_root_dir)  # a collective under DDP: every rank asks
        if not trainer.is_global_zero:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        classes = pl_module.class_names
        thresholds = pl_module.net.thresholds.cpu() if pl_module.net.multilabel else None
        output = Path(self.output) if self.output else run_dir / "predictions.csv"
        paths = [trainer.datamodule.paths(stage)[row] for row in rows.tolist()]
        if stage == "predict":
            unreadable, rejection = trainer.datamodule.unreadable, pl_module.rejection
            scores = scores if rejection else None
            write_predictions(output, paths, None, probs, classes, self.topk, unreadable, thresholds, scores, rejection)
            log.info("Predictions for %d images (%d unreadable): %s", len(paths), len(unreadable), output)
            show_predictions(paths, probs, classes, max(1, self.topk), thresholds, scores, rejection)
            return
        replaced = (run_dir / "metrics.json").is_file()  # the same checkpoint evaluated again
        write_predictions(output, paths, targets, probs, classes, thresholds=thresholds)
        metrics = {k: float(v) for k, v in sorted(trainer.callback_metrics.items()) if k.startswith(f"{stage}/")}
        write_json(run_dir / "metrics.json", metrics)
        if thresholds is None:
            report = write_evaluation_report(run_dir, paths, targets.numpy(), probs.numpy(), classes)
        else:
            report = write_multilabel_report(run_dir, paths, targets.numpy(), probs.numpy(), classes,
                                             thresholds.numpy())  # fmt: skip
        show_classification_report(report, title=f"{stage} split: {len(paths)} images")
        again = " (replacing the earlier run's)" if replaced else ""
        log.info("Predictions, metrics.json and report files%s: %s", again, run_dir)


def write_predictions(
    output: Path,
    paths: list[Path],
    targets: Tensor | None,
    probs: Tensor,
    classes: list[str],
    topk: int = 0,
    unreadable: dict[Path, str] | None = None,
    thresholds: Tensor | None = None,
    scores: Tensor | None = None,
    rejection: dict | None = None,
) -> None:
    """One row per image: path, [target,] prediction, confidence, [ood_score,] [status, top-K,] then prob_<class>.

    Multi-label (given each label's `thresholds`): path, [target,] labels, [ood_score,] [status, top-K,]
    prob_<class>, where target and labels are `;`-joined sets ("" for none), labels those at or over their
    thresholds. With `scores` (predict under a rejection), the prediction (multi-label: the labels) of an image below
    `rejection`'s threshold is `unknown` (`classifier.deploy.inputs.rejected`); its confidence and probabilities stay.
    """
    ranked = probs.argsort(dim=-1, descending=True)[:, :topk].tolist()
    labelled = targets is not None
    status = [] if labelled else ["status"]
    if thresholds is None:
        confidence, predicted = probs.max(dim=-1)
        decided = ["prediction", "confidence"]
        cells = [[classes[c], f"{p:.7g}"] for c, p in zip(predicted.tolist(), confidence.tolist(), strict=True)]
        truth = [classes[t] for t in targets.tolist()] if labelled else []
        chosen = predicted.numpy()
    else:
        decided = ["labels"]
        chosen = decisions(probs.numpy(), thresholds.numpy())
        cells = [[text] for text in label_sets(chosen, classes)]
        truth = label_sets(targets.numpy(), classes) if labelled else []
    if scores is not None:
        decided.append("ood_score")
        for i, unknown in enumerate(rejected(chosen, scores.numpy(), rejection)):
            cells[i] = [UNKNOWN if unknown else cells[i][0], *cells[i][1:], f"{float(scores[i]):.7g}"]
    output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(output, newline="") as file:
        writer = csv.writer(file)
        header = ["path", *(["target"] if labelled else []), *decided, *status]
        writer.writerow(header + [f"top{k + 1}" for k in range(topk)] + [f"prob_{name}" for name in classes])
        for i, path in enumerate(paths):
            target = [truth[i]] if labelled else []
            ok = [] if labelled else ["ok"]
            top = [classes[c] for c in ranked[i]]
            writer.writerow([str(path), *target, *cells[i], *ok, *top] + [f"{p:.7g}" for p in probs[i].tolist()])
        for path, reason in (unreadable or {}).items():
            writer.writerow([str(path), *[""] * len(decided), f"error: {reason}"] + [""] * (topk + len(classes)))


def show_classification_report(report: list[dict], title: str) -> None:
    """The per-class rows, then the averages; a multi-label report also shows each label's threshold."""
    thresholds = "threshold" in report[0]
    table = Table(title=f"Classification report, {title}")
    for column in ("class", *(["threshold"] if thresholds else []), "precision", "recall", "f1", "support"):
        table.add_column(column, justify="left" if column == "class" else "right")
    for i, row in enumerate(report):
        if i == len(report) - 2:  # the two averages
            table.add_section()
        threshold = [] if not thresholds else ["" if row["threshold"] is None else f"{row['threshold']:.4f}"]
        scores = (f"{row[k]:.4f}" for k in ("precision", "recall", "f1"))
        table.add_row(row["class"], *threshold, *scores, str(row["support"]))
    print_table(table)


def show_predictions(
    paths: list[Path],
    probs: Tensor,
    classes: list[str],
    topk: int,
    thresholds: Tensor | None = None,
    scores: Tensor | None = None,
    rejection: dict | None = None,
) -> None:
    """The first images' top classes; multi-label, first the labels each gets at its thresholds; under a rejection,
    first the decision (a class, or unknown), and the OOD score last."""
    table = Table(title=f"Predictions (first {min(len(paths), SHOWN_PREDICTIONS)} of {len(paths)})")
    table.add_column("image")
    shown = probs[:SHOWN_PREDICTIONS]
    decided = thresholds is not None or scores is not None  # a column of decisions before the most likely classes
    if decided:
        table.add_column("labels" if thresholds is not None else "prediction")
        if thresholds is None:
            chosen = shown.argmax(dim=-1).numpy()
            verdicts = [classes[c] for c in chosen]
        else:
            chosen = decisions(shown.numpy(), thresholds.numpy())
            verdicts = [text or "(none)" for text in label_sets(chosen, classes)]
        if scores is not None:
            unknown = rejected(chosen, scores[:SHOWN_PREDICTIONS].numpy(), rejection)
            verdicts = [UNKNOWN if no else verdict for verdict, no in zip(verdicts, unknown, strict=True)]
    for k in range(topk):
        table.add_column(f"top {k + 1}" if topk > 1 else "most likely" if decided else "prediction")
    if scores is not None:
        table.add_column(f"{rejection['score']} (unknown < {rejection['threshold']:.4g})", justify="right")
    values, indices = probs.topk(min(topk, probs.shape[-1]), dim=-1)
    for i, path in enumerate(paths[:SHOWN_PREDICTIONS]):
        cells = [f"{classes[c]} ({v:.3f})" for v, c in zip(values[i].tolist(), indices[i].tolist(), strict=True)]
        score = [] if scores is None else [f"{float(scores[i]):.4g}"]
        table.add_row(path.name, *([verdicts[i]] if decided else []), *cells, *score)
    print_table(table)


def _gather(
    outputs: list[tuple[Tensor, Tensor, Tensor, Tensor]], num_classes: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Every rank's (rows, targets, probabilities, OOD scores), concatenated and ordered by row."""
    columns = gathered_by_row(outputs)
    if columns is None:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty, torch.zeros(0, num_classes), torch.zeros(0)
    rows, targets, probabilities, scores = columns
    return rows, targets, probabilities, scores
