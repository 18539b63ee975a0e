"""Sinusoid regression of the MAML paper (Finn et al. 2017, section 5.1).

Each task is y = A sin(x - phase) with amplitude A ~ U[0.1, 5.0] and phase ~ U[0, pi];
inputs x ~ U[-5, 5]. K support points per task (K = 5, 10 or 20 in the paper) and
`query_shots` query points from the same task.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from metagrad.core import TaskBatch
from metagrad.tasks.base import check_positive, family


@family("sinusoid")
@dataclass
class Sinusoid:
    """Task family of sinusoids; `sample(n, generator)` gives support `[n, shots, 1]`, query `[n, query_shots, 1]`."""

    shots: int = 10
    query_shots: int = 10
    amplitude: tuple[float, float] = (0.1, 5.0)
    phase: tuple[float, float] = (0.0, math.pi)
    x_range: tuple[float, float] = (-5.0, 5.0)
    dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        check_positive(shots=self.shots, query_shots=self.query_shots)
        for name in ("amplitude", "phase", "x_range"):
            lo, hi = getattr(self, name)
            if not lo <= hi:
                raise ValueError(f"{name} must be (low, high) with low <= high, got {(lo, hi)}")

    def sample_params(
        self, n_tasks: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Amplitudes and phases `[n_tasks]` of fresh tasks."""
        check_positive(n_tasks=n_tasks)
        u = torch.rand(2, n_tasks, generator=generator, dtype=self.dtype)
        amp = self.amplitude[0] + (self.amplitude[1] - self.amplitude[0]) * u[0]
        phase = self.phase[0] + (self.phase[1] - self.phase[0]) * u[1]
        return amp, phase

    def points(self, amp: torch.Tensor, phase: torch.Tensor, n: int,
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`n` random points of each task: x, y `[tasks, n, 1]`."""
        lo, hi = self.x_range
        x = lo + (hi - lo) * torch.rand(len(amp), n, 1, generator=generator, dtype=self.dtype)
        return x, self.function(amp, phase, x)

    @staticmethod
    def function(amp: torch.Tensor, phase: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """y = A sin(x - phase) for each task's (A, phase) over x `[tasks, n, 1]`."""
        return amp[:, None, None] * torch.sin(x - phase[:, None, None])

    def sample(self, n_tasks: int, generator: torch.Generator | None = None) -> TaskBatch:
        """`n_tasks` tasks with `shots` support and `query_shots` query points each."""
        amp, phase = self.sample_params(n_tasks, generator)
        sx, sy = self.points(amp, phase, self.shots, generator)
        qx, qy = self.points(amp, phase, self.query_shots, generator)
        return TaskBatch(sx, sy, qx, qy)
