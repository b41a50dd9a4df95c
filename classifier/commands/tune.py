"""`classifier tune --config X --search S --trials N`: run or resume an Optuna study over fit's options, each trial a
real fit in its own run folder (the engine: `classifier.tune`)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import optuna
import yaml

from classifier.cli.base import SINGLE_LABEL_MONITOR, ParsedCLI
from classifier.core.console import lightning_silenced
from classifier.tune.report import show_summary
from classifier.tune.search_space import check_search_space, load_search_space
from classifier.tune.study import (
    PRUNERS,
    Session,
    check_metric,
    check_resumed,
    make_pruner,
    objective_direction,
    one_session,
    retry_interrupted,
    settings,
)
from classifier.tune.trial import check_one_process, logger_place

log = logging.getLogger(__name__)

MULTILABEL_MONITOR = "val/map"  # fit's checkpoint monitor for multi-label data (cli.base), so the study's default


def tune(argv: list[str], pruner: optuna.pruners.BasePruner | None = None) -> Path:
    """Run or resume the study `argv` describes until it holds `--trials` finished trials (complete or pruned);
    returns its folder. From Python, `pruner` replaces --pruner's."""
    parser = argparse.ArgumentParser(
        prog="classifier tune",
        description="Search fit's options with Optuna. Each trial is a fit in <study folder>/trials/trial_N, given "
        "every option not listed here (--config, --data.data_dir, --trainer.max_epochs...) and its parameters. The "
        "same command resumes the study.",
        exit_on_error=False,
        allow_abbrev=False,  # fit's options pass through whole
    )
    parser.add_argument("--search", type=Path, metavar="FILE", help="YAML: fit options (dotted) and distributions")
    parser.add_argument("--trials", type=int, default=20, help="finished trials (complete or pruned) the study is to "
                        "hold; a resumed study runs the missing ones (default 20)")  # fmt: skip
    parser.add_argument("--timeout", type=float, metavar="SECONDS", help="start no new trial after this long")
    parser.add_argument("--metric", help="the val/ metric to optimize (default: --checkpoint.monitor's)")
    parser.add_argument("--direction", choices=("maximize", "minimize"), help="default: --checkpoint.mode's")
    parser.add_argument("--pruner", choices=PRUNERS, default="median", help="Optuna's, with its defaults: median "
                        "stops a trial whose value is worse than the median of earlier ones at the same epoch, "
                        "from the 6th trial on (default median)")  # fmt: skip
    parser.add_argument("--study_name", help="default: the logger's name; the study's folder is <save_dir>/<name>/tune")
    parser.add_argument("--storage", help="an Optuna storage URL (default: sqlite:///<study folder>/tune.db)")
    options, fit_args = parser.parse_known_args(argv)
    if options.search is None:
        raise ValueError("classifier tune needs --search FILE, the fit options to search (see configs/search/)")
    if options.trials < 1:
        raise ValueError(f"--trials {options.trials}: 1 or more finished trials are needed")
    with lightning_silenced():
        fit = ParsedCLI(args=fit_args, run=False)
    multilabel = fit.datamodule.task == "multilabel"
    if multilabel and fit.config.checkpoint.monitor == SINGLE_LABEL_MONITOR:  # as each trial's fit monitors it
        fit.config.checkpoint.monitor = fit.config.early_stopping.monitor = MULTILABEL_MONITOR
    metric = options.metric or fit.config.checkpoint.monitor
    check_metric(metric, fit.datamodule.class_names, multilabel)
    direction = objective_direction(fit.config.checkpoint, metric, options.direction)
    space = load_search_space(options.search)
    for config in [fit.config, *check_search_space(space, fit.parser, fit_args, options.search)]:
        check_one_process(config.trainer)
    save_dir, logger_name = logger_place(fit.config.trainer)
    study_name = options.study_name or logger_name
    folder = Path(save_dir) / study_name / "tune"
    folder.mkdir(parents=True, exist_ok=True)
    with one_session(folder):
        study = optuna.create_study(
            storage=options.storage or f"sqlite:///{folder / 'tune.db'}",
            study_name=study_name,
            direction=direction,
            load_if_exists=True,
            pruner=pruner or make_pruner(options.pruner),
        )
        seed = fit.config.seed_everything
        # seeded past the trials so far: a resumed session must not draw the first session's parameters again
        study.sampler = optuna.samplers.TPESampler(seed=seed + len(study.trials) if type(seed) is int else None)
        check_resumed(study, metric, direction, settings(fit), yaml.safe_load(options.search.read_text()))
        retry_interrupted(study)
        Session(study, space, fit_args, fit, folder, metric).run(options.trials, options.timeout)
    show_summary(study, metric)
    if (folder / "best.yaml").is_file():
        log.info(
            "Best: trial %d, %s = %.4f. Its config: %s\nTrain with it: classifier fit --config %s",
            study.best_trial.number, metric, study.best_value, folder / "best.yaml", folder / "best.yaml",
        )  # fmt: skip
    return folder
