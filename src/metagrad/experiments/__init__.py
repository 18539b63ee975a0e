"""Named, runnable experiments: `metagrad run NAME`.

Each module in this package registers one or more experiments with `@experiment(name, summary,
Config)`. `Config` is a dataclass whose fields are the experiment's hyper-parameters (with the
papers' words: inner_lr, inner_steps, ...); the function receives the resolved config and a `Run`,
writes its plots and returns the results dict that goes into results.json, including a `table`
(list of rows) that the CLI prints.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from metagrad.runs import Run


@dataclass
class Experiment:
    """A registered experiment: its name, one-line summary, config class and entry point."""

    name: str
    summary: str
    config_cls: type
    fn: Callable[[Any, Run], dict[str, Any]]

    def make_config(self, overrides: dict[str, Any] | None = None) -> Any:
        """The default config with `overrides` applied; unknown keys are a clear error."""
        return make_config(self.config_cls, overrides or {}, f"experiment {self.name!r}")


def make_config(config_cls: type, overrides: dict[str, Any], what: str) -> Any:
    """`config_cls()` with `overrides` applied, strings converted to each field's type; unknown keys are errors."""
    fields = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise KeyError(f"unknown config key(s) {unknown} for {what}; valid keys: {sorted(fields)}")
    cfg = config_cls()
    for key, value in overrides.items():
        setattr(cfg, key, coerce(value, getattr(cfg, key), key))
    return cfg


REGISTRY: dict[str, Experiment] = {}


def coerce(value: Any, default: Any, key: str) -> Any:
    """Convert a command-line string (or a JSON list) to the type of the default value."""
    if isinstance(value, list) and isinstance(default, tuple):
        return tuple(value)
    if not isinstance(value, str) or isinstance(default, str):
        return value
    if isinstance(default, dict):  # argument tables, e.g. algorithm_args='{"lslr": true}'
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = None
        if not isinstance(parsed, dict):
            raise ValueError(f"config key {key!r} expects a JSON object, got {value!r}")
        return parsed
    if default is None:  # an optional value: a number or null if it parses as one, else the string
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    try:
        if isinstance(default, bool):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if isinstance(default, int):
            return int(value)
        if isinstance(default, float):
            return float(value)
        if isinstance(default, (list, tuple)):
            items = [x for x in value.split(",") if x]
            kind = type(default[0]) if default else str
            return type(default)(kind(x) for x in items)
    except ValueError:
        raise ValueError(f"config key {key!r} expects {type(default).__name__}, got {value!r}") from None
    return value


def experiment(name: str, summary: str, config_cls: type) -> Callable:
    """Register `fn(cfg, run) -> results` as the experiment `name`."""
    def register(fn: Callable[[Any, Run], dict[str, Any]]) -> Callable:
        if name in REGISTRY:
            raise ValueError(f"experiment {name!r} registered twice")
        REGISTRY[name] = Experiment(name, summary, config_cls, fn)
        return fn

    return register


def load_all() -> dict[str, Experiment]:
    """Import every experiment module and return the registry."""
    for mod in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{mod.name}")
    return REGISTRY


def get(name: str) -> Experiment:
    """The experiment called `name`, or a clear error listing the known ones."""
    registry = load_all()
    if name not in registry:
        raise KeyError(f"unknown experiment {name!r}; known: {', '.join(sorted(registry))}")
    return registry[name]
