"""`classifier tune`'s search space: a YAML file of fit's options (dotted keys), each with an Optuna distribution,
checked against fit's own parser before any trial trains."""

from __future__ import annotations

import difflib
from argparse import ArgumentError
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import ArgumentParser, Namespace
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from classifier.core.console import parse_error_line

FIELDS = {"float": ("low", "high", "log", "step"), "int": ("low", "high", "log", "step"), "categorical": ("choices",)}
EXAMPLE = "`model.label_smoothing: {type: float, low: 0.0, high: 0.2}`"


def load_search_space(path: Path) -> dict[str, BaseDistribution]:
    """`{option: distribution}`, in the file's order, from entries such as
    `model.optimizer.init_args.lr: {type: float, low: 1e-4, high: 1e-2, log: true}`,
    `trainer.max_epochs: {type: int, low: 5, high: 20, step: 5}` or `data.batch_size: {type: categorical,
    choices: [32, 64]}`."""
    if not path.is_file():
        raise FileNotFoundError(f"--search {path} does not exist")
    try:
        entries = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ValueError(f"--search {path} is not YAML: {' '.join(str(error).split())}") from None
    if not isinstance(entries, dict) or not entries:
        raise ValueError(f"--search {path}: expected fit options, each with a distribution, such as {EXAMPLE}")
    return {str(key): _distribution(f"--search {path}: {key}", spec) for key, spec in entries.items()}


def _distribution(where: str, spec: Any) -> BaseDistribution:
    kind = spec.get("type") if isinstance(spec, dict) else None
    if kind not in FIELDS:
        raise ValueError(f"{where}: expected {{type: float, int or categorical, ...}}, as in {EXAMPLE}; got {spec!r}")
    unknown = sorted(set(spec) - {"type", *FIELDS[kind]})
    if unknown:
        raise ValueError(f"{where}: {', '.join(unknown)}: a {kind} takes {', '.join(FIELDS[kind])}")
    try:
        if kind == "categorical":
            choices = spec.get("choices")
            if not isinstance(choices, list) or not choices:
                raise ValueError("choices: a list of values is needed")
            if not all(choice is None or isinstance(choice, (bool, int, float, str)) for choice in choices):
                raise ValueError(f"choices {choices}: each must be null, a boolean, a number or a string (Optuna's)")
            return CategoricalDistribution(choices)
        missing = [name for name in ("low", "high") if name not in spec]
        if missing:
            raise ValueError(f"{' and '.join(missing)} needed")
        low, high, step = (_number(spec.get(name), kind, name) for name in ("low", "high", "step"))
        if kind == "float":
            return FloatDistribution(low, high, log=bool(spec.get("log", False)), step=step)
        return IntDistribution(low, high, log=bool(spec.get("log", False)), step=1 if step is None else step)
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None


def _number(value: Any, kind: str, name: str) -> float | int | None:
    """A bound or step as its distribution's type; YAML reads `1e-4` (no dot) as a string."""
    if value is None:
        return None
    if kind == "int" and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind == "float" and not isinstance(value, bool):
        try:
            return float(value)
        except (TypeError, ValueError):
            pass
    raise ValueError(f"{name}: {value!r} is not {'an integer' if kind == 'int' else 'a number'}")


def override_args(params: dict[str, Any]) -> list[str]:
    """fit's arguments that set `params` (dotted options), each as a YAML `--config` of its own, in order: typed
    values, where a flag's text is read by the option's type (`null` stays a string for a `str` option)."""
    args = []
    for key, value in params.items():
        for part in reversed(key.split(".")):
            value = {part: value}
        args += ["--config", yaml.safe_dump(value)]
    return args


def candidates(distribution: BaseDistribution) -> list[Any]:
    """The values that bound a distribution: its choices, or its low and high."""
    if isinstance(distribution, CategoricalDistribution):
        return list(distribution.choices)
    return [distribution.low, distribution.high]


def check_search_space(
    space: dict[str, BaseDistribution], parser: ArgumentParser, fit_args: list[str], path: Path
) -> list[Namespace]:
    """Parse fit's config with each option's bounds or choices, so that an option fit does not have, a value its
    parser refuses, or an option the config ignores (a link sets it) stops the command before any trial trains.
    Returns the configs parsed."""
    base = parse(parser, fit_args)
    options = [key for key in base.keys() if key != "config"]
    parsed = []
    for key, distribution in space.items():
        hint = difflib.get_close_matches(key, [option for option in options if option != key], n=3, cutoff=0.6)
        hint = f" (did you mean {' or '.join(hint)}?)" if hint else ""
        if key not in base:
            raise ValueError(f"--search {path}: {key} is not an option of fit with this config{hint}")
        configs = []
        for value in candidates(distribution):
            try:
                configs.append(parse(parser, [*fit_args, *override_args({key: value})]))
            except ArgumentError as error:
                raise ValueError(f"--search {path}: {key} {value!r}: {parse_error_line(str(error))}") from None
        if len(set(map(repr, candidates(distribution)))) > 1 and all(_same(config, base) for config in configs):
            raise ValueError(
                f"--search {path}: {key} changes nothing in fit's config: a link sets it from another option "
                f"(search that one){hint}"
            )
        parsed += configs
    return parsed


def _same(config: Namespace, other: Namespace) -> bool:
    """Whether two parsed configs hold the same options, whichever --config files or texts they came from."""
    config, other = config.clone(), other.clone()
    for namespace in (config, other):
        namespace.pop("config", None)
    return config == other


def parse(parser: ArgumentParser, args: list[str]) -> Namespace:
    """fit's config from `args`; a mistake raises ArgumentError rather than ending the process."""
    exit_on_error, parser.exit_on_error = parser.exit_on_error, False
    try:
        return parser.parse_args(args)
    finally:
        parser.exit_on_error = exit_on_error
