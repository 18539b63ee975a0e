"""Materials kinetics: a material system's JMAK parameters from a few sparse transformation measurements.

Simulated law: Johnson-Mehl-Avrami-Kolmogorov (Avrami 1939, J. Chem. Phys. 7:1103; Johnson & Mehl
1939), the isothermally transformed fraction

    X(t) = 1 - exp(-(k t)^n),

with rate k (1/h) log-uniform in `rate` and Avrami exponent n uniform in `exponent` (1 to 4 covers
site-saturated to constant-nucleation growth in 1-3 dimensions). Each task is one material system,
measured at times t ~ U[t_min, t_max] hours with Gaussian noise of sd `noise_sd` on X.
Own records: `JMAKKinetics.from_records(t [systems, measurements], X [systems, measurements], shots)`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from metagrad.core import TaskBatch
from metagrad.models.physical import jmak_fraction
from metagrad.tasks.base import check_positive, family
from metagrad.tasks.records import as_tensor, split_records


@family("jmak")
@dataclass
class JMAKKinetics:
    """JMAK kinetics, material systems as tasks: times `[systems, shots, 1]` (h) -> fractions `[systems, shots, 1]`."""

    shots: int = 4
    query_shots: int = 20
    rate: tuple[float, float] = (0.03, 0.3)
    exponent: tuple[float, float] = (1.0, 4.0)
    t_min: float = 0.5
    t_max: float = 40.0
    noise_sd: float = 0.02
    dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        check_positive(shots=self.shots, query_shots=self.query_shots)
        for name in ("rate", "exponent"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi:
                raise ValueError(f"{name} must be (low, high) with 0 < low <= high, got {(lo, hi)}")
        if not 0 < self.t_min < self.t_max:
            raise ValueError(f"need 0 < t_min < t_max, got t_min={self.t_min}, t_max={self.t_max}")

    def sample_params(self, n_tasks: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Rates k `[systems]` (1/h) and Avrami exponents n `[systems]`."""
        check_positive(n_tasks=n_tasks)
        u = torch.rand(2, n_tasks, generator=generator, dtype=self.dtype)
        lk = math.log(self.rate[0]) + (math.log(self.rate[1]) - math.log(self.rate[0])) * u[0]
        n = self.exponent[0] + (self.exponent[1] - self.exponent[0]) * u[1]
        return lk.exp(), n

    def measurements(self, k: Tensor, n: Tensor, count: int, generator: torch.Generator | None = None
                     ) -> tuple[Tensor, Tensor]:
        """`count` noisy measurements per system: t `[systems, count, 1]`, X `[systems, count, 1]`."""
        t = self.t_min + (self.t_max - self.t_min) * torch.rand(len(k), count, 1, generator=generator,
                                                                 dtype=self.dtype)
        noise = self.noise_sd * torch.randn(len(k), count, 1, generator=generator, dtype=self.dtype)
        return t, jmak_fraction(t, k[:, None, None], n[:, None, None]) + noise

    def sample_with_params(self, n_tasks: int, generator: torch.Generator | None = None
                           ) -> tuple[TaskBatch, tuple[Tensor, Tensor]]:
        """`n_tasks` systems and their true (k, n), each `[systems]`."""
        k, n = self.sample_params(n_tasks, generator)
        sx, sy = self.measurements(k, n, self.shots, generator)
        qx, qy = self.measurements(k, n, self.query_shots, generator)
        return TaskBatch(sx, sy, qx, qy), (k, n)

    def sample(self, n_tasks: int, generator: torch.Generator | None = None) -> TaskBatch:
        """`n_tasks` systems with `shots` support and `query_shots` query measurements."""
        return self.sample_with_params(n_tasks, generator)[0]

    @staticmethod
    def from_records(t: object, fraction: object, shots: int) -> TaskBatch:
        """Own data: times `t [systems, measurements]` (> 0, hours) and transformed fractions `[systems,
        measurements]`; the first `shots` measurements of each system are the support set."""
        t = as_tensor("t", t, torch.float32)
        if t.dim() != 2:
            raise ValueError(f"t must have shape [systems, measurements], got {tuple(t.shape)}")
        if not (t > 0).all():
            raise ValueError("t must be positive (times after the start of the transformation)")
        return split_records(t[..., None], fraction, shots, (1,), names=("t", "fraction"))
