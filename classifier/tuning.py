"""`classifier lr_find`: Lightning's learning-rate range test, as a CLI subcommand."""

from __future__ import annotations

import logging
from pathlib import Path

from lightning.pytorch import LightningDataModule, Trainer
from lightning.pytorch.tuner import Tuner
from matplotlib.figure import Figure

from classifier.module import ImageClassifier
from classifier.reports import save_figure

log = logging.getLogger(__name__)


class ClassifierTrainer(Trainer):
    """Lightning's Trainer plus `lr_find`, so that LightningCLI can offer it as a subcommand."""

    def lr_find(
        self,
        model: ImageClassifier,
        datamodule: LightningDataModule | None = None,
        min_lr: float = 1e-6,
        max_lr: float = 1.0,
        num_training: int = 100,
        early_stop_threshold: float | None = 4.0,
    ) -> float | None:
        """Find a learning rate: train briefly while raising it exponentially, and suggest where loss falls fastest.

        Args:
            min_lr: The sweep's first learning rate.
            max_lr: The sweep's last learning rate.
            num_training: Training steps in the sweep.
            early_stop_threshold: Stop once the loss exceeds this multiple of the best loss; None never stops.
        """
        model.start_from_pretrained()  # the sweep runs in a callback's on_fit_start, before the model's own
        max_epochs = self.fit_loop.max_epochs
        self.fit_loop.max_epochs = max(max_epochs or 0, num_training)  # on small data the sweep outlasts max_epochs
        try:
            finder = Tuner(self).lr_find(
                model,
                datamodule=datamodule,
                min_lr=min_lr,
                max_lr=max_lr,
                num_training=num_training,
                early_stop_threshold=early_stop_threshold,
                update_attr=False,
            )
        finally:
            self.fit_loop.max_epochs = max_epochs
        suggestion = finder.suggestion() if finder else None
        run_dir = Path(self.log_dir or self.default_root_dir)
        if finder is None or not self.is_global_zero:
            return suggestion
        run_dir.mkdir(parents=True, exist_ok=True)
        figure = Figure(layout="constrained")  # not pyplot's: the user's backend stays as it is
        finder.plot(suggest=suggestion is not None, ax=figure.subplots())
        save_figure(figure, run_dir / "lr_find.png")
        if suggestion is None:
            log.warning("No learning rate suggested (Lightning says why above). Plot: %s", run_dir / "lr_find.png")
        else:
            log.info(
                "Suggested learning rate: %.3g (plot: %s)\nUse it with: --model.optimizer.lr %.3g",
                suggestion,
                run_dir / "lr_find.png",
                suggestion,
            )
        return suggestion
