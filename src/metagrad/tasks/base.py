"""What a task family is: something that samples `TaskBatch`es from an explicit generator."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from metagrad.core import TaskBatch


@runtime_checkable
class TaskDistribution(Protocol):
    """A distribution over tasks; `sample` draws `n_tasks` of them as one `TaskBatch`."""

    def sample(self, n_tasks: int, generator: torch.Generator | None = None) -> TaskBatch: ...


FAMILIES: dict[str, type] = {}


def family(name: str):
    """Register a task family class under `name` (for the CLI's `--tasks NAME` and config files)."""
    def register(cls: type) -> type:
        if name in FAMILIES and FAMILIES[name] is not cls:
            raise ValueError(f"task family {name!r} registered twice")
        FAMILIES[name] = cls
        return cls

    return register


def load_families() -> dict[str, type]:
    """Import every module of `metagrad.tasks` and return the registry of task families."""
    import importlib
    import pkgutil

    import metagrad.tasks as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"metagrad.tasks.{mod.name}")
    return FAMILIES


def get_family(name: str) -> type:
    """The task family registered as `name`, or a clear error listing the known ones."""
    families = load_families()
    if name not in families:
        raise KeyError(f"unknown task family {name!r}; known: {', '.join(sorted(families))}")
    return families[name]


def check_positive(**kwargs: int) -> None:
    """Raise a clear error for a count argument that is not a positive integer."""
    for name, value in kwargs.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
