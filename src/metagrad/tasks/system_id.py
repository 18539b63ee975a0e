"""System identification: the payload mass of a robot joint from a few (state, torque, next velocity) records.

Simulated law (see `metagrad.models.physical.PayloadJoint`): a joint with link inertia I0 carries a
point payload of unknown mass m at distance l, driven by a known torque tau against viscous friction b
and gravity,

    (I0 + m l^2) dw/dt = tau - b w - m g l sin q,

one explicit Euler step of dt per record: w' = w + dt (tau - b w - m g l sin q) / (I0 + m l^2), measured
with Gaussian encoder noise. Each task is one payload, m ~ U[mass]. Inputs x = (q, w, tau) `[3]` with
q ~ U[-pi, pi] rad, w ~ U[-3, 3] rad/s, tau ~ U[-10, 10] N m; target y = measured w' `[1]`.
Own records: `SystemID.from_records(x [payloads, records, 3], y [payloads, records], shots)`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from metagrad.core import TaskBatch
from metagrad.models.physical import joint_step
from metagrad.tasks.base import check_positive, family
from metagrad.tasks.records import split_records


@family("system-id")
@dataclass
class SystemID:
    """Robot-joint payloads as tasks: (q, w, tau) `[payloads, shots, 3]` -> next velocity `[payloads, shots, 1]`."""

    shots: int = 5
    query_shots: int = 20
    mass: tuple[float, float] = (0.5, 5.0)
    inertia: float = 0.05
    length: float = 0.5
    friction: float = 0.2
    dt: float = 0.05
    noise_sd: float = 0.02
    max_velocity: float = 3.0
    max_torque: float = 10.0
    dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        check_positive(shots=self.shots, query_shots=self.query_shots)
        lo, hi = self.mass
        if not 0 < lo <= hi:
            raise ValueError(f"mass must be (low, high) with 0 < low <= high (kg), got {self.mass}")
        for name in ("inertia", "length", "dt"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")

    def model_kwargs(self) -> dict[str, float]:
        """The known constants, to build a matching `PayloadJoint(**family.model_kwargs())`."""
        return {"inertia": self.inertia, "length": self.length, "friction": self.friction, "dt": self.dt}

    def sample_masses(self, n_tasks: int, generator: torch.Generator | None = None) -> Tensor:
        """Payload masses `[payloads]` in kg."""
        check_positive(n_tasks=n_tasks)
        lo, hi = self.mass
        return lo + (hi - lo) * torch.rand(n_tasks, generator=generator, dtype=self.dtype)

    def records(self, mass: Tensor, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """`n` records per payload: x `[payloads, n, 3]`, measured next velocity y `[payloads, n, 1]`."""
        u = torch.rand(len(mass), n, 3, generator=generator, dtype=self.dtype) * 2 - 1
        x = u * torch.tensor([math.pi, self.max_velocity, self.max_torque], dtype=self.dtype)
        w_next = joint_step(x, mass[:, None], self.inertia, self.length, self.friction, self.dt)
        noise = self.noise_sd * torch.randn(len(mass), n, generator=generator, dtype=self.dtype)
        return x, (w_next + noise)[..., None]

    def sample_with_params(self, n_tasks: int, generator: torch.Generator | None = None
                           ) -> tuple[TaskBatch, Tensor]:
        """`n_tasks` payloads and their true masses `[payloads]`."""
        mass = self.sample_masses(n_tasks, generator)
        sx, sy = self.records(mass, self.shots, generator)
        qx, qy = self.records(mass, self.query_shots, generator)
        return TaskBatch(sx, sy, qx, qy), mass

    def sample(self, n_tasks: int, generator: torch.Generator | None = None) -> TaskBatch:
        """`n_tasks` payloads with `shots` support and `query_shots` query records."""
        return self.sample_with_params(n_tasks, generator)[0]

    @staticmethod
    def from_records(x: object, y: object, shots: int) -> TaskBatch:
        """Own data: x `[payloads, records, 3]` = (q [rad], w [rad/s], tau [N m]), y `[payloads, records]`
        = the velocity measured one dt later; the first `shots` records are the support set."""
        return split_records(x, y, shots, (3,))
