"""Task families whose optima and Hessians are known: quadratic bowls and linear-Gaussian regression.

`Quadratic`: task i is the loss  L_i(theta) = 1/2 (theta - c_i)^T A_i (theta - c_i)  with optimum c_i
and Hessian A_i (symmetric positive definite). It is written as least squares so that metagrad's
MAML, with the model `nn.Linear(dim, 1, bias=False)` and its default mean-squared-error loss, sees
exactly this loss: the rows are R_i = sqrt(dim / 2) A_i^(1/2) and the targets R_i c_i, so that
mean_j (R_i theta - R_i c_i)_j^2 = 1/2 (theta - c_i)^T A_i (theta - c_i). Support and query are the
same bowl; `noise` > 0 perturbs the support targets (a noisy gradient: the support optimum moves).

`LinearGaussian`: task i is y = x . w_i + noise, w_i ~ N(mean, prior_std^2) (optionally inside a
subspace), x ~ N(0, x_scale^2 I). Its squared loss is a quadratic with optimum w_i and Hessian
2 x^T x / n, so the same closed forms apply with the data's own curvature.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from metagrad.core import TaskBatch
from metagrad.tasks.base import check_positive, family


def random_rotation(n: int, dim: int, generator: torch.Generator | None = None,
                    dtype: torch.dtype = torch.float64) -> Tensor:
    """`n` Haar-random orthogonal matrices `[n, dim, dim]` (QR of a Gaussian, signs fixed)."""
    g = torch.randn(n, dim, dim, generator=generator, dtype=dtype)
    q, r = torch.linalg.qr(g)
    return q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)


def sym_sqrt(a: Tensor) -> Tensor:
    """Symmetric square root of symmetric positive semi-definite matrices `[..., d, d]`."""
    evals, evecs = torch.linalg.eigh(a)
    return evecs @ torch.diag_embed(evals.clamp_min(0).sqrt()) @ evecs.transpose(-1, -2)


def quadratic_loss(theta: Tensor, c: Tensor, a: Tensor) -> Tensor:
    """1/2 (theta - c_i)^T A_i (theta - c_i) for theta `[d]` or `[tasks, d]`, c `[tasks, d]`, A `[tasks, d, d]`."""
    diff = theta - c
    return 0.5 * torch.einsum("ti,tij,tj->t", diff, a, diff)


def adapt_quadratic(theta: Tensor, c: Tensor, a: Tensor, inner_lr: float, inner_steps: int) -> Tensor:
    """theta after `inner_steps` gradient steps on each bowl: c_i + (I - inner_lr A_i)^k (theta - c_i), `[tasks, d]`."""
    diff = (theta - c).unsqueeze(-1)
    b = torch.eye(c.shape[-1], dtype=a.dtype) - inner_lr * a
    for _ in range(inner_steps):
        diff = b @ diff
    return c + diff.squeeze(-1)


def maml_optimum(c: Tensor, a: Tensor, inner_lr: float, inner_steps: int = 1) -> Tensor:
    """MAML start in closed form: (sum_i M_i)^-1 sum_i M_i c_i, M_i = B_i^T A_i B_i, B_i = (I - inner_lr A_i)^k.

    With inner_steps = 0 it is the pooled (pre-adaptation) optimum (sum A_i)^-1 sum A_i c_i.
    """
    b = torch.linalg.matrix_power(torch.eye(c.shape[-1], dtype=a.dtype) - inner_lr * a, inner_steps)
    m = b.transpose(-1, -2) @ a @ b
    return torch.linalg.solve(m.sum(0), (m @ c.unsqueeze(-1)).sum(0)).squeeze(-1)


@family("quadratic")
@dataclass
class Quadratic:
    """Quadratic bowls 1/2 (theta - c_i)^T A_i (theta - c_i); `sample(n)` gives support = query `[n, dim, dim]`.

    Hessian eigenvalues are log-uniform in `eigen_range` (independently per direction), eigenvectors
    Haar-random if `rotate`. Optima c_i = center + spread * z_i + curvature_shift * mean_j(log lambda_ij) e_1:
    with `curvature_shift` != 0 stiff and soft tasks sit in different places, which is where weighting
    tasks by curvature (MAML) differs from weighting them equally.
    """

    dim: int = 2
    center: float | Sequence[float] = 0.0
    spread: float = 1.0
    eigen_range: tuple[float, float] = (0.5, 2.0)
    rotate: bool = True
    curvature_shift: float = 0.0
    noise: float = 0.0
    dtype: torch.dtype = torch.float64

    def __post_init__(self) -> None:
        check_positive(dim=self.dim)
        lo, hi = self.eigen_range
        if not 0 < lo <= hi:
            raise ValueError(f"eigen_range must be (low, high) with 0 < low <= high, got {self.eigen_range}")
        if self.spread < 0 or self.noise < 0:
            raise ValueError(f"spread and noise must be >= 0, got spread={self.spread}, noise={self.noise}")
        if not isinstance(self.center, (int, float)) and len(self.center) != self.dim:
            raise ValueError(f"center must be a number or a sequence of dim={self.dim} numbers, got {self.center}")

    def center_vector(self) -> Tensor:
        """The centre of the optima `[dim]`."""
        return torch.as_tensor(self.center, dtype=self.dtype).expand(self.dim).clone()

    def sample_params(self, n_tasks: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Optima c `[n_tasks, dim]` and Hessians A `[n_tasks, dim, dim]` of fresh tasks."""
        check_positive(n_tasks=n_tasks)
        lo, hi = self.eigen_range
        u = torch.rand(n_tasks, self.dim, generator=generator, dtype=self.dtype)
        log_eig = math.log(lo) + (math.log(hi) - math.log(lo)) * u
        q = random_rotation(n_tasks, self.dim, generator, self.dtype) if self.rotate \
            else torch.eye(self.dim, dtype=self.dtype).expand(n_tasks, -1, -1)
        a = q @ torch.diag_embed(log_eig.exp()) @ q.transpose(-1, -2)
        z = torch.randn(n_tasks, self.dim, generator=generator, dtype=self.dtype)
        c = self.center_vector() + self.spread * z
        c[:, 0] += self.curvature_shift * log_eig.mean(1)
        return c, a

    def batch(self, c: Tensor, a: Tensor, generator: torch.Generator | None = None) -> TaskBatch:
        """The tasks (c, A) as least-squares data: x `[tasks, dim, dim]`, y `[tasks, dim, 1]` (see module doc)."""
        if c.dim() != 2 or a.shape != (*c.shape, c.shape[-1]):
            raise ValueError(f"c must be [tasks, dim] and a [tasks, dim, dim], got {tuple(c.shape)}, {tuple(a.shape)}")
        rows = math.sqrt(c.shape[-1] / 2) * sym_sqrt(a)
        y = (rows @ c.unsqueeze(-1))
        sy = y + self.noise * torch.randn(y.shape, generator=generator, dtype=y.dtype) if self.noise > 0 else y
        return TaskBatch(rows, sy, rows, y)

    def sample(self, n_tasks: int, generator: torch.Generator | None = None) -> TaskBatch:
        """`n_tasks` fresh bowls as a TaskBatch (support = query rows, `[n_tasks, dim, dim]`)."""
        c, a = self.sample_params(n_tasks, generator)
        return self.batch(c, a, generator)


@family("linear-gaussian")
@dataclass
class LinearGaussian:
    """Linear regression tasks y = x . w_i + noise eps; `sample(n)` gives x `[n, shots, dim]`, y `[n, shots, 1]`.

    w_i = mean + prior_std * z_i, z_i ~ N(0, I_dim), or z_i ~ N(0, I_k) @ subspace when a `[k, dim]`
    `subspace` is given (tasks that share k features). Inputs x ~ N(0, x_scale^2 I).
    """

    dim: int = 1
    shots: int = 10
    query_shots: int = 10
    mean: float | Sequence[float] = 0.0
    prior_std: float = 1.0
    noise: float = 0.5
    x_scale: float = 1.0
    subspace: Tensor | None = None
    dtype: torch.dtype = torch.float64

    def __post_init__(self) -> None:
        check_positive(dim=self.dim, shots=self.shots, query_shots=self.query_shots)
        if self.prior_std < 0 or self.noise < 0 or self.x_scale <= 0:
            raise ValueError(f"need prior_std >= 0, noise >= 0, x_scale > 0; got {self.prior_std}, {self.noise}, "
                             f"{self.x_scale}")
        if self.subspace is not None and (self.subspace.dim() != 2 or self.subspace.shape[1] != self.dim):
            raise ValueError(f"subspace must be [k, dim={self.dim}], got {tuple(self.subspace.shape)}")
        if not isinstance(self.mean, (int, float)) and len(self.mean) != self.dim:
            raise ValueError(f"mean must be a number or a sequence of dim={self.dim} numbers, got {self.mean}")

    def mean_vector(self) -> Tensor:
        """The population mean of the task weights `[dim]`."""
        return torch.as_tensor(self.mean, dtype=self.dtype).expand(self.dim).clone()

    def sample_params(self, n_tasks: int, generator: torch.Generator | None = None) -> Tensor:
        """True weights w `[n_tasks, dim]` of fresh tasks."""
        check_positive(n_tasks=n_tasks)
        if self.subspace is None:
            z = torch.randn(n_tasks, self.dim, generator=generator, dtype=self.dtype)
        else:
            basis = self.subspace.to(self.dtype)
            z = torch.randn(n_tasks, basis.shape[0], generator=generator, dtype=self.dtype) @ basis
        return self.mean_vector() + self.prior_std * z

    def points(self, w: Tensor, n: int, generator: torch.Generator | None = None,
               noise: float | Tensor | None = None) -> tuple[Tensor, Tensor]:
        """`n` noisy points of each task: x `[tasks, n, dim]`, y `[tasks, n, 1]`; `noise` (scalar or `[tasks]`)
        overrides the family's noise level."""
        check_positive(n=n)
        noise = self.noise if noise is None else noise
        noise = torch.as_tensor(noise, dtype=self.dtype).reshape(-1, 1, 1)
        x = self.x_scale * torch.randn(w.shape[0], n, self.dim, generator=generator, dtype=self.dtype)
        eps = torch.randn(w.shape[0], n, 1, generator=generator, dtype=self.dtype)
        return x, x @ w.unsqueeze(-1) + noise * eps

    def batch(self, w: Tensor, generator: torch.Generator | None = None) -> TaskBatch:
        """Support and query sets of the tasks with weights w `[tasks, dim]`."""
        sx, sy = self.points(w, self.shots, generator)
        qx, qy = self.points(w, self.query_shots, generator)
        return TaskBatch(sx, sy, qx, qy)

    def sample(self, n_tasks: int, generator: torch.Generator | None = None) -> TaskBatch:
        """`n_tasks` fresh tasks with `shots` support and `query_shots` query points each."""
        return self.batch(self.sample_params(n_tasks, generator), generator)


def least_squares(x: Tensor, y: Tensor, ridge: float = 0.0) -> Tensor:
    """Per-task (ridge) least-squares weights `[tasks, dim]` from x `[tasks, n, dim]`, y `[tasks, n, 1]`."""
    xtx = x.transpose(-1, -2) @ x
    if ridge > 0:
        xtx = xtx + ridge * torch.eye(x.shape[-1], dtype=x.dtype)
    return torch.linalg.solve(xtx, x.transpose(-1, -2) @ y).squeeze(-1)
