"""ANIL, Almost No Inner Loop (Raghu, Raghu, Bengio & Vinyals 2020): MAML whose inner loop adapts the head only.

    for each iteration:
        sample a batch of tasks T_i
        for each T_i:  head_i' = head - alpha * grad_head L_support(body, head)     (inner_steps times)
        (body, head) <- (body, head) - beta * grad mean_i L_query(body, head_i')    (order 2: exact, 1: first order)

The head is by default the parameters of the model's last `nn.Linear`; `head=` names other parameters.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from metagrad.algorithms.maml import MAML
from metagrad.core import LossFn, Path
from metagrad.inner import InnerOptimizer


def last_linear(model: nn.Module) -> list[str]:
    """Names of the parameters of the last `nn.Linear` in `model.named_modules()` order."""
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("ANIL's default head is the model's last nn.Linear, and this model has none; "
                         "pass head=[parameter names]")
    prefix = f"{linears[-1]}." if linears[-1] else ""
    return [f"{prefix}{n}" for n, p in model.get_submodule(linears[-1]).named_parameters() if p.requires_grad]


class ANIL(MAML):
    """MAML with the inner loop restricted to the head; the outer loop trains every parameter."""

    def __init__(
        self,
        model: nn.Module,
        inner_lr: float = 0.01,
        inner_steps: int = 1,
        order: int = 2,
        loss_fn: LossFn | None = None,
        inner_opt: InnerOptimizer | None = None,
        path: Path = "auto",
        head: Sequence[str] | None = None,
        eval_steps: int | None = None,
    ) -> None:
        head = last_linear(model) if head is None else list(head)
        if not head:
            raise ValueError("head must name at least one parameter of the model")
        super().__init__(model, inner_lr, inner_steps, order, loss_fn, inner_opt, path, adapt_names=head,
                         eval_steps=eval_steps)
