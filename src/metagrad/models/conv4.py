"""The 4-block CNN of the MAML paper (Finn et al. 2017; Vinyals et al. 2016) for Omniglot and MiniImageNet.

Each block: 3x3 convolution with `hidden` filters, batch norm with per-task batch statistics
(MAML's transductive setting: no running statistics), ReLU, then either a stride-2 convolution
(`pool="stride"`, the paper's Omniglot network, features averaged over space at the end) or
2x2 max-pooling (`pool="max"`, its MiniImageNet network and learn2learn/higher's examples).

With max-pooling the ReLU is applied after the pool: max and ReLU commute (both are monotone), so
the function and its gradients of every order are the same, and the ReLU and its backward pass
touch a quarter of the memory. These elementwise passes over the first block's full-resolution
activations, not the convolutions, dominate the CPU time of a meta-iteration (benchmarks/README.md).

`per_step_bn=n` gives each batch norm n sets of weights and biases (and, with `running_stats`, of
running statistics), set k used by params that have had k inner updates (MAML++, Antoniou et al. 2019,
section 4: BNWB and BNRS): `forward(x, step=k)`, the step the core's adapter passes (`Adapter.f_at`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from metagrad.core import batch_norm


class TaskBatchNorm(nn.Module):
    """Batch norm over the task's own batch written out; correct under `vmap` at any order."""

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        return batch_norm(x, self.weight, self.bias, self.eps)


class PerStepBatchNorm(nn.Module):
    """Batch norm with a weight, a bias and (optionally) running statistics per inner step: `[steps, channels]`.

    Training mode normalises with the batch's own statistics at every step, as MAML and the MAML++ code do,
    and moves the running statistics of step k toward them (momentum, as torch's BatchNorm); eval mode
    normalises with the running statistics of step k. Steps beyond the last set use the last set. The
    statistics are written in place, so training runs on the loop path in one process; under torchrun each
    rank keeps those of its own shard (rank 0's are saved). Neither changes a training-mode output.
    """

    def __init__(self, channels: int, steps: int, eps: float = 1e-5, momentum: float = 0.1,
                 running_stats: bool = False) -> None:
        super().__init__()
        if int(steps) != steps or steps < 1:
            raise ValueError(f"per-step batch norm needs at least one step, got steps={steps!r}")
        self.eps, self.momentum = eps, momentum
        self.weight = nn.Parameter(torch.ones(steps, channels))
        self.bias = nn.Parameter(torch.zeros(steps, channels))
        self.register_buffer("running_mean", torch.zeros(steps, channels) if running_stats else None)
        self.register_buffer("running_var", torch.ones(steps, channels) if running_stats else None)

    @property
    def updates_statistics(self) -> bool:
        """True when a forward pass writes the running statistics in place (training mode, statistics kept):
        metagrad.paths refuses vmap and forked workers then, which could not write them back."""
        return self.training and self.running_mean is not None

    def forward(self, x: Tensor, step: int = 0) -> Tensor:
        k = min(int(step), self.weight.shape[0] - 1)
        if self.running_mean is not None and not self.training:
            shape = [1, -1] + [1] * (x.dim() - 2)
            mean, var = self.running_mean[k].view(shape), self.running_var[k].view(shape)
            return (x - mean) * torch.rsqrt(var + self.eps) * self.weight[k].view(shape) + self.bias[k].view(shape)
        if self.running_mean is not None:
            dims = [0] + list(range(2, x.dim()))
            with torch.no_grad():
                # torch's convention: the unbiased variance in the running estimate, the biased one to normalise.
                self.running_mean[k].lerp_(x.detach().mean(dims).to(self.running_mean.dtype), self.momentum)
                self.running_var[k].lerp_(x.detach().var(dims, unbiased=True).to(self.running_var.dtype),
                                          self.momentum)
        return batch_norm(x, self.weight[k], self.bias[k], self.eps)


class Conv4(nn.Module):
    """Four conv blocks and a linear head: `[n, channels, size, size] -> [n, ways]` logits."""

    def __init__(self, ways: int = 5, in_channels: int = 1, hidden: int = 64, pool: str = "stride",
                 batchnorm: str = "native", per_step_bn: int = 0, running_stats: bool = False) -> None:
        super().__init__()
        if pool not in ("stride", "max"):
            raise ValueError(f"pool must be 'stride' or 'max', got {pool!r}")
        if batchnorm not in ("native", "task"):
            raise ValueError(f"batchnorm must be 'native' or 'task', got {batchnorm!r}")
        if isinstance(per_step_bn, bool) or int(per_step_bn) != per_step_bn or per_step_bn < 0:
            raise ValueError(f"per_step_bn must be 0 (one batch norm for every step) or the number of per-step "
                             f"sets (inner steps + 1), got {per_step_bn!r}")
        if running_stats and not per_step_bn:
            raise ValueError("running_stats=True keeps per-step running statistics: it needs per_step_bn > 0")
        self.pool = pool
        layers: list[nn.Module] = []
        for i in range(4):
            stride = 2 if pool == "stride" else 1
            layers.append(nn.Conv2d(in_channels if i == 0 else hidden, hidden, 3, stride=stride, padding=1))
            if per_step_bn:
                layers.append(PerStepBatchNorm(hidden, per_step_bn, running_stats=running_stats))
            else:
                layers.append(nn.BatchNorm2d(hidden, track_running_stats=False) if batchnorm == "native"
                              else TaskBatchNorm(hidden))
            if pool == "max":
                layers.append(nn.MaxPool2d(2))
            layers.append(nn.ReLU())
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(hidden, ways)

    @property
    def reads_step(self) -> bool:
        """Whether the output depends on the inner step index: only with per-step batch norm."""
        return any(isinstance(m, PerStepBatchNorm) for m in self.features)

    @property
    def meta_only(self) -> tuple[str, ...]:
        """Parameters learned by the outer loop only: per-step batch-norm sets (set k is read at step k
        alone, so an inner update of it would never be read; MAML++ keeps them out of the inner loop)."""
        return tuple(f"features.{i}.{n}" for i, m in enumerate(self.features) if isinstance(m, PerStepBatchNorm)
                     for n in ("weight", "bias"))

    def forward(self, x: Tensor, step: int = 0) -> Tensor:
        """Logits `[n, ways]`; `step`: the inner updates the parameters have had (per-step batch norm reads it)."""
        h = x
        for layer in self.features:
            h = layer(h, step) if isinstance(layer, PerStepBatchNorm) else layer(h)
        # Stride: average the remaining 2x2 map (paper's reduce_mean); max: the map is already 1x1.
        return self.head(h.mean(dim=(2, 3)))
