"""Configs compared and logged as flat `{"model.backbone": value}` maps: one form for parsed namespaces, checkpointed
hyperparameters and YAML files, so resume rules, tune's resumed studies and the loggers agree on what changed."""

from __future__ import annotations

from typing import Any


def plain(value: Any) -> Any:
    """Parsed and checkpointed values in one form: dicts for namespaces (jsonargparse's), lists for tuples."""
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    return value


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """`{"model.backbone": "resnet18", ...}`; a list that holds dicts (callbacks, loggers) by index
    (`trainer.callbacks.0.class_path`), any other list as one value."""
    value = plain(value)
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list) and any(isinstance(item, dict) for item in value):
        items = ((str(index), item) for index, item in enumerate(value))
    else:
        return {prefix: value}
    flat = {}
    for key, item in items:
        flat.update(flatten(item, f"{prefix}.{key}" if prefix else key))
    return flat


def differences(theirs: Any, mine: Any) -> dict[str, tuple[Any, Any]]:
    """`{key: (theirs, mine)}` for each flattened setting whose values differ, a missing one as None."""
    theirs, mine = flatten(theirs), flatten(mine)
    keys = sorted(theirs.keys() | mine.keys())
    return {key: (theirs.get(key), mine.get(key)) for key in keys if theirs.get(key) != mine.get(key)}
