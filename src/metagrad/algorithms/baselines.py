"""Two baselines every meta-learning claim is measured against.

Pretrain (joint training on the pooled tasks, "transfer learning"):
    theta <- theta - beta * grad_theta  mean_i L(theta; support_i + query_i)     no adaptation inside
    meta-test: fine-tune theta on the support set with SGD at inner_lr (`adapt`)

OptimumAverage (the average of the tasks' own optima):
    for each T_i:  phi_i* = fit_steps of the inner optimizer from theta on support_i + query_i
    theta <- theta - beta * (theta - mean_i phi_i*)         SGD(lr=1) sets theta to the average exactly
    meta-test: fine-tune as above
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from metagrad.algorithms.base import Algorithm, check_steps, pooled
from metagrad.core import ExecPath, LossFn, Path
from metagrad.inner import InnerOptimizer


def _first_order_only(name: str, order: int) -> None:
    if order != 1:
        raise ValueError(f"{name} takes no derivative through an inner loop; order must be 1, got {order!r}")


class Pretrain(Algorithm):
    """Joint training: the meta-loss is the plain loss of the un-adapted model on every task's data."""

    def __init__(
        self,
        model: nn.Module,
        inner_lr: float = 0.01,
        inner_steps: int = 1,
        order: int = 1,
        loss_fn: LossFn | None = None,
        inner_opt: InnerOptimizer | None = None,
        path: Path = "auto",
        eval_steps: int | None = None,
    ) -> None:
        _first_order_only("Pretrain", order)
        super().__init__(model, inner_lr, inner_steps, order, loss_fn, inner_opt, path, eval_steps=eval_steps)

    def objective(self, batch: Any, iteration: int, path: ExecPath) -> tuple[Tensor, dict[str, Tensor]]:
        data = pooled(batch)
        theta = self.params()
        stacked = {n: p.expand(len(batch), *p.shape) for n, p in theta.items()}  # the same theta for every task
        return self.task_losses(stacked, data, path).mean(), {}


class OptimumAverage(Algorithm):
    """Theta moves to the average of the tasks' optima, each found by `fit_steps` inner steps from theta."""

    def __init__(
        self,
        model: nn.Module,
        inner_lr: float = 0.01,
        inner_steps: int = 1,
        order: int = 1,
        loss_fn: LossFn | None = None,
        inner_opt: InnerOptimizer | None = None,
        path: Path = "auto",
        eval_steps: int | None = None,
        fit_steps: int = 100,
    ) -> None:
        _first_order_only("OptimumAverage", order)
        super().__init__(model, inner_lr, inner_steps, order, loss_fn, inner_opt, path, eval_steps=eval_steps)
        self.fit_steps = check_steps(fit_steps=fit_steps)

    def objective(self, batch: Any, iteration: int, path: ExecPath) -> tuple[Tensor, dict[str, Tensor]]:
        data = pooled(batch)
        optima = self.fit_tasks(data, self.fit_steps, path)  # phi_i*, each [tasks, *param.shape]
        theta = self.params()
        direction = {n: (theta[n] - optima[n].mean(0)).detach() for n in theta}
        # Surrogate: value = loss of each optimum on its task's data, gradient = theta - mean_i phi_i*.
        value = self.task_losses(optima, data, path).mean().detach()
        surrogate = sum((theta[n] * direction[n]).sum() for n in theta)
        return value + surrogate - surrogate.detach(), {}
