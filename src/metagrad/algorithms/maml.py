"""MAML (Finn, Abbeel & Levine 2017), first-order MAML, and the MAML++ options (Antoniou et al. 2019).

    for each iteration:
        sample a batch of tasks T_i
        for each T_i:  theta_i' = theta - alpha * grad L_support(theta)     (inner_steps times)
        theta <- theta - beta * grad_theta  mean_i L_query(theta_i')        (order 2: exact, 1: first order)

MAML++ options: `lslr` learns one inner rate per layer and step; `multi_step_loss_iters` > 0 adds
the query loss after every inner step with weights annealed toward the last step over that many
iterations; `order_anneal_iters` > 0 uses first order for that many iterations, then `order`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from metagrad import core
from metagrad.algorithms.base import Algorithm, check_steps
from metagrad.core import LossFn, Path, TaskBatch
from metagrad.inner import InnerOptimizer, per_layer_per_step_lr


def multi_step_weights(steps: int, iteration: int, anneal_iters: int) -> np.ndarray:
    """MAML++ per-step loss weights: uniform at first, mass moving to the last step over `anneal_iters`."""
    w = np.full(steps, 1.0 / steps)
    decay = 1.0 / steps / anneal_iters
    floor = 0.03 / steps
    w[:-1] = np.maximum(w[:-1] - iteration * decay, floor)
    w[-1] = min(w[-1] + iteration * (steps - 1) * decay, 1.0 - (steps - 1) * floor)
    return w


class MAML(Algorithm):
    """Model-agnostic meta-learning with exact (`order=2`) or first-order (`order=1`) meta-gradients."""

    def __init__(
        self,
        model: nn.Module,
        inner_lr: float = 0.01,
        inner_steps: int = 1,
        order: int = 2,
        loss_fn: LossFn | None = None,
        inner_opt: InnerOptimizer | None = None,
        path: Path = "auto",
        lslr: bool = False,
        multi_step_loss_iters: int = 0,
        order_anneal_iters: int = 0,
        adapt_names: Sequence[str] | None = None,
        eval_steps: int | None = None,
    ) -> None:
        if lslr and inner_opt is None:
            params = core.named_params(model)
            adapted = {n: p for n, p in params.items() if adapt_names is None or n in adapt_names}
            inner_opt = per_layer_per_step_lr(adapted, inner_lr, max(inner_steps, 1))
        super().__init__(model, inner_lr, inner_steps, order, loss_fn, inner_opt, path, adapt_names, eval_steps)
        check_steps(multi_step_loss_iters=multi_step_loss_iters, order_anneal_iters=order_anneal_iters)
        self.multi_step_loss_iters = int(multi_step_loss_iters)
        self.order_anneal_iters = int(order_anneal_iters)

    def current_order(self) -> int:
        """The order in force now: first order during the annealing phase, then `order`."""
        return 1 if int(self.iteration) < self.order_anneal_iters else self.order

    def exec_path(self, order: int | None = None) -> str:
        return super().exec_path(self.current_order() if order is None else order)

    def _order_now(self) -> int:
        return self.current_order()

    def _meta_loss(self, batch: TaskBatch) -> tuple[Tensor, dict[str, float]]:
        order = self.current_order()
        msl = self.multi_step_loss_iters > 0 and int(self.iteration) < self.multi_step_loss_iters \
            and self.inner_steps > 1
        losses, accs = core.query_losses(self.f, self.loss_fn, self.params(), batch, self.inner_opt,
                                         self.inner_steps, order, self.exec_path(order), self.adapt_names,
                                         all_steps=msl)
        if msl:
            w = torch.as_tensor(multi_step_weights(self.inner_steps, int(self.iteration),
                                                   self.multi_step_loss_iters), dtype=losses.dtype,
                                device=losses.device)
            loss = (losses[:, 1:] @ w).mean()
            accs = accs[:, -1] if accs is not None else None
        else:
            loss = losses.mean()
        metrics = {"accuracy": float(accs.mean())} if accs is not None else {}
        return loss, metrics
