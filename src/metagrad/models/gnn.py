"""A small graph convolutional network on plain torch (Kipf & Welling 2017), for few-shot node classification.

The whole graph travels with every example, so that a task's support and query sets stay ordinary
`[tasks, shots, ...]` tensors (see `metagrad.tasks.graph_sbm`). One example is the matrix

    x = [A_hat | X | e_v]   of shape [nodes, nodes + features + 1]:

the symmetric-normalised adjacency with self-loops A_hat = D^-1/2 (A + I) D^-1/2 `[nodes, nodes]`, the
node features X `[nodes, features]`, and a one-hot column e_v marking the node v to classify. The
network computes logits for all nodes, Z = A_hat (relu(A_hat (X W1 + b1)) W2 + b2) (two graph
convolutions), and returns the row of the marked node, e_v^T Z `[ways]`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def normalised_adjacency(adjacency: Tensor) -> Tensor:
    """D^-1/2 (A + I) D^-1/2 for adjacency `[..., nodes, nodes]` (symmetric, non-negative)."""
    a = adjacency + torch.eye(adjacency.shape[-1], dtype=adjacency.dtype, device=adjacency.device)
    d = a.sum(-1).rsqrt()
    return d[..., :, None] * a * d[..., None, :]


def graph_examples(adjacency_hat: Tensor, features: Tensor, nodes: Tensor) -> Tensor:
    """Examples `[graphs, len(nodes), N, N + F + 1]` from A_hat `[graphs, N, N]`, X `[graphs, N, F]` and the
    indices of the nodes to classify `[graphs, k]`."""
    graphs, n = adjacency_hat.shape[:2]
    base = torch.cat([adjacency_hat, features], -1)  # [graphs, N, N + F]
    marker = torch.zeros(graphs, nodes.shape[1], n, 1, dtype=base.dtype, device=base.device)
    marker.scatter_(2, nodes[:, :, None, None], 1.0)
    return torch.cat([base[:, None].expand(-1, nodes.shape[1], -1, -1), marker], -1)


class GCN(nn.Module):
    """Two graph convolutions: examples `[n, N, N + features + 1]` -> logits of the marked nodes `[n, ways]`."""

    def __init__(self, features: int = 8, hidden: int = 32, ways: int = 3) -> None:
        super().__init__()
        if min(features, hidden, ways) < 1:
            raise ValueError(f"features, hidden and ways must be positive, got {features}, {hidden}, {ways}")
        self.features = features
        self.conv1 = nn.Linear(features, hidden)
        self.conv2 = nn.Linear(hidden, ways)

    def forward(self, x: Tensor) -> Tensor:
        nodes = x.shape[-2]
        if x.shape[-1] != nodes + self.features + 1:
            raise ValueError(f"GCN expects examples [..., nodes, nodes + {self.features} + 1] = [A_hat | X | e_v], "
                             f"got {tuple(x.shape)}")
        a, h, marker = x[..., :nodes], x[..., nodes:-1], x[..., -1:]
        h = torch.relu(a @ self.conv1(h))
        z = a @ self.conv2(h)  # [n, N, ways]: logits of every node
        return (marker * z).sum(-2)
