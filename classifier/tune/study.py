"""The engine of `classifier tune`: an Optuna study over fit's options. Each trial is a real `fit` in its own run
folder, pruned on its validation metric; the same command resumes the study.

Trials run one after another in this process, through the same ClassifierCLI as `classifier fit` (and as `cv`'s
folds): the pruning callback holds the live Optuna trial, and no trial pays for importing torch again. A trial that
raises is recorded as failed and the study goes on; one that a kill, Ctrl-C or SIGTERM ends is marked failed and
its parameters run again, now or at the next session.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import torch
import yaml
from jsonargparse import Namespace
from optuna.distributions import BaseDistribution
from optuna.trial import FrozenTrial, TrialState

from classifier.cli.base import ParsedCLI
from classifier.core.config import differences
from classifier.core.console import debugging
from classifier.core.errors import TrialsFailed
from classifier.model.metrics import classification_metrics, decision_metrics, metric_mode, ranking_metrics
from classifier.tune.report import FINISHED, shown, write_outputs
from classifier.tune.search_space import override_args
from classifier.tune.trial import TrialCLI, TrialPruning, trial_trainer, trial_value

log = logging.getLogger(__name__)

PRUNERS = ("median", "hyperband", "none")
GIVE_UP_AFTER = 3  # failed trials in a row before a session concludes that every trial fails (a full disk, ...)


@dataclass
class Session:
    """What every trial of one `classifier tune` run shares, and the trials it runs."""

    study: optuna.Study
    space: dict[str, BaseDistribution]
    fit_args: list[str]  # the user's, for every trial
    fit: ParsedCLI  # those options parsed: its parser checks and dumps configs
    folder: Path
    metric: str
    best: tuple[int, str] | None = None  # (trial number, its config), dumped once per best trial

    def run(self, trials: int, timeout: float | None) -> None:
        """Trials until the study holds `trials` finished ones, `timeout` seconds pass, or `GIVE_UP_AFTER` trials
        fail in a row; the outputs rewritten after each (and at once, for a session that runs none)."""
        started, failed = time.monotonic(), []  # the failures since the last finished trial
        done = len(self.study.get_trials(deepcopy=False, states=FINISHED))
        log.info("Study %s (%s): %d of %d trials finished", self.study.study_name, self.folder, done, trials)
        self.write_outputs()
        while len(self.study.get_trials(deepcopy=False, states=FINISHED)) < trials:
            if timeout is not None and time.monotonic() - started >= timeout:
                log.info("--timeout %gs reached: no new trial; the same command resumes the study", timeout)
                return
            trial = self.run_trial(self.study.ask(self.space))
            self.write_outputs()
            if trial.state != TrialState.FAIL:
                failed = []
                continue
            failed.append(trial)
            if len(failed) >= GIVE_UP_AFTER:
                first = failed[0]
                raise TrialsFailed(
                    f"{len(failed)} trials in a row failed, so the study stops. The first, trial "
                    f"{first.number} ({describe(first.params)}): {first.user_attrs['error']}. Every trial is in "
                    f"{self.folder / 'trials.csv'}; once fixed, the same command resumes the study"
                )

    def run_trial(self, trial: optuna.Trial) -> FrozenTrial:
        """One `fit` with the trial's parameters, in `<study folder>/trials/trial_<number>`; returns the trial as
        recorded."""
        run = self.folder / "trials" / f"trial_{trial.number}"
        trial.set_user_attr("run", str(run))
        log.info("Trial %d: %s", trial.number, describe(trial.params))
        pruning = TrialPruning(trial, self.metric)
        trainer = trial_trainer(self.fit.config.trainer, run)
        cli = None
        try:
            cli = TrialCLI(["fit", *self.fit_args, *override_args(trial.params), "--config", trainer], pruning)
            value = trial_value(cli.trainer, pruning, self.metric, self.study.direction)
        except Exception as error:
            trial.set_user_attr("error", f"{type(error).__name__}: {' '.join(str(error).split())}")
            log.warning("Trial %d failed: %s", trial.number, trial.user_attrs["error"], exc_info=debugging())
            return self.study.tell(trial, state=TrialState.FAIL)
        except BaseException as error:  # Ctrl-C, SIGTERM: the trial runs again at the next session
            interrupted(
                self.study, self.study.trials[trial.number], f"the session was stopped ({type(error).__name__})"
            )
            raise
        finally:
            del cli  # the trial's model, data and trainer, before the next trial builds its own
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        if pruning.pruned:
            return self.study.tell(trial, state=TrialState.PRUNED)
        log.info("Trial %d: %s = %.4f", trial.number, self.metric, value)
        return self.study.tell(trial, value)

    def best_config(self) -> str | None:
        """fit's config with the best trial's parameters, dumped as LightningCLI dumps a run's config.yaml, with the
        user's logger (not the trial's); None before any trial completes."""
        if not self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            return None
        best = self.study.best_trial
        if self.best is None or self.best[0] != best.number:
            config = self.fit.parser.parse_args([*self.fit_args, *override_args(best.params)])
            self.best = best.number, self.fit.parser.dump(config, skip_none=False)
        return self.best[1]

    def write_outputs(self) -> None:
        write_outputs(self.study, self.folder, self.metric, self.best_config())


def objective_direction(checkpoint: Namespace, metric: str, direction: str | None) -> str:
    """--direction, by default the sense the metric improves in (the checkpoint's mode for a metric of the user's own),
    with which the checkpoint's must then agree when it monitors the metric."""
    senses = {"max": "maximize", "min": "minimize"}
    sense = metric_mode(metric) or (checkpoint.mode if metric == checkpoint.monitor else None)
    if sense is None and direction is None:
        raise ValueError(
            f"--metric {metric} needs --direction maximize or minimize (--checkpoint.mode gives it only for the "
            f"checkpoint's monitor, {checkpoint.monitor})"
        )
    if sense is not None and direction not in (None, senses[sense]):
        raise ValueError(f"--direction {direction}: {metric} is better {'lower' if sense == 'min' else 'higher'}")
    return direction or senses[sense]


def check_metric(metric: str, classes: list[str], multilabel: bool = False) -> None:
    """The metric must be one fit logs at validation: the module's, its loss, or FitReport's per-class F1 (multi-label:
    the ranking and decision metrics, and per-label average precision)."""
    if multilabel:
        module = [*ranking_metrics(len(classes), "val/").keys(), *decision_metrics(len(classes), "val/").keys()]
        per_class = [f"val/ap/{name}" for name in classes]
    else:
        module = list(classification_metrics(len(classes), prefix="val/").keys())
        per_class = [f"val/f1/{name}" for name in classes]
    logged = ["val/loss", *module, *per_class]
    if metric not in logged:
        raise ValueError(f"--metric {metric} is not a metric fit logs at validation; it logs {', '.join(logged)}")


def make_pruner(name: str) -> optuna.pruners.BasePruner:
    """Optuna's median or Hyperband pruner, with Optuna's defaults, or none."""
    pruners = {"median": optuna.pruners.MedianPruner, "hyperband": optuna.pruners.HyperbandPruner}
    return pruners.get(name, optuna.pruners.NopPruner)()


@contextlib.contextmanager
def one_session(folder: Path) -> Iterator[None]:
    """One `classifier tune` at a time per study folder: a second would take the first's running trials for
    killed ones. The lock goes with its process, however it ends."""
    if sys.platform == "win32":  # no fcntl
        yield
        return
    import fcntl

    with open(folder / "tune.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(
                f"another classifier tune is running the study in {folder}: let it finish, or give this one "
                "another --study_name"
            ) from None
        yield


def settings(fit: ParsedCLI) -> dict[str, Any]:
    """fit's config as the trials get it, but for the logger, which the study places itself."""
    config = yaml.safe_load(fit.parser.dump(fit.config, skip_none=False))
    config["trainer"].pop("logger", None)
    return config


def check_resumed(study: optuna.Study, metric: str, direction: str, config: dict[str, Any], search: Any) -> None:
    """Record what a new study runs; refuse to resume one on another metric, and say what else changed."""
    recorded = study.user_attrs
    if recorded and recorded["metric"] != metric:
        raise ValueError(
            f"--metric {metric}: study {study.study_name} scores its trials by {recorded['metric']}, which this one "
            "cannot be compared with; pass that --metric, or start another study (--study_name)"
        )
    if study.direction.name.lower() != direction:
        raise ValueError(
            f"--direction {direction}: study {study.study_name} is a {study.direction.name.lower()} study; pass that "
            "--direction, or start another study (--study_name)"
        )
    if not recorded:
        for key, value in {"metric": metric, "config": config, "search": search}.items():
            study.set_user_attr(key, value)
        return
    changed = [
        f"{key} {theirs!r} there, {mine!r} here"
        for key, (theirs, mine) in differences(recorded["config"], config).items()
    ]
    if recorded["search"] != search:
        changed.append("the search space")
    if changed:
        log.warning("Resuming study %s, whose trials ran with other settings: %s", study.study_name, "; ".join(changed))


def retry_interrupted(study: optuna.Study) -> None:
    """Trials left running by a session that was killed: marked failed, and their parameters run again."""
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        interrupted(study, trial, "its session ended while it ran")


def interrupted(study: optuna.Study, trial: FrozenTrial, reason: str) -> None:
    """Record an interrupted trial as failed, and queue its parameters as a new trial."""
    optuna.Trial(study, trial._trial_id).set_user_attr("error", f"interrupted: {reason}")
    study.tell(trial.number, state=TrialState.FAIL)
    if trial.params:
        study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
    log.warning("Trial %d was interrupted (%s): marked failed, its parameters queued again", trial.number, reason)


def describe(params: dict[str, Any]) -> str:
    """`lr=0.001, batch_size=32`, for log lines."""
    return ", ".join(f"{key}={shown(value)}" for key, value in params.items())
