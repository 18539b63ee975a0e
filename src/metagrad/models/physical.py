"""Physical models whose parameters are the physical parameters (kept positive through their logarithms).

`PayloadJoint`: one robot joint carrying a payload of unknown mass m (a point mass at distance l on a
link of inertia I0), driven by a known torque tau, with viscous friction b (Newton-Euler for a rigid
pendulum):

    (I0 + m l^2) dw/dt = tau - b w - m g l sin q

discretised with one explicit Euler step of `dt`: w' = w + dt (tau - b w - m g l sin q) / (I0 + m l^2).

`JMAK`: the Johnson-Mehl-Avrami-Kolmogorov law of isothermal phase transformation (Avrami 1939,
J. Chem. Phys. 7:1103), transformed fraction X(t) = 1 - exp(-(k t)^n) with rate k > 0 and Avrami
exponent n > 0.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def joint_step(x: Tensor, mass: Tensor, inertia: float, length: float, friction: float, dt: float,
               gravity: float = 9.81) -> Tensor:
    """Velocity after one Euler step for states x `[..., 3]` = (q, w, tau) and mass broadcastable to `[...]`."""
    q, w, tau = x.unbind(-1)
    accel = (tau - friction * w - mass * gravity * length * torch.sin(q)) / (inertia + mass * length ** 2)
    return w + dt * accel


class PayloadJoint(nn.Module):
    """x `[n, 3]` = (angle q [rad], velocity w [rad/s], torque tau [N m]) -> next velocity `[n, 1]`.

    The one parameter is `log_mass` (mass in kg = exp(log_mass)); the other constants are known.
    """

    def __init__(self, mass: float = 1.0, inertia: float = 0.05, length: float = 0.5, friction: float = 0.2,
                 dt: float = 0.05) -> None:
        super().__init__()
        if not mass > 0:
            raise ValueError(f"mass must be positive (kg), got {mass!r}")
        self.log_mass = nn.Parameter(torch.tensor([math.log(mass)]))
        self.inertia, self.length, self.friction, self.dt = inertia, length, friction, dt

    def mass(self) -> Tensor:
        """The payload mass in kg, `[1]`."""
        return self.log_mass.exp()

    def forward(self, x: Tensor) -> Tensor:
        return joint_step(x, self.log_mass.exp(), self.inertia, self.length, self.friction, self.dt)[..., None]


def jmak_fraction(t: Tensor, k: Tensor, n: Tensor) -> Tensor:
    """X = 1 - exp(-(k t)^n) for times t > 0, written as exp(n log(k t)) so that d/dn is finite."""
    return 1 - torch.exp(-torch.exp(n * (torch.log(k) + torch.log(t))))


class JMAK(nn.Module):
    """Times t `[n, 1]` (> 0) -> transformed fraction X(t) `[n, 1]`; parameters `log_k` and `log_n`."""

    def __init__(self, k: float = 1.0, n: float = 1.0) -> None:
        super().__init__()
        if not (k > 0 and n > 0):
            raise ValueError(f"k and n must be positive, got k={k!r}, n={n!r}")
        self.log_k = nn.Parameter(torch.tensor([math.log(k)]))
        self.log_n = nn.Parameter(torch.tensor([math.log(n)]))

    def forward(self, t: Tensor) -> Tensor:
        return jmak_fraction(t, self.log_k.exp(), self.log_n.exp())
