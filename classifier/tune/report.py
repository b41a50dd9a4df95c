"""What `classifier tune` leaves in the study folder, rewritten after every trial: trials.csv, best_params.json,
importance.json, history.png and importance.png; and the table it ends with."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import optuna
from matplotlib.figure import Figure  # no pyplot: files only
from matplotlib.ticker import MaxNLocator
from optuna.importance import FanovaImportanceEvaluator
from optuna.trial import FrozenTrial, TrialState
from rich.table import Table

from classifier.core.atomic import atomic_open, write_json, write_text
from classifier.core.console import print_table
from classifier.core.figures import save_figure

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)  # what --trials counts
SHOWN_TRIALS = 10  # rows of the closing table; trials.csv has them all


def cell(value: Any) -> str:
    """A parameter as text that reads back as itself: strings as they are, the rest as JSON (null, true, 0.001)."""
    return value if isinstance(value, str) else json.dumps(value)


def shown(value: Any) -> str:
    """A parameter for people: floats to 4 significant digits."""
    return f"{value:.4g}" if isinstance(value, float) else cell(value)


def param_names(trials: list[FrozenTrial]) -> list[str]:
    return list(dict.fromkeys(name for trial in trials for name in trial.params))


def write_trials_csv(path: Path, trials: list[FrozenTrial]) -> None:
    """One row per trial: number, state, value, each parameter, duration, run folder, and why it failed."""
    params = param_names(trials)
    with atomic_open(path, newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["number", "state", "value", *params, "duration_s", "run", "retry_of", "error"])
        for trial in trials:
            duration = trial.duration.total_seconds() if trial.duration is not None else None
            writer.writerow([
                trial.number,
                trial.state.name,
                "" if trial.value is None else repr(trial.value),
                *(cell(trial.params[name]) if name in trial.params else "" for name in params),
                "" if duration is None else f"{duration:.1f}",
                trial.user_attrs.get("run", ""),
                trial.user_attrs.get("retry_of", ""),
                trial.user_attrs.get("error", ""),
            ])  # fmt: skip


def write_best_params(path: Path, best: FrozenTrial, metric: str) -> None:
    """The best trial's number, value and parameters, unrounded: they are inputs, to be given again exactly."""
    best_params = {"trial": best.number, "metric": metric, "value": best.value, "params": best.params}
    write_text(path, json.dumps(best_params, indent=2) + "\n")


def importance(study: optuna.Study) -> dict[str, Any]:
    """fANOVA's share of the metric's variance per parameter (seeded, so rewrites agree), over the complete trials;
    or why there is none yet."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    params = param_names(complete)
    result: dict[str, Any] = {"evaluator": "fanova", "complete_trials": len(complete)}
    if len(complete) < 2 or len(params) < 2:
        reason = (
            f"fANOVA needs 2 or more complete trials and parameters; the study has {len(complete)} and {len(params)}"
        )
        return {**result, "importance": None, "reason": reason}
    try:
        found = optuna.importance.get_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=0))
    except RuntimeError as error:  # fANOVA's "zero total variance": every complete trial scored the same
        return {**result, "importance": None, "reason": str(error)}
    return {**result, "importance": {name: float(share) for name, share in found.items()}}


def history_figure(trials: list[FrozenTrial], metric: str, direction: str) -> Figure:
    """Each finished trial's value by trial number, pruned ones at their last report, and the best so far."""
    figure = Figure(figsize=(8, 4.5), dpi=100, layout="constrained")
    axes = figure.subplots()
    complete = [(trial.number, trial.value) for trial in trials if trial.state == TrialState.COMPLETE]
    pruned = [(t.number, t.value) for t in trials if t.state == TrialState.PRUNED and t.value is not None]
    if complete:
        pick = max if direction == "maximize" else min
        best = [pick(value for _, value in complete[: i + 1]) for i in range(len(complete))]
        axes.plot(*zip(*complete, strict=True), "o", color="tab:blue", label="complete")
        axes.step([number for number, _ in complete], best, where="post", color="tab:orange", label="best so far")
    if pruned:
        axes.plot(*zip(*pruned, strict=True), "x", color="tab:gray", label="pruned (last reported value)")
    failed = sum(trial.state == TrialState.FAIL for trial in trials)
    title = f"{metric} per trial ({direction}{f'; {failed} failed, not shown' if failed else ''})"
    axes.set(xlabel="trial", ylabel=metric, title=title)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.grid(alpha=0.3)
    if complete or pruned:
        axes.legend()
    return figure


def importance_figure(shares: dict[str, float], metric: str, trials: int) -> Figure:
    """One bar per parameter, the most important on top."""
    figure = Figure(figsize=(8, 1.5 + 0.45 * len(shares)), dpi=100, layout="constrained")
    axes = figure.subplots()
    names = list(shares)[::-1]
    axes.barh(names, [shares[name] for name in names], color="tab:blue")
    axes.set(xlabel=f"share of the variance of {metric} (fANOVA)", xlim=(0, 1))
    axes.set_title(f"parameter importance ({trials} complete trials)")
    return figure


def write_outputs(study: optuna.Study, folder: Path, metric: str, best_config: str | None) -> None:
    """Every file of the study folder but tune.db, from the study as it is now."""
    trials = study.get_trials(deepcopy=False)
    direction = study.direction.name.lower()
    write_trials_csv(folder / "trials.csv", trials)
    if best_config is not None:
        best = study.best_trial
        write_best_params(folder / "best_params.json", best, metric)
        write_text(folder / "best.yaml", best_config)
    shares = importance(study)
    write_json(folder / "importance.json", shares)
    save_figure(history_figure(trials, metric, direction), folder / "history.png")
    if shares["importance"]:
        figure = importance_figure(shares["importance"], metric, shares["complete_trials"])
        save_figure(figure, folder / "importance.png")


def show_summary(study: optuna.Study, metric: str) -> None:
    """The best finished trials, best first, with their parameters."""
    trials = study.get_trials(deepcopy=False)
    finished = [trial for trial in trials if trial.state in FINISHED and trial.value is not None]
    if not finished:
        return
    reverse = study.direction.name == "MAXIMIZE"
    finished.sort(key=lambda trial: (trial.state != TrialState.COMPLETE, -trial.value if reverse else trial.value))
    counts = {state: sum(trial.state == state for trial in trials) for state in TrialState}
    summary = ", ".join(f"{count} {state.name.lower()}" for state, count in counts.items() if count)
    table = Table(title=f"Study {study.study_name}: {len(trials)} trials ({summary}); best {metric} first")
    params = param_names(finished)
    for column in ("trial", "state", metric, *params, "time"):
        table.add_column(column, justify="left" if column in ("state", *params) else "right")
    for trial in finished[:SHOWN_TRIALS]:
        seconds = trial.duration.total_seconds() if trial.duration is not None else None
        time = "" if seconds is None else f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"
        table.add_row(
            str(trial.number),
            trial.state.name.lower(),
            f"{trial.value:.4f}",
            *(shown(trial.params[name]) if name in trial.params else "" for name in params),
            time,
        )
    print_table(table)
