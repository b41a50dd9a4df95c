"""Module paths from before the layered package (0.1's flat modules), still importable: configs and scripts name
classes by path (`class_path: classifier.tracking.MLFlowLogger`), and LightningCLI resolves them by import."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from importlib.machinery import ModuleSpec
from types import ModuleType

MOVED = {
    "classifier.atomic": "classifier.core.atomic",
    "classifier.audit": "classifier.quality.audit",
    "classifier.audit_figures": "classifier.quality.figures",
    "classifier.backbones": "classifier.model.backbones",
    "classifier.cache": "classifier.data.ram_cache",
    "classifier.calibrate": "classifier.evaluation.calibration",
    "classifier.callbacks": "classifier.training.callbacks",
    "classifier.cams": "classifier.evaluation.cams",
    "classifier.check_data": "classifier.commands.check_data",
    "classifier.checkpoints": "classifier.model.checkpoints",
    "classifier.cli": "classifier.cli.base",
    "classifier.console": "classifier.core.console",
    "classifier.cv": "classifier.commands.cv",
    "classifier.data": "classifier.data.datamodule",
    "classifier.device_augment": "classifier.data.device_augment",
    "classifier.digits": "classifier.data.digits",
    "classifier.duplicates": "classifier.data.duplicates",
    "classifier.embeddings": "classifier.evaluation.embeddings",
    "classifier.entry": "classifier.cli.entry",
    "classifier.evaluation": "classifier.evaluation.predictions",
    "classifier.explain": "classifier.commands.explain",
    "classifier.export": "classifier.deploy.export",
    "classifier.faults": "classifier.training.faults",
    "classifier.hparams": "classifier.training.hparams",
    "classifier.imageio": "classifier.core.imageio",
    "classifier.images": "classifier.data.images",
    "classifier.label_issues": "classifier.quality.label_issues",
    "classifier.launched": "classifier.cli.launched",
    "classifier.losses": "classifier.model.losses",
    "classifier.module": "classifier.model.module",
    "classifier.net": "classifier.model.net",
    "classifier.parity": "classifier.deploy.parity",
    "classifier.predictor": "classifier.deploy.predictor",
    "classifier.preprocess": "classifier.deploy.preprocess",
    "classifier.reports": "classifier.evaluation.reports",
    "classifier.runs": "classifier.commands.runs",
    "classifier.runtime": "classifier.deploy.onnx_predictor",
    "classifier.samplers": "classifier.data.samplers",
    "classifier.search_space": "classifier.tune.search_space",
    "classifier.serve.command": "classifier.commands.serve",
    "classifier.splits": "classifier.data.splits",
    "classifier.tracking": "classifier.training.tracking",
    "classifier.trainer": "classifier.training.trainer",
    "classifier.tta": "classifier.model.tta",
    "classifier.tune": "classifier.tune.study",
    "classifier.tune_report": "classifier.tune.report",
    "classifier.tune_trial": "classifier.tune.trial",
    "classifier.tuning": "classifier.training.lr_find",
    "classifier.verification": "classifier.data.file_facts",
}
# old modules whose names are now packages: their attributes are found in the module that took their place
PACKAGES = {old: new for old, new in MOVED.items() if new.startswith(old + ".")}


class MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports an old module path as the module that holds its code now (the same module object)."""

    def find_spec(self, name: str, path: object = None, target: object = None) -> ModuleSpec | None:
        if name not in MOVED or name in PACKAGES:
            return None
        return importlib.util.spec_from_loader(name, self)

    def create_module(self, spec: ModuleSpec) -> ModuleType:
        return importlib.import_module(MOVED[spec.name])

    def exec_module(self, module: ModuleType) -> None:
        """Nothing to run: the module was imported, under its new path, by `create_module`."""


def install() -> None:
    """Let the old paths import, once per process."""
    if not any(isinstance(finder, MovedModules) for finder in sys.meta_path):
        sys.meta_path.append(MovedModules())


def old_attribute(package: str, name: str) -> object:
    """An attribute of an old module whose path is now a package (`classifier.data.ImageFolderDataModule`)."""
    if package not in PACKAGES:
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    return getattr(importlib.import_module(PACKAGES[package]), name)
