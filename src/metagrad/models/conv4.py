"""The 4-block CNN of the MAML paper (Finn et al. 2017; Vinyals et al. 2016) for Omniglot and MiniImageNet.

Each block: 3x3 convolution with `hidden` filters, batch norm with per-task batch statistics
(MAML's transductive setting: no running statistics), ReLU, then either a stride-2 convolution
(`pool="stride"`, the paper's Omniglot network, features averaged over space at the end) or
2x2 max-pooling (`pool="max"`, its MiniImageNet network and learn2learn/higher's examples).

With max-pooling the ReLU is applied after the pool: max and ReLU commute (both are monotone), so
the function and its gradients of every order are the same, and the ReLU and its backward pass
touch a quarter of the memory. These elementwise passes over the first block's full-resolution
activations, not the convolutions, dominate the CPU time of a meta-iteration (benchmarks/README.md).
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


class Conv4(nn.Module):
    """Four conv blocks and a linear head: `[n, channels, size, size] -> [n, ways]` logits."""

    def __init__(self, ways: int = 5, in_channels: int = 1, hidden: int = 64, pool: str = "stride",
                 batchnorm: str = "native") -> None:
        super().__init__()
        if pool not in ("stride", "max"):
            raise ValueError(f"pool must be 'stride' or 'max', got {pool!r}")
        if batchnorm not in ("native", "task"):
            raise ValueError(f"batchnorm must be 'native' or 'task', got {batchnorm!r}")
        self.pool = pool
        layers: list[nn.Module] = []
        for i in range(4):
            stride = 2 if pool == "stride" else 1
            layers.append(nn.Conv2d(in_channels if i == 0 else hidden, hidden, 3, stride=stride, padding=1))
            layers.append(nn.BatchNorm2d(hidden, track_running_stats=False) if batchnorm == "native"
                          else TaskBatchNorm(hidden))
            if pool == "max":
                layers.append(nn.MaxPool2d(2))
            layers.append(nn.ReLU())
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(hidden, ways)

    def forward(self, x: Tensor) -> Tensor:
        h = self.features(x)
        # Stride: average the remaining 2x2 map (paper's reduce_mean); max: the map is already 1x1.
        return self.head(h.mean(dim=(2, 3)))
