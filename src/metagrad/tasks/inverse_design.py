"""Inverse design of a single-layer anti-reflection coating for a target wavelength.

A coating of refractive index n and thickness d reflects least at the quarter-wave condition
n d = lambda / 4 (first order; Hecht, "Optics", 5th ed., section 9.7.1), so its property is

    lambda_min(n, d) = 4 n d

Admissible designs: n in [1.3, 2.5] (from MgF2 to TiO2-like films) and d in [50, 250] nm. A task is a
target wavelength lambda* ~ U[600, 1000] nm; its examples are designs that hit it: n ~ U[1.3, 2.5] and
d = lambda* / (4 n) (1 + eps), eps ~ N(0, `tolerance`^2) (fabrication scatter). A generative model
adapted on a few of them should propose new designs on the whole curve n d = lambda* / 4. A candidate
is a hit when it is admissible and |lambda_min - lambda*| <= `hit_tolerance` lambda*.

Designs are given to models in scaled coordinates `[(n - 1.9) / 0.6, (d - 150 nm) / 100 nm]`:
support_x `[tasks, shots, 2]`; support_y `[tasks, shots, 1]` holds lambda* (the same for every example
of a task, for evaluation: the generative model's loss uses only x). `InverseDesign.from_records` is the
loader hook for measured designs of the same shape.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from metagrad.core import TaskBatch
from metagrad.tasks.base import check_positive, family

N_RANGE = (1.3, 2.5)
D_RANGE = (50.0, 250.0)  # nm


def to_scaled(n: Tensor, d: Tensor) -> Tensor:
    """Designs (n, d in nm) `[...]` to model coordinates `[..., 2]`."""
    return torch.stack([(n - 1.9) / 0.6, (d - 150.0) / 100.0], -1)


def from_scaled(u: Tensor) -> tuple[Tensor, Tensor]:
    """Model coordinates `[..., 2]` to (n, d in nm)."""
    return 1.9 + 0.6 * u[..., 0], 150.0 + 100.0 * u[..., 1]


def wavelength(u: Tensor) -> Tensor:
    """lambda_min = 4 n d (nm) of scaled designs `[..., 2]`."""
    n, d = from_scaled(u)
    return 4.0 * n * d


def hits(u: Tensor, target: Tensor, hit_tolerance: float = 0.02) -> Tensor:
    """Whether each scaled design `[..., 2]` is admissible and within `hit_tolerance` of `target` (nm, broadcast)."""
    n, d = from_scaled(u)
    admissible = (n >= N_RANGE[0]) & (n <= N_RANGE[1]) & (d >= D_RANGE[0]) & (d <= D_RANGE[1])
    return admissible & ((wavelength(u) - target).abs() <= hit_tolerance * target)


@family("inverse-design")
@dataclass
class InverseDesign:
    """Target wavelengths as tasks; `sample(n, generator)` gives designs `[n, shots, 2]` and targets `[n, shots, 1]`."""

    shots: int = 5
    query_shots: int = 50
    target: tuple[float, float] = (600.0, 1000.0)
    tolerance: float = 0.01
    dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        check_positive(shots=self.shots, query_shots=self.query_shots)
        lo, hi = self.target
        if not 4 * N_RANGE[1] * D_RANGE[0] <= lo <= hi <= 4 * N_RANGE[0] * D_RANGE[1]:
            raise ValueError(f"target must be (low, high) inside [500, 1300] nm, where every admissible n "
                             f"has an admissible d; got {self.target}")
        if not self.tolerance >= 0:
            raise ValueError(f"tolerance must be >= 0, got {self.tolerance!r}")

    def designs(self, target: Tensor, n: int, generator: torch.Generator | None = None) -> Tensor:
        """`n` designs hitting each target `[tasks]`, scaled: `[tasks, n, 2]`."""
        u = torch.rand(len(target), n, generator=generator, dtype=self.dtype)
        eps = torch.randn(len(target), n, generator=generator, dtype=self.dtype)
        idx = N_RANGE[0] + (N_RANGE[1] - N_RANGE[0]) * u
        thick = target[:, None] / (4 * idx) * (1 + self.tolerance * eps)
        return to_scaled(idx, thick)

    def sample(self, n_tasks: int, generator: torch.Generator | None = None) -> TaskBatch:
        """`n_tasks` targets with `shots` support and `query_shots` query designs each."""
        check_positive(n_tasks=n_tasks)
        lo, hi = self.target
        target = lo + (hi - lo) * torch.rand(n_tasks, generator=generator, dtype=self.dtype)
        sx, qx = self.designs(target, self.shots, generator), self.designs(target, self.query_shots, generator)
        return TaskBatch(sx, target[:, None, None].expand(-1, self.shots, 1), qx,
                         target[:, None, None].expand(-1, self.query_shots, 1))

    @staticmethod
    def from_records(n: Tensor, d: Tensor, target: Tensor, shots: int) -> TaskBatch:
        """Designs known to hit each task's target: index n and thickness d (nm) `[tasks, m]`, target
        wavelength (nm) `[tasks]`. The first `shots` designs are the support, the rest the query."""
        n, d, target = torch.as_tensor(n), torch.as_tensor(d), torch.as_tensor(target)
        if n.dim() != 2 or n.shape != d.shape:
            raise ValueError(f"n and d must both have shape [tasks, m], got {tuple(n.shape)} and {tuple(d.shape)}")
        if target.shape != n.shape[:1]:
            raise ValueError(f"target must have shape [tasks] = [{n.shape[0]}], got {tuple(target.shape)}")
        for name, t in (("n", n), ("d", d), ("target", target)):
            if not t.is_floating_point() or not torch.isfinite(t).all() or (t <= 0).any():
                raise ValueError(f"{name} must hold finite positive floating-point values")
        if not isinstance(shots, int) or not 1 <= shots < n.shape[1]:
            raise ValueError(f"shots must be an integer in [1, m) = [1, {n.shape[1]}), got {shots!r}")
        u = to_scaled(n, d)
        y = target[:, None, None].expand(-1, n.shape[1], 1).to(u.dtype)
        return TaskBatch(u[:, :shots], y[:, :shots], u[:, shots:], y[:, shots:])
