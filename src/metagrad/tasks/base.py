"""What a task family is: something that samples `TaskBatch`es from an explicit generator."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from metagrad.core import TaskBatch


@runtime_checkable
class TaskDistribution(Protocol):
    """A distribution over tasks; `sample` draws `n_tasks` of them as one `TaskBatch`."""

    def sample(self, n_tasks: int, generator: torch.Generator | None = None) -> TaskBatch: ...


def check_positive(**kwargs: int) -> None:
    """Raise a clear error for a count argument that is not a positive integer."""
    for name, value in kwargs.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
