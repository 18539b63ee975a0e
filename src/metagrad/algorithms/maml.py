"""MAML (Finn, Abbeel & Levine 2017), first-order MAML, and the MAML++ options (Antoniou et al. 2019).

    for each iteration:
        sample a batch of tasks T_i
        for each T_i:  theta_i' = theta - alpha * grad L_support(theta)     (inner_steps times)
        theta <- theta - beta * grad_theta  mean_i L_query(theta_i')        (order 2: exact, 1: first order)

MAML++ options: `lslr` learns one inner rate per layer and step; `multi_step_loss_iters` > 0 adds
the query loss after every inner step with weights annealed toward the last step over that many
iterations; `order_anneal_iters` > 0 uses first order for that many iterations, then `order`. Per-step
batch norm (BNWB, BNRS) belongs to the model, `Conv4(per_step_bn=inner_steps + 1, running_stats=True)`: the
adapter hands it the step index, and its sets are learned in the outer loop only (`model.meta_only`). The
ensemble of the best validation checkpoints: `meta_train(keep_best=5)`, `evaluation.evaluate_ensemble`.

`zero_head` is the zeroing trick (Kao, Chiu & Chen, "MAML is a noisy contrastive learner in classification",
ICLR 2022): every task's adaptation starts with the head (by default the last `nn.Linear`) at zero, so that
the start treats every class alike whatever the task's labelling; the head's meta-gradient is then zero and
its stored values are never used.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from metagrad import core
from metagrad.algorithms.base import Algorithm, check_steps, inner_names
from metagrad.core import ExecPath, LossFn, Params, Path
from metagrad.inner import InnerOptimizer, per_layer_per_step_lr


def multi_step_weights(steps: int, iteration: int, anneal_iters: int) -> np.ndarray:
    """MAML++ per-step loss weights: uniform at first, mass moving to the last step over `anneal_iters`."""
    w = np.full(steps, 1.0 / steps)
    decay = 1.0 / steps / anneal_iters
    floor = 0.03 / steps
    w[:-1] = np.maximum(w[:-1] - iteration * decay, floor)
    w[-1] = min(w[-1] + iteration * (steps - 1) * decay, 1.0 - (steps - 1) * floor)
    return w


def last_linear(model: nn.Module) -> list[str]:
    """Names of the parameters of the last `nn.Linear` in `model.named_modules()` order."""
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("the default head is the model's last nn.Linear, and this model has none; "
                         "pass head=[parameter names] (ANIL) or zero_head=[parameter names]")
    prefix = f"{linears[-1]}." if linears[-1] else ""
    return [f"{prefix}{n}" for n, p in model.get_submodule(linears[-1]).named_parameters() if p.requires_grad]


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
        task_loss: core.TaskLoss | None = None,
        zero_head: bool | Sequence[str] = False,
    ) -> None:
        if lslr and inner_opt is None:
            params = core.named_params(model)
            names = inner_names(model, adapt_names)
            adapted = {n: p for n, p in params.items() if names is None or n in names}
            inner_opt = per_layer_per_step_lr(adapted, inner_lr, max(inner_steps, 1))
        super().__init__(model, inner_lr, inner_steps, order, loss_fn, inner_opt, path, adapt_names, eval_steps,
                         task_loss)
        check_steps(multi_step_loss_iters=multi_step_loss_iters, order_anneal_iters=order_anneal_iters)
        self.multi_step_loss_iters = int(multi_step_loss_iters)
        self.order_anneal_iters = int(order_anneal_iters)
        self.zero_names = last_linear(model) if zero_head is True else list(zero_head or [])
        unknown = sorted(set(self.zero_names) - set(core.named_params(model)))
        if unknown:
            raise ValueError(f"zero_head names {unknown}, which are not parameters of the model")

    def params(self) -> Params:
        """The start of every task's adaptation: the model's parameters, those of `zero_head` at zero."""
        theta = super().params()
        # A leaf that requires grad like the parameter it stands for: the inner loop differentiates through it.
        return {n: torch.zeros_like(p).requires_grad_(p.requires_grad) if n in self.zero_names else p
                for n, p in theta.items()}

    def order_at(self, iteration: int) -> int:
        """The order in force at `iteration`: first order during the annealing phase, then `order`."""
        return 1 if iteration < self.order_anneal_iters else self.order

    def current_order(self) -> int:
        """The order in force now."""
        return self.order_at(int(self.iteration))

    def objective(self, batch: Any, iteration: int, path: ExecPath) -> tuple[Tensor, dict[str, Tensor]]:
        theta = self.params()
        msl = self.multi_step_loss_iters > 0 and iteration < self.multi_step_loss_iters and self.inner_steps > 1
        # Each task: theta_i' = inner steps on its support set; its query loss (after every step with msl).
        losses, metrics = core.map_tasks(lambda on, s, q: self.adapt_and_evaluate(on, theta, s, q, all_steps=msl),
                                         self.adapter(iteration), path, batch.support, batch.query)
        if msl:
            w = torch.as_tensor(multi_step_weights(self.inner_steps, iteration, self.multi_step_loss_iters),
                                dtype=losses.dtype, device=losses.device)
            return (losses[:, 1:] @ w).mean(), {k: v[:, -1].mean() for k, v in metrics.items()}
        return losses.mean(), {k: v.mean() for k, v in metrics.items()}
