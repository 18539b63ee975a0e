"""Personalised medicine: each patient's response is a linear model around a population mean.

The law simulated is the linear mixed-effects model (Laird & Ware 1982, Biometrics 38:963):

    y_ij = x_ij . (beta + b_i) + (beta_0 + b_i0) + eps_ij,   b_i ~ N(0, patient_sd^2 I),  eps_ij ~ N(0, noise_sd^2)

for patient i and measurement j, with covariates x_ij ~ N(0, I) (standardised, e.g. dose, time since
dose, heart rate, baseline value) and population coefficients (beta, beta_0). A new patient is fitted
from `shots` (1-3) of their measurements and scored on `query_shots` later ones.
Own records: `PersonalisedMedicine.from_records(x [patients, measurements, covariates], y [patients,
measurements], shots)`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from metagrad.core import TaskBatch
from metagrad.tasks.base import check_positive, family
from metagrad.tasks.records import as_tensor, split_records


@family("personalised-medicine")
@dataclass
class PersonalisedMedicine:
    """Linear mixed-effects patients as tasks: covariates `[patients, shots, covariates]` -> `[patients, shots, 1]`."""

    shots: int = 2
    query_shots: int = 10
    population_coef: tuple[float, ...] = (0.8, -0.5, 0.3, 0.6)
    population_intercept: float = 1.0
    patient_sd: float = 0.3
    noise_sd: float = 0.2
    dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        check_positive(shots=self.shots, query_shots=self.query_shots)
        if len(self.population_coef) < 1:
            raise ValueError("population_coef must list at least one coefficient")
        for name in ("patient_sd", "noise_sd"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be non-negative, got {getattr(self, name)!r}")

    @property
    def covariates(self) -> int:
        """Number of covariates per measurement."""
        return len(self.population_coef)

    def population(self) -> tuple[Tensor, Tensor]:
        """Population coefficients `[covariates]` and intercept `[]`."""
        return (torch.tensor(self.population_coef, dtype=self.dtype),
                torch.tensor(self.population_intercept, dtype=self.dtype))

    def sample_params(self, n_tasks: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Each patient's coefficients `[patients, covariates]` and intercept `[patients]`."""
        check_positive(n_tasks=n_tasks)
        coef, intercept = self.population()
        b = self.patient_sd * torch.randn(n_tasks, self.covariates + 1, generator=generator, dtype=self.dtype)
        return coef + b[:, :-1], intercept + b[:, -1]

    def measurements(self, coef: Tensor, intercept: Tensor, n: int,
                     generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """`n` noisy measurements per patient: x `[patients, n, covariates]`, y `[patients, n, 1]`."""
        x = torch.randn(len(coef), n, self.covariates, generator=generator, dtype=self.dtype)
        noise = self.noise_sd * torch.randn(len(coef), n, 1, generator=generator, dtype=self.dtype)
        return x, (x @ coef[:, :, None]) + intercept[:, None, None] + noise

    def sample_with_params(self, n_tasks: int, generator: torch.Generator | None = None
                           ) -> tuple[TaskBatch, tuple[Tensor, Tensor]]:
        """`n_tasks` patients and their true (coefficients, intercept)."""
        coef, intercept = self.sample_params(n_tasks, generator)
        sx, sy = self.measurements(coef, intercept, self.shots, generator)
        qx, qy = self.measurements(coef, intercept, self.query_shots, generator)
        return TaskBatch(sx, sy, qx, qy), (coef, intercept)

    def sample(self, n_tasks: int, generator: torch.Generator | None = None) -> TaskBatch:
        """`n_tasks` patients with `shots` support and `query_shots` query measurements."""
        return self.sample_with_params(n_tasks, generator)[0]

    @staticmethod
    def from_records(x: object, y: object, shots: int) -> TaskBatch:
        """Own data: covariates `x [patients, measurements, covariates]` and responses `y [patients,
        measurements]`, in time order; the first `shots` measurements are the support set."""
        x = as_tensor("x", x, torch.float32)
        if x.dim() != 3:
            raise ValueError(f"x must have shape [patients, measurements, covariates], got {tuple(x.shape)}")
        return split_records(x, y, shots, (x.shape[-1],))
