"""Meta-SGD (Li, Zhou, Chen & Li 2017): MAML with a learned inner rate for every scalar parameter.

    for each iteration:
        sample a batch of tasks T_i
        for each T_i:  theta_i' = theta - alpha o grad L_support(theta)       (alpha: same shape as theta)
        (theta, alpha) <- (theta, alpha) - beta * grad mean_i L_query(theta_i')

alpha starts at `inner_lr` everywhere and is trained with the model (`inner.per_parameter_lr`).
The paper takes one inner step; `inner_steps` > 1 reuses the same alpha at every step.
"""

from __future__ import annotations

from torch import nn

from metagrad import core
from metagrad.algorithms.maml import MAML
from metagrad.core import LossFn, Path
from metagrad.inner import per_parameter_lr


class MetaSGD(MAML):
    """MAML whose inner optimizer is SGD with learned per-parameter rates (`alg.inner_meta_params`)."""

    def __init__(
        self,
        model: nn.Module,
        inner_lr: float = 0.01,
        inner_steps: int = 1,
        order: int = 2,
        loss_fn: LossFn | None = None,
        path: Path = "auto",
        eval_steps: int | None = None,
    ) -> None:
        if not inner_lr > 0:
            raise ValueError(f"inner_lr (the initial value of the learned rates) must be positive, got {inner_lr!r}")
        rates = per_parameter_lr(core.named_params(model), inner_lr)
        super().__init__(model, inner_lr, inner_steps, order, loss_fn, rates, path, eval_steps=eval_steps)
