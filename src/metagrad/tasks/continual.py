"""Class-incremental learning: new classes arrive one at a time, each with a few examples.

The simulated world is the Gaussian class-conditional model of linear discriminant analysis (Fisher,
"The use of multiple measurements in taxonomic problems", 1936) hidden among nuisance directions:
class c has a prototype mu_c ~ N(0, `spread`^2 I) in a `latent`-dimensional space; an example is
[mu_c + N(0, I), N(0, `nuisance`^2 I) in the other dim - latent coordinates], rotated by one fixed random
orthogonal matrix, so that which directions tell classes apart is shared by every class but not visible
in the raw coordinates. A pool of `n_classes` classes is drawn once from `pool_seed`; the first
`train_classes` serve meta-training, the others (never seen in training) the held-out tasks.

A task is a sequence of `ways` classes in arrival order. Its support holds `shots` examples of each class,
grouped by class in that order (label = arrival position 0..ways-1); its query `query_shots` of each:
support_x `[tasks, ways * shots, dim]`, support_y `[tasks, ways * shots]` (int64). `ClassIncremental.from_records`
turns user arrays `[tasks, ways, n, dim]` into the same layout (the loader hook).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from metagrad.core import TaskBatch
from metagrad.tasks.base import check_positive, family


@family("continual")
@dataclass
class ClassIncremental:
    """Sequences of new classes; `sample(n, generator)` gives x `[n, ways*shots, dim]`, labels `[n, ways*shots]`."""

    ways: int = 5
    shots: int = 5
    query_shots: int = 20
    split: str = "train"
    dim: int = 16
    latent: int = 4
    spread: float = 2.0
    nuisance: float = 3.0
    n_classes: int = 400
    train_classes: int = 300
    pool_seed: int = 1234
    dtype: torch.dtype = torch.float32
    prototypes: Tensor = field(init=False, repr=False)
    rotation: Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        check_positive(ways=self.ways, shots=self.shots, query_shots=self.query_shots, dim=self.dim,
                       latent=self.latent, n_classes=self.n_classes, train_classes=self.train_classes)
        if self.split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {self.split!r}")
        if not self.latent <= self.dim:
            raise ValueError(f"latent ({self.latent}) must be <= dim ({self.dim})")
        if not self.train_classes < self.n_classes:
            raise ValueError(f"train_classes ({self.train_classes}) must be < n_classes ({self.n_classes})")
        available = self.train_classes if self.split == "train" else self.n_classes - self.train_classes
        if self.ways > available:
            raise ValueError(f"ways ({self.ways}) exceeds the {available} classes of split {self.split!r}")
        g = torch.Generator().manual_seed(self.pool_seed)
        self.prototypes = self.spread * torch.randn(self.n_classes, self.latent, generator=g, dtype=self.dtype)
        self.rotation = torch.linalg.qr(torch.randn(self.dim, self.dim, generator=g, dtype=torch.float64))[0].to(
            self.dtype)

    def classes(self) -> Tensor:
        """Indices into the pool of the classes of this split."""
        lo, hi = (0, self.train_classes) if self.split == "train" else (self.train_classes, self.n_classes)
        return torch.arange(lo, hi)

    def examples(self, cls: Tensor, n: int, generator: torch.Generator | None = None) -> Tensor:
        """`n` examples of each pool class in `cls [...]`: `[..., n, dim]`."""
        noise = torch.randn(*cls.shape, n, self.dim, generator=generator, dtype=self.dtype)
        scale = torch.ones(self.dim, dtype=self.dtype)
        scale[self.latent:] = self.nuisance
        z = noise * scale
        z[..., : self.latent] += self.prototypes[cls][..., None, :]
        return z @ self.rotation.T

    def sample(self, n_tasks: int, generator: torch.Generator | None = None) -> TaskBatch:
        """`n_tasks` sequences of `ways` distinct classes of the split, support grouped by arrival order."""
        check_positive(n_tasks=n_tasks)
        pool = self.classes()
        order = torch.rand(n_tasks, len(pool), generator=generator).argsort(-1)[:, : self.ways]
        cls = pool[order]  # [tasks, ways]
        sx = self.examples(cls, self.shots, generator).flatten(1, 2)
        qx = self.examples(cls, self.query_shots, generator).flatten(1, 2)
        labels = torch.arange(self.ways)
        return TaskBatch(sx, labels.repeat_interleave(self.shots).expand(n_tasks, -1).contiguous(),
                         qx, labels.repeat_interleave(self.query_shots).expand(n_tasks, -1).contiguous())

    def pooled(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """`n` examples of random classes of the split with their pool-wide labels (to pre-train a classifier)."""
        pool = self.classes()
        cls = pool[torch.randint(len(pool), (n,), generator=generator)]
        return self.examples(cls, 1, generator)[:, 0], cls - pool[0]

    @staticmethod
    def from_records(x: Tensor, shots: int) -> TaskBatch:
        """User examples `[tasks, ways, n, dim]`, classes in arrival order: the first `shots` of each class
        form the support, the rest the query."""
        x = torch.as_tensor(x)
        if x.dim() != 4:
            raise ValueError(f"x must have shape [tasks, ways, n, dim], got {tuple(x.shape)}")
        if not x.is_floating_point() or not torch.isfinite(x).all():
            raise ValueError("x must hold finite floating-point values")
        tasks, ways, n, _ = x.shape
        if not isinstance(shots, int) or not 1 <= shots < n:
            raise ValueError(f"shots must be an integer in [1, n) = [1, {n}), got {shots!r}")
        labels = torch.arange(ways)
        return TaskBatch(x[:, :, :shots].flatten(1, 2), labels.repeat_interleave(shots).expand(tasks, -1).contiguous(),
                         x[:, :, shots:].flatten(1, 2),
                         labels.repeat_interleave(n - shots).expand(tasks, -1).contiguous())
