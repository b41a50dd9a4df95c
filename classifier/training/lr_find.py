"""`classifier lr_find`: Lightning's learning-rate range test, with the loss curve debiased and a plot."""

from __future__ import annotations

import csv
import logging
import math
import sys
from pathlib import Path
from typing import Literal
from unittest import mock

import numpy as np
import torch
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.tuner import Tuner, lr_finder
from matplotlib.figure import Figure

from classifier.core.atomic import atomic_open
from classifier.core.figures import save_figure
from classifier.model.module import ImageClassifier

log = logging.getLogger(__name__)
SKIP_BEGIN = 10  # the first points average few losses: too noisy to suggest from (Lightning skips them too)
Rule = Literal["valley", "minimum", "steepest"]
RULE_NAMES = {"valley": "longest valley", "minimum": "lowest loss (rate / 10)", "steepest": "steepest descent"}


class DebiasedLRCallback(lr_finder._LRCallback):
    """Lightning's sweep recorder, with the running mean of the loss debiased by the number of losses it holds.

    Lightning divides by `1 - beta ** (global_step + 1)`, but the optimizer has already stepped when a batch ends,
    so its first point is the loss / (1 + beta): the curve starts at half the chance-level loss and climbs a hill
    of its own making, whose top its suggestion then picks (Lightning-AI/pytorch-lightning#14167). No per-step
    progress bar when stderr is not a terminal: it would flood a redirected log.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if not sys.stderr.isatty():
            self.progress_bar_refresh_rate = 0
        self._averaged = 0

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        if (trainer.fit_loop.batch_idx + 1) % trainer.accumulate_grad_batches != 0:
            return
        if not outputs:  # Lightning's rule: a skipped step still gets its point, nan, beside its learning rate
            self.losses.append(float("nan"))
            return
        if self.progress_bar:
            self.progress_bar.update()
        loss = float(outputs if isinstance(outputs, torch.Tensor) else outputs["loss"])
        self._averaged += 1
        self.avg_loss = self.beta * self.avg_loss + (1 - self.beta) * loss
        smoothed = self.avg_loss / (1 - self.beta**self._averaged)
        if self._averaged == 1 or smoothed < self.best_loss:
            self.best_loss = smoothed
        diverged = self.early_stop_threshold is not None and smoothed > self.early_stop_threshold * self.best_loss
        trainer.should_stop = trainer.strategy.broadcast(diverged or trainer.should_stop)
        if trainer.should_stop and self.progress_bar:
            self.progress_bar.close()
        self.losses.append(smoothed)


def suggest(lrs: np.ndarray, losses: np.ndarray, rule: Rule) -> tuple[float, int] | None:
    """The rate `rule` suggests, and the index of the curve's point it reads, from the points past the first
    `SKIP_BEGIN`; None when the loss never fell there.

    - valley (fastai's default, from ESRI): about 2/3 down the longest run of falling losses;
    - minimum: a tenth of the rate of the lowest loss (fastai's `minimum`);
    - steepest: the steepest fall of the loss per decade of rate, up to the lowest loss. Lightning's own steepest
      rule takes the gradient against the rate itself, which on an exponential sweep weighs the first, tiny steps
      up to a million-fold and lands on noise.
    """
    finite = np.flatnonzero(np.isfinite(losses))
    points = finite[finite >= SKIP_BEGIN]
    if len(points) < 2:
        return None
    lowest = points[np.argmin(losses[points])]
    descending = points[points <= lowest]
    if len(descending) < 2:
        return None
    if rule == "minimum":
        return float(lrs[lowest]) / 10, int(lowest)
    if rule == "steepest":
        chosen = descending[np.argmin(np.gradient(losses[descending], np.log10(lrs[descending])))]
    else:
        chosen = points[longest_valley(losses[points])]
    return float(lrs[chosen]), int(chosen)


def longest_valley(losses: np.ndarray) -> int:
    """fastai's `valley`: the index 1/3 + 1/6 of the way along the longest strictly falling subsequence."""
    longest = [1] * len(losses)
    start = end = 0
    for i in range(1, len(losses)):
        for j in range(i):
            if losses[i] < losses[j] and longest[i] < longest[j] + 1:
                longest[i] = longest[j] + 1
            if longest[end] < longest[i]:
                end, start = i, i - longest[i]
    sections = (end - start) / 3
    return max(0, start + int(sections) + int(sections / 2))


def lr_find_figure(
    lrs: np.ndarray, losses: np.ndarray, suggestion: tuple[float, int] | None, rule: Rule, num_classes: int
) -> Figure:
    """The smoothed loss against the rate, the level of guessing, the point the rule read and its suggestion."""
    figure = Figure(layout="constrained")  # not pyplot's: the user's backend stays as it is
    ax = figure.subplots()
    ax.plot(lrs, losses, label="training loss (running mean)")
    ax.axhline(math.log(num_classes), color="grey", linestyle="--", label=f"chance: ln {num_classes}")
    if suggestion is None:
        ax.set_title("No learning rate suggested")
    else:
        rate, point = suggestion
        ax.plot(lrs[point], losses[point], "o", color="red", markersize=9, label=f"read: {RULE_NAMES[rule]}")
        ax.axvline(rate, color="red", linestyle=":", label=f"suggestion: {rate:.3g}")
        ax.set_title(f"Suggested learning rate: {rate:.3g} (rule: {rule})")
    ax.set(xscale="log", xlabel="learning rate", ylabel="loss")
    ax.legend()
    return figure


def lr_find(
    trainer: Trainer,
    model: ImageClassifier,
    datamodule: LightningDataModule | None,
    min_lr: float,
    max_lr: float,
    num_training: int,
    early_stop_threshold: float | None,
    rule: Rule = "valley",
) -> float | None:
    """Lightning's range test with a debiased loss curve, its plot and points in the run folder, and the rate `rule`
    suggests."""
    model.start_from_pretrained()  # the sweep runs in a callback's on_fit_start, before the model's own
    max_epochs = trainer.fit_loop.max_epochs
    trainer.fit_loop.max_epochs = max(max_epochs or 0, num_training)  # on small data the sweep outlasts max_epochs
    try:
        with mock.patch.object(lr_finder, "_LRCallback", DebiasedLRCallback):
            finder = Tuner(trainer).lr_find(
                model,
                datamodule=datamodule,
                min_lr=min_lr,
                max_lr=max_lr,
                num_training=num_training,
                early_stop_threshold=early_stop_threshold,
                update_attr=False,
            )
    finally:
        trainer.fit_loop.max_epochs = max_epochs
    if finder is None:
        return None
    lrs, losses = np.array(finder.results["lr"]), np.array(finder.results["loss"])
    suggestion = suggest(lrs, losses, rule)
    if not trainer.is_global_zero:
        return None if suggestion is None else suggestion[0]
    run_dir = Path(trainer.log_dir or trainer.default_root_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    plot = run_dir / "lr_find.png"
    save_figure(lr_find_figure(lrs, losses, suggestion, rule, len(model.class_names)), plot)
    write_curve(run_dir / "lr_find.csv", lrs, losses)
    if suggestion is None:
        log.warning(
            "No learning rate suggested: the loss never fell over %d steps past the first %d. Plot: %s",
            len(losses), SKIP_BEGIN, plot,
        )  # fmt: skip
        return None
    log.info("Suggested learning rate (rule: %s): %.3g (plot: %s)\nUse it with: --model.optimizer.lr %.3g",
             rule, suggestion[0], plot, suggestion[0])  # fmt: skip
    return suggestion[0]


def write_curve(path: Path, lrs: np.ndarray, losses: np.ndarray) -> None:
    """The sweep's points, to apply another --rule to (`suggest`) without sweeping again."""
    with atomic_open(path, newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["lr", "loss"])
        writer.writerows([f"{lr:.9g}", f"{loss:.9g}"] for lr, loss in zip(lrs, losses, strict=True))
