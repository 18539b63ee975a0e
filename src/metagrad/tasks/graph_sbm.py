"""Few-shot node classification: each task is a new graph whose nodes are classified from a few labelled ones.

Simulated law: the contextual stochastic block model (Holland, Laskey & Leinhardt 1983, Social Networks
5:109, with Gaussian node features as in Deshpande et al. 2018, NeurIPS): `ways` blocks of
`nodes_per_class` nodes; an edge joins two nodes of the same block with probability p_in, of different
blocks with p_out; node v of class c has features X_v = mu_c + noise_sd z_v with class means
mu_c ~ N(0, class_sd^2 I) drawn fresh for every graph. So a class's meaning changes from graph to graph
(as in N-way few-shot classification) and must be read from the labelled nodes; the edges help because
neighbours tend to share the class.

How the graph travels inside the TaskBatch (fixed layout, `metagrad.models.gnn`): every example, support
or query, is the matrix [A_hat | X | e_v] `[N, N + features + 1]` of its whole graph (N = ways *
nodes_per_class nodes, A_hat the normalised adjacency with self-loops) with a one-hot column marking the
node v it asks about; its label is v's class. So support_x is `[graphs, ways * shots, N, N + features + 1]`,
support_y `[graphs, ways * shots]` (int64), and query_x/query_y the same with `query_shots` per class.
Own graphs: `GraphSBM.from_graphs(adjacency, features, labels, support_nodes, query_nodes)`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from metagrad.core import TaskBatch
from metagrad.models.gnn import graph_examples, normalised_adjacency
from metagrad.tasks.base import check_positive, family
from metagrad.tasks.records import as_tensor


@family("graph-sbm")
@dataclass
class GraphSBM:
    """Contextual SBM graphs as tasks: examples `[graphs, ways * shots, N, N + features + 1]` -> node classes."""

    ways: int = 3
    shots: int = 2
    query_shots: int = 5
    nodes_per_class: int = 10
    features: int = 8
    p_in: float = 0.3
    p_out: float = 0.03
    class_sd: float = 1.0
    noise_sd: float = 1.0
    dtype: torch.dtype = torch.float32

    # The model `metagrad train --model auto` builds for these examples (metagrad.models.gnn.GCN).
    default_model = "gcn"

    def __post_init__(self) -> None:
        check_positive(ways=self.ways, shots=self.shots, query_shots=self.query_shots,
                       nodes_per_class=self.nodes_per_class, features=self.features)
        if self.shots + self.query_shots > self.nodes_per_class:
            raise ValueError(f"shots + query_shots ({self.shots} + {self.query_shots}) must not exceed "
                             f"nodes_per_class ({self.nodes_per_class})")
        for name in ("p_in", "p_out"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be a probability in [0, 1], got {getattr(self, name)!r}")

    @property
    def nodes(self) -> int:
        """Nodes per graph."""
        return self.ways * self.nodes_per_class

    def graphs(self, n_tasks: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Adjacency `[graphs, N, N]` (0/1, symmetric), features `[graphs, N, features]`, classes `[N]`."""
        check_positive(n_tasks=n_tasks)
        n = self.nodes
        classes = torch.arange(n) // self.nodes_per_class
        same = classes[:, None] == classes[None, :]
        p = torch.where(same, self.p_in, self.p_out).to(self.dtype)
        upper = (torch.rand(n_tasks, n, n, generator=generator, dtype=self.dtype) < p).to(self.dtype).triu(1)
        adjacency = upper + upper.transpose(1, 2)
        means = self.class_sd * torch.randn(n_tasks, self.ways, self.features, generator=generator, dtype=self.dtype)
        feats = means[:, classes] + self.noise_sd * torch.randn(n_tasks, n, self.features, generator=generator,
                                                                dtype=self.dtype)
        return adjacency, feats, classes

    def sample(self, n_tasks: int, generator: torch.Generator | None = None) -> TaskBatch:
        """`n_tasks` graphs, `shots` labelled and `query_shots` scored nodes of each class."""
        adjacency, feats, classes = self.graphs(n_tasks, generator)
        # Per graph and class, a random choice of distinct nodes: the first `shots` labelled, the next scored.
        order = torch.rand(n_tasks, self.ways, self.nodes_per_class, generator=generator).argsort(-1)
        chosen = order + (torch.arange(self.ways) * self.nodes_per_class)[None, :, None]
        support = chosen[:, :, :self.shots].reshape(n_tasks, -1)
        query = chosen[:, :, self.shots:self.shots + self.query_shots].reshape(n_tasks, -1)
        return self._batch(normalised_adjacency(adjacency), feats, classes.expand(n_tasks, -1), support, query)

    @staticmethod
    def _batch(a_hat: Tensor, feats: Tensor, labels: Tensor, support: Tensor, query: Tensor) -> TaskBatch:
        return TaskBatch(graph_examples(a_hat, feats, support), labels.gather(1, support),
                         graph_examples(a_hat, feats, query), labels.gather(1, query))

    @staticmethod
    def from_graphs(adjacency: object, features: object, labels: object, support_nodes: object,
                    query_nodes: object) -> TaskBatch:
        """Own graphs of equal size N: adjacency `[graphs, N, N]` (symmetric, >= 0, no self-loops needed),
        features `[graphs, N, F]`, labels `[graphs, N]` (class index per node, any value where unknown),
        indices of the labelled nodes `[graphs, S]` and of the nodes to score `[graphs, Q]`."""
        adjacency = as_tensor("adjacency", adjacency, torch.float32)
        features = as_tensor("features", features, torch.float32)
        labels = as_tensor("labels", labels, torch.int64)
        support = as_tensor("support_nodes", support_nodes, torch.int64)
        query = as_tensor("query_nodes", query_nodes, torch.int64)
        if adjacency.dim() != 3 or adjacency.shape[1] != adjacency.shape[2]:
            raise ValueError(f"adjacency must have shape [graphs, N, N], got {tuple(adjacency.shape)}")
        graphs, n = adjacency.shape[:2]
        if (adjacency < 0).any() or not torch.equal(adjacency, adjacency.transpose(1, 2)):
            raise ValueError("adjacency must be symmetric with non-negative weights")
        if features.dim() != 3 or features.shape[:2] != (graphs, n):
            raise ValueError(f"features must have shape [graphs={graphs}, N={n}, F], got {tuple(features.shape)}")
        if tuple(labels.shape) != (graphs, n):
            raise ValueError(f"labels must have shape [graphs={graphs}, N={n}], got {tuple(labels.shape)}")
        for name, idx in (("support_nodes", support), ("query_nodes", query)):
            if idx.dim() != 2 or idx.shape[0] != graphs or idx.shape[1] < 1:
                raise ValueError(f"{name} must have shape [graphs={graphs}, k >= 1], got {tuple(idx.shape)}")
            if idx.min() < 0 or idx.max() >= n:
                raise ValueError(f"{name} must index nodes 0..{n - 1}, got values in [{int(idx.min())}, "
                                 f"{int(idx.max())}]")
            if (labels.gather(1, idx) < 0).any():
                raise ValueError(f"the nodes in {name} must have class labels >= 0")
        return GraphSBM._batch(normalised_adjacency(adjacency), features, labels, support, query)
