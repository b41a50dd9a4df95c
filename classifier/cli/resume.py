"""Settings restored from a checkpoint below the user's flags, and the rules of `--ckpt_path last`: which run a
config continues, and which changed settings a checkpoint's weights refuse."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from jsonargparse import Namespace

from classifier.cli.run_folders import logger_root
from classifier.core.config import plain
from classifier.model.checkpoints import MACHINE_SETTINGS, read_checkpoint

log = logging.getLogger(__name__)

# (source, target, when): the model and the data agree on these, so no config repeats them
LINKS = (
    ("model.backbone", "data.backbone", "parse"),
    ("data.image_size", "model.image_size", "parse"),
    ("data.class_names", "model.class_names", "instantiate"),
    ("data.preprocessing", "model.preprocessing", "instantiate"),
    ("data.task", "model.task", "instantiate"),
)
# settings of evaluation, which a run may change between sessions; every other model and data setting (the batch
# size too: it sets the steps per epoch and the schedule) defines the run that `--ckpt_path last` finds
EVAL_SETTINGS = frozenset({"model.tta", "model.thresholds", "model.reject"})
EVALUATIONS = ("validate", "test", "predict")
# what a checkpoint's weights were built for: with another value they cannot load, or would mean another model
NETWORK_SETTINGS = ("model.backbone", "data.image_size", "data.classes", "model.head_hidden_dims")
# Lightning's names for a checkpoint its own trainer made or finds: none exists in a fresh evaluation process
LIGHTNING_CHECKPOINT_NAMES = ("best", "last", "hpc", "registry")


def checkpoint_settings(ckpt_path: str | Path) -> dict[str, dict[str, Any]]:
    """The model and data arguments a checkpoint was trained with, less those that links derive and those of the
    machine it ran on (a checkpoint trained with `--data.decode gpu` tests on a CPU)."""
    checkpoint = read_checkpoint(ckpt_path)
    derived = {target for _, target, _ in LINKS}
    settings = {}
    for group, key in (("model", "hyper_parameters"), ("data", "datamodule_hyper_parameters")):
        hparams = checkpoint.get(key) or {}
        settings[group] = {
            name: value
            for name, value in hparams.items()
            if not name.startswith("_") and f"{group}.{name}" not in derived | MACHINE_SETTINGS
        }
    return {group: values for group, values in settings.items() if values}


def run_differences(config: Namespace, ckpt_path: Path) -> dict[str, tuple[Any, Any]]:
    """`{setting: (this config's value, the checkpoint's)}` for each run-defining setting where they differ."""
    differences = {}
    for group, saved in checkpoint_settings(ckpt_path).items():
        for name, theirs in saved.items():
            key = f"{group}.{name}"
            if key in EVAL_SETTINGS or name not in config[group]:
                continue
            mine = config[group][name]
            if key == "data.classes" and mine is None:  # fit fills it in from the folders
                continue
            if plain(mine) != plain(theirs):
                differences[key] = (mine, theirs)
    return differences


def check_resumable(config: Namespace, subcommand: str, ckpt_path: Path) -> None:
    """Refuse, before any training, settings given on top of a checkpoint that its weights cannot take; say which
    other settings a resumed fit changes."""
    differences = run_differences(config, ckpt_path)
    shown = {key: f"{key} {theirs!r} there, {mine!r} here" for key, (mine, theirs) in differences.items()}
    refused = [shown[key] for key in NETWORK_SETTINGS if key in differences]
    if refused:
        raise ValueError(
            f"--ckpt_path {ckpt_path} was trained with other settings: {'; '.join(refused)}. Its weights fit only "
            f"its own: drop these options (the checkpoint brings its settings), or train a new run without "
            "--ckpt_path"
        )
    if subcommand == "fit" and differences:
        log.warning("Resuming %s with changed settings: %s", ckpt_path, "; ".join(shown.values()))


def find_last_checkpoint(config: Namespace) -> Path | None:
    """The newest `last.ckpt` of this config's runs: those with its model and data settings, fold included.

    Without one, a run of another fold of the same cross-validation means a fresh start; other runs, an error.
    """
    root = logger_root(config.trainer)
    if root is None:
        raise ValueError("--ckpt_path last needs a TensorBoard or CSV logger, to find the runs of this config")
    found = sorted(root.glob("version_*/checkpoints/last.ckpt"), key=lambda path: path.stat().st_mtime, reverse=True)
    if not found:
        log.warning("--ckpt_path last: no earlier run with a last.ckpt; training from scratch.")
        return None
    differences = {path: run_differences(config, path) for path in found}
    matching = [path for path in found if not differences[path]]
    if matching:
        return matching[0]
    if any(set(differing) == {"data.fold"} for differing in differences.values()):
        log.warning("--ckpt_path last: other folds have runs, fold %s none; training from scratch.", config.data.fold)
        return None
    newest = found[0]
    listed = ", ".join(
        f"{key} ({mine!r} here, {theirs!r} there)" for key, (mine, theirs) in differences[newest].items()
    )
    raise ValueError(
        f"--ckpt_path last: none of the {len(found)} runs under {root} has this config's settings; the newest, "
        f"{newest}, differs in {listed}. To continue it with these settings, pass --ckpt_path {newest}; to start a "
        "new run, give this config its own logger name or save_dir."
    )
