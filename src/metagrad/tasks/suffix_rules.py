"""Suffix rules: an inflection rule as an affine map between word vectors, learned from one or two examples.

Simulated law: in distributional word vectors an inflection (walk -> walked, cat -> cats) is close to a
constant offset (Mikolov, Yih & Zweig 2013, "Linguistic regularities in continuous space word
representations", NAACL), so each rule r is an affine map near a translation,

    y = A_r x + c_r + eps,   A_r = I + (mixing / sqrt(dim)) G_r,   c_r = c + offset_sd u_r,

with G_r, u_r ~ N(0, I) per rule, a direction c shared by all rules (inflections move words the same
general way; a fixed seed draws it, |c| ~ shared_norm), stems x ~ N(0, I_dim) and eps ~ N(0, noise_sd^2 I).
Each task is one rule with `shots` (stem, inflected) pairs.
Own records: `SuffixRules.from_records(stems [rules, pairs, dim], inflected [rules, pairs, dim], shots)`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from metagrad.core import TaskBatch
from metagrad.tasks.base import check_positive, family
from metagrad.tasks.records import as_tensor, split_records


@family("suffix-rules")
@dataclass
class SuffixRules:
    """Affine inflection rules as tasks: stems `[rules, shots, dim]` -> inflected forms `[rules, shots, dim]`."""

    shots: int = 2
    query_shots: int = 10
    dim: int = 16
    mixing: float = 0.3
    offset_sd: float = 1.0
    shared_norm: float = 2.0
    noise_sd: float = 0.1
    direction_seed: int = 0
    dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        check_positive(shots=self.shots, query_shots=self.query_shots, dim=self.dim)
        for name in ("mixing", "offset_sd", "shared_norm", "noise_sd"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be non-negative, got {getattr(self, name)!r}")

    def shared_direction(self) -> Tensor:
        """The offset c `[dim]` shared by all rules (fixed by `direction_seed`)."""
        c = torch.randn(self.dim, generator=torch.Generator().manual_seed(self.direction_seed), dtype=self.dtype)
        return c * (self.shared_norm / c.norm())

    def sample_params(self, n_tasks: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Each rule's matrix A `[rules, dim, dim]` and offset c `[rules, dim]`."""
        check_positive(n_tasks=n_tasks)
        g = torch.randn(n_tasks, self.dim, self.dim, generator=generator, dtype=self.dtype)
        a = torch.eye(self.dim, dtype=self.dtype) + self.mixing / math.sqrt(self.dim) * g
        c = self.shared_direction() + self.offset_sd * torch.randn(n_tasks, self.dim, generator=generator,
                                                                   dtype=self.dtype)
        return a, c

    def pairs(self, a: Tensor, c: Tensor, n: int, generator: torch.Generator | None = None
              ) -> tuple[Tensor, Tensor]:
        """`n` (stem, inflected) pairs per rule, each `[rules, n, dim]`."""
        x = torch.randn(len(a), n, self.dim, generator=generator, dtype=self.dtype)
        noise = self.noise_sd * torch.randn(len(a), n, self.dim, generator=generator, dtype=self.dtype)
        return x, x @ a.transpose(1, 2) + c[:, None, :] + noise

    def sample_with_params(self, n_tasks: int, generator: torch.Generator | None = None
                           ) -> tuple[TaskBatch, tuple[Tensor, Tensor]]:
        """`n_tasks` rules and their true (A, c)."""
        a, c = self.sample_params(n_tasks, generator)
        sx, sy = self.pairs(a, c, self.shots, generator)
        qx, qy = self.pairs(a, c, self.query_shots, generator)
        return TaskBatch(sx, sy, qx, qy), (a, c)

    def sample(self, n_tasks: int, generator: torch.Generator | None = None) -> TaskBatch:
        """`n_tasks` rules with `shots` support and `query_shots` query pairs."""
        return self.sample_with_params(n_tasks, generator)[0]

    @staticmethod
    def from_records(stems: object, inflected: object, shots: int) -> TaskBatch:
        """Own data: stem vectors `[rules, pairs, dim]` and inflected-form vectors of the same shape (e.g.
        from a word-embedding table); the first `shots` pairs of each rule are the support set."""
        stems = as_tensor("stems", stems, torch.float32)
        if stems.dim() != 3:
            raise ValueError(f"stems must have shape [rules, pairs, dim], got {tuple(stems.shape)}")
        return split_records(stems, inflected, shots, (stems.shape[-1],), (stems.shape[-1],),
                             names=("stems", "inflected"))
