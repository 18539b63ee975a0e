"""Protected groups as tasks: detecting hypoxemia from pulse oximetry whose error depends on the group.

The simulated model (after Sjoding et al., "Racial bias in pulse oximetry measurement", N. Engl. J. Med.
383, 2477, 2020: pulse oximeters overestimate arterial saturation in some groups, hiding hypoxemia):

    arterial saturation   SaO2 ~ N(mu_a, 4^2) %           label y = 1[SaO2 < 88 %] (hypoxemia)
    oximeter reading      SpO2 = SaO2 + delta_a + N(0, sigma_a^2)
    respiratory rate      RR   = 16 + 0.5 (91 - SaO2) + N(0, 3^2)  per minute (same law in every group)

The reference group (a = 0) has mu = 91, delta = 0, sigma = 1.5. Each task is one protected group (a = 1)
with its own mu ~ U[89, 93], device bias delta ~ U[-2, 6] and noise sigma ~ U[1, 2]. A model sees
`[a, (SpO2 - 91) / 4, (RR - 16) / 4]` and the labels carry the group so that a loss can measure fairness:

    support_x [tasks, 2 * shots, 3],  support_y [tasks, 2 * shots, 2] = (y, a)
    query_x   [tasks, 2 * query_shots, 3], query_y likewise

Half of each set is the task's group, half the reference group (whose records are plentiful in practice).
`Fairness.from_records` builds the same TaskBatch from user records (the loader hook).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from metagrad.core import TaskBatch
from metagrad.tasks.base import check_positive, family
from metagrad.tasks.records import record_columns

REFERENCE = {"mu": 91.0, "delta": 0.0, "sigma": 1.5}


@family("fairness")
@dataclass
class Fairness:
    """One protected group per task; `sample(n, generator)` gives x `[n, 2*shots, 3]`, (y, a) `[n, 2*shots, 2]`."""

    shots: int = 10
    query_shots: int = 500
    mu: tuple[float, float] = (89.0, 93.0)
    delta: tuple[float, float] = (-2.0, 6.0)
    sigma: tuple[float, float] = (1.0, 2.0)
    dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        check_positive(shots=self.shots, query_shots=self.query_shots)
        for name in ("mu", "delta", "sigma"):
            lo, hi = getattr(self, name)
            if not lo <= hi:
                raise ValueError(f"{name} must be (low, high) with low <= high, got {(lo, hi)}")
        if self.sigma[0] < 0:
            raise ValueError(f"sigma must be non-negative, got {self.sigma}")

    def sample_groups(self, n_tasks: int, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Parameters (mu, delta, sigma) of `n_tasks` fresh protected groups, each `[n_tasks]`."""
        check_positive(n_tasks=n_tasks)
        u = torch.rand(3, n_tasks, generator=generator, dtype=self.dtype)
        return {k: lo + (hi - lo) * u[i] for i, (k, (lo, hi)) in
                enumerate((("mu", self.mu), ("delta", self.delta), ("sigma", self.sigma)))}

    def individuals(self, group: dict[str, Tensor], a: float, n: int, generator: torch.Generator | None = None
                    ) -> tuple[Tensor, Tensor]:
        """`n` individuals per task of a group with parameters `group[k] [tasks]`: x `[tasks, n, 3]`,
        (y, a) `[tasks, n, 2]`."""
        tasks = len(group["mu"])
        eps = torch.randn(3, tasks, n, generator=generator, dtype=self.dtype)
        sao2 = group["mu"][:, None] + 4.0 * eps[0]
        spo2 = sao2 + group["delta"][:, None] + group["sigma"][:, None] * eps[1]
        rr = 16.0 + 0.5 * (91.0 - sao2) + 3.0 * eps[2]
        y = (sao2 < 88.0).to(self.dtype)
        return features(torch.full_like(y, a), spo2, rr), torch.stack([y, torch.full_like(y, a)], -1)

    def sample(self, n_tasks: int, generator: torch.Generator | None = None) -> TaskBatch:
        """`n_tasks` new protected groups, each with `shots` (support) and `query_shots` (query) individuals
        of its own and as many of the reference group."""
        grp = self.sample_groups(n_tasks, generator)
        ref = {k: torch.full((n_tasks,), v, dtype=self.dtype) for k, v in REFERENCE.items()}
        parts = [self.individuals(g, a, n, generator) for n in (self.shots, self.query_shots)
                 for g, a in ((grp, 1.0), (ref, 0.0))]
        sx, sy = (torch.cat([parts[0][i], parts[1][i]], 1) for i in range(2))
        qx, qy = (torch.cat([parts[2][i], parts[3][i]], 1) for i in range(2))
        return TaskBatch(sx, sy, qx, qy)

    @staticmethod
    def from_records(a: Tensor, spo2: Tensor, rr: Tensor, y: Tensor, shots: int) -> TaskBatch:
        """User records `[tasks, n]` (group a in {0, 1}, SpO2 %, respiratory rate per minute, label y in {0, 1}):
        the first `shots` records of each task are the support, the rest the query."""
        arrays = record_columns(shots, a=a, spo2=spo2, rr=rr, y=y)
        for name in ("a", "y"):
            if not ((arrays[name] == 0) | (arrays[name] == 1)).all():
                raise ValueError(f"{name} must hold only 0/1 values")
        x = features(*(arrays[k].float() for k in ("a", "spo2", "rr")))
        lab = torch.stack([arrays["y"].float(), arrays["a"].float()], -1)
        return TaskBatch(x[:, :shots], lab[:, :shots], x[:, shots:], lab[:, shots:])


def features(a: Tensor, spo2: Tensor, rr: Tensor) -> Tensor:
    """The model's inputs `[..., 3]`: group indicator and standardised readings."""
    return torch.stack([a, (spo2 - 91.0) / 4.0, (rr - 16.0) / 4.0], -1)
