"""Few-shot property prediction for a new family of materials: band gaps of semiconductor alloys.

Each task is one pseudo-binary alloy family A(1-x)B(x) (think GaAs-AlAs, InP-GaP). Its band gap follows
three standard laws whose coefficients are specific to the family:

    Eg(x, T, P) = (1 - x) Eg_A + x Eg_B - b x (1 - x)      composition: Vegard's law with a bowing term
                  - alpha T^2 / (T + beta)                  temperature: Varshni's law
                  + gamma P                                 pressure: linear deformation potential

(Vegard 1921; Van Vechten & Bergstresser, Phys. Rev. B 1, 3351, 1970 for the bowing parameter b;
Varshni, Physica 34, 149, 1967; coefficient ranges as tabulated for III-V compounds by Vurgaftman,
Meyer & Ram-Mohan, J. Appl. Phys. 89, 5815, 2001). Per family: Eg_A, Eg_B ~ U[0.3, 3.0] eV,
b ~ U[0, 1.5] eV, alpha ~ U[3, 6] 1e-4 eV/K, beta ~ U[100, 400] K, gamma ~ U[-0.02, 0.12] eV/GPa.
A measurement is a random composition x ~ U[0, 1], temperature T ~ U[0, 600] K and pressure
P ~ U[0, 10] GPa, with Gaussian measurement noise (`noise` eV).

The descriptors given to a model are scaled to [0, 1]: `[x, T / 600 K, P / 10 GPa]`, so a task batch has
support_x `[tasks, shots, 3]`, support_y `[tasks, shots, 1]` (eV). `MaterialsProperty.from_records`
turns measured records of the same shape (raw units) into a TaskBatch: the loader hook for real data.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from metagrad.core import TaskBatch
from metagrad.tasks.base import check_positive, family
from metagrad.tasks.records import record_columns

T_SCALE = 600.0  # K
P_SCALE = 10.0  # GPa


def band_gap(law: dict[str, Tensor], x: Tensor, T: Tensor, P: Tensor) -> Tensor:
    """Eg(x, T, P) in eV for each family's coefficients `law[name] [tasks]` at points `[tasks, n]`."""
    c = {k: v[:, None] for k, v in law.items()}
    vegard = (1 - x) * c["Eg_A"] + x * c["Eg_B"] - c["b"] * x * (1 - x)
    varshni = c["alpha"] * T**2 / (T + c["beta"])
    return vegard - varshni + c["gamma"] * P


@family("materials-property")
@dataclass
class MaterialsProperty:
    """Alloy families as tasks; `sample(n, generator)` gives descriptors `[n, shots, 3]`, band gaps `[n, shots, 1]`."""

    shots: int = 5
    query_shots: int = 20
    noise: float = 0.02
    Eg: tuple[float, float] = (0.3, 3.0)
    b: tuple[float, float] = (0.0, 1.5)
    alpha: tuple[float, float] = (3e-4, 6e-4)
    beta: tuple[float, float] = (100.0, 400.0)
    gamma: tuple[float, float] = (-0.02, 0.12)
    dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        check_positive(shots=self.shots, query_shots=self.query_shots)
        if not self.noise >= 0:
            raise ValueError(f"noise must be >= 0 (eV), got {self.noise!r}")
        for name in ("Eg", "b", "alpha", "beta", "gamma"):
            lo, hi = getattr(self, name)
            if not lo <= hi:
                raise ValueError(f"{name} must be (low, high) with low <= high, got {(lo, hi)}")

    def sample_laws(self, n_tasks: int, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Coefficients of `n_tasks` fresh alloy families, each `[n_tasks]`."""
        check_positive(n_tasks=n_tasks)
        u = torch.rand(6, n_tasks, generator=generator, dtype=self.dtype)

        def scale(i: int, rng: tuple[float, float]) -> Tensor:
            return rng[0] + (rng[1] - rng[0]) * u[i]

        return {"Eg_A": scale(0, self.Eg), "Eg_B": scale(1, self.Eg), "b": scale(2, self.b),
                "alpha": scale(3, self.alpha), "beta": scale(4, self.beta), "gamma": scale(5, self.gamma)}

    def measure(self, law: dict[str, Tensor], n: int, generator: torch.Generator | None = None
                ) -> tuple[Tensor, Tensor]:
        """`n` noisy measurements of each family: scaled descriptors `[tasks, n, 3]`, band gaps `[tasks, n, 1]`."""
        tasks = len(law["Eg_A"])
        u = torch.rand(tasks, n, 3, generator=generator, dtype=self.dtype)
        x, T, P = u[..., 0], u[..., 1] * T_SCALE, u[..., 2] * P_SCALE
        y = band_gap(law, x, T, P) + self.noise * torch.randn(tasks, n, generator=generator, dtype=self.dtype)
        return u, y[..., None]

    def sample(self, n_tasks: int, generator: torch.Generator | None = None) -> TaskBatch:
        """`n_tasks` new alloy families with `shots` support and `query_shots` query measurements each."""
        law = self.sample_laws(n_tasks, generator)
        sx, sy = self.measure(law, self.shots, generator)
        qx, qy = self.measure(law, self.query_shots, generator)
        return TaskBatch(sx, sy, qx, qy)

    @staticmethod
    def from_records(x: Tensor, T: Tensor, P: Tensor, gap: Tensor, shots: int) -> TaskBatch:
        """Measured records of several families, each `[tasks, n]` in raw units (x in [0, 1], T in K, P in
        GPa, band gap in eV): the first `shots` of every family are the support, the rest the query."""
        arrays = record_columns(shots, x=x, T=T, P=P, gap=gap)
        if ((arrays["x"] < 0) | (arrays["x"] > 1)).any():
            raise ValueError("x (alloy composition) must lie in [0, 1]")
        if (arrays["T"] < 0).any():
            raise ValueError("T must be an absolute temperature in K (>= 0)")
        feats = torch.stack([arrays["x"], arrays["T"] / T_SCALE, arrays["P"] / P_SCALE], dim=-1)
        y = arrays["gap"][..., None].to(feats.dtype)
        return TaskBatch(feats[:, :shots], y[:, :shots], feats[:, shots:], y[:, shots:])
