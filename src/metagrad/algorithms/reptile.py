"""Reptile (Nichol, Achiam & Schulman 2018, "On First-Order Meta-Learning Algorithms"), batched version.

    for each iteration:
        sample a batch of tasks T_i
        for each T_i:  W_i = U^k(theta)       k = inner_steps of the inner optimizer on all of T_i's data
        theta <- theta + epsilon * (mean_i W_i - theta)

At meta-train a task's data is its support and query sets together (Reptile has no query split);
at meta-test `adapt` uses the support set only. The outer update is handed to the outer optimizer as
the gradient `theta - mean_i W_i`, so `torch.optim.SGD(lr=epsilon)` is exactly Reptile, and Adam
(the paper's choice for the outer loop of its few-shot runs) works as well.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from metagrad.algorithms.base import Algorithm, pooled
from metagrad.core import ExecPath, LossFn, Path
from metagrad.inner import InnerOptimizer


class Reptile(Algorithm):
    """Reptile: move theta toward the mean of the task-adapted weights; first order by construction."""

    def __init__(
        self,
        model: nn.Module,
        inner_lr: float = 0.01,
        inner_steps: int = 5,
        order: int = 1,
        loss_fn: LossFn | None = None,
        inner_opt: InnerOptimizer | None = None,
        path: Path = "auto",
        eval_steps: int | None = None,
    ) -> None:
        if order != 1:
            raise ValueError(f"Reptile is first order by construction (no derivative through the inner loop); "
                             f"order must be 1, got {order!r}")
        super().__init__(model, inner_lr, inner_steps, order, loss_fn, inner_opt, path, eval_steps=eval_steps)

    def objective(self, batch: Any, iteration: int, path: ExecPath) -> tuple[Tensor, dict[str, Tensor]]:
        data = pooled(batch)  # [tasks, shots + query_shots, ...]
        w = self.fit_tasks(data, self.inner_steps, path)  # W_i, each [tasks, *param.shape]
        theta = self.params()
        direction = {n: (theta[n] - w[n].mean(0)).detach() for n in theta}  # theta - mean_i W_i
        # Surrogate: its value is the query loss at W_i (query points were part of the inner data),
        # its gradient with respect to theta is the Reptile direction.
        value = self.task_losses(w, batch.query, path).mean().detach()
        surrogate = sum((theta[n] * direction[n]).sum() for n in theta)
        return value + surrogate - surrogate.detach(), {}
