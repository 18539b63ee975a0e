"""ANIL, Almost No Inner Loop (Raghu, Raghu, Bengio & Vinyals 2020): MAML whose inner loop adapts the head only.

    for each iteration:
        sample a batch of tasks T_i
        for each T_i:  head_i' = head - alpha * grad_head L_support(body, head)     (inner_steps times)
        (body, head) <- (body, head) - beta * grad mean_i L_query(body, head_i')    (order 2: exact, 1: first order)

The head is by default the parameters of the model's last `nn.Linear`; `head=` names other parameters.

The body's output does not change during the inner loop, so where the head is one module whose output is the
model's output, the body runs once per task and set (support, query) and the inner loop runs on the head's
input alone, as learn2learn's ANIL example does: the same losses and the same meta-gradient (to rounding;
tests/test_anil_body_once.py) at the cost of two body passes per task instead of `inner_steps + 1`.
Otherwise (a head of scattered parameters, a head feeding later layers, per-step batch norm, running
statistics updated in training mode, bf16 autocast, a task loss other than `supervised`) every inner step
runs the whole model, as MAML does. One difference remains where the body draws randomness (dropout): once
per set instead of once per step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from metagrad import core
from metagrad.algorithms.maml import MAML, last_linear
from metagrad.core import Adapter, LossFn, Params, Path
from metagrad.inner import InnerOptimizer


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
        zero_head: bool | Sequence[str] = False,
        lslr: bool = False,
        multi_step_loss_iters: int = 0,
        order_anneal_iters: int = 0,
    ) -> None:
        head = last_linear(model) if head is None else list(head)
        if not head:
            raise ValueError("head must name at least one parameter of the model")
        # MAML++'s options apply to the head's inner loop as they do to MAML's: a learned rate per head tensor
        # and step, the query loss after every step, first order before second.
        super().__init__(model, inner_lr, inner_steps, order, loss_fn, inner_opt, path, lslr=lslr,
                         multi_step_loss_iters=multi_step_loss_iters, order_anneal_iters=order_anneal_iters,
                         adapt_names=head, eval_steps=eval_steps, zero_head=head if zero_head is True else zero_head)
        self._head = head_module(model, head)

    def adapt_and_evaluate(self, on: Adapter, params: Params, support: Any, query: Any,
                           all_steps: bool = False) -> tuple[Tensor, dict[str, Tensor]]:
        """One task: the body once on each set, the inner loop and the query loss on the head's input."""
        if not self._body_once(on):
            return core.adapt_and_evaluate(on, params, support, query, all_steps)
        name, head = self._head
        at = on._layout(params)  # the layout the whole-model path gives theta (channels-last conv weights)
        h_support = head_input(on.f, at, support[0], head)
        h_query = head_input(on.f, at, query[0], head) if h_support is not None else None
        if h_query is None:  # the head's output is not the model's: from now on, the whole model every step
            self._head = None
            return core.adapt_and_evaluate(on, params, support, query, all_steps)
        prefix = f"{name}." if name else ""
        g = core.functional(head)
        g = core.with_options(core.for_vmap(g) if on.vmapped else g, on.path.options)

        def f_head(p: Params, h: Tensor) -> Tensor:
            return g({n[len(prefix):]: t for n, t in p.items()}, h)

        return core.adapt_and_evaluate(on.replace(f=f_head), {n: params[n] for n in self.adapt_names},
                                       (h_support, support[1]), (h_query, query[1]), all_steps)

    def _body_once(self, on: Adapter) -> bool:
        """Whether the body's output is the same at every inner step, so that it can run once per set."""
        return (self._head is not None and isinstance(on.task_loss, core.SupervisedLoss) and not on.path.bf16
                and not getattr(on.f, "stepped", False)
                and not any(getattr(m, "updates_statistics", False)
                            or (isinstance(m, _BatchNorm) and m.training and m.track_running_stats)
                            for m in self.model.modules()))


def head_module(model: nn.Module, head: Sequence[str]) -> tuple[str, nn.Module] | None:
    """The submodule `(name, module)` whose own parameters are exactly `head`, unless another module shares them."""
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        own = {f"{prefix}{n}": p for n, p in module.named_parameters() if p.requires_grad}
        if set(own) != set(head):
            continue
        inside, ids = {id(m) for m in module.modules()}, {id(p) for p in own.values()}
        shared = any(id(p) in ids for m in model.modules() if id(m) not in inside for p in m.parameters(recurse=False))
        return None if shared else (name, module)
    return None


def head_input(f: core.Model, params: Params, x: Tensor, head: nn.Module) -> Tensor | None:
    """The input of `head` in the forward pass `f(params, x)`, if `head` runs once and its output is the model's."""
    calls: list[tuple[tuple, Tensor]] = []
    handle = head.register_forward_hook(lambda module, args, out: calls.append((args, out)))
    try:
        out = f(params, x)
    finally:
        handle.remove()
    if len(calls) != 1 or calls[0][1] is not out or len(calls[0][0]) != 1:
        return None
    return calls[0][0][0]
