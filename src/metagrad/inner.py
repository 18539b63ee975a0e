"""Inner optimizers as pure `(init, update)` pairs, in the style of optax.

`init(params) -> state`; `update(grads, state, params, step) -> (updates, state)`; the inner loop
applies `params + updates`. Learned quantities (Meta-SGD's per-parameter rates, MAML++'s
per-layer-per-step rates, a learned optimizer's weights) live in `meta_params`: tensors that the
outer optimizer trains together with the model, and through which the meta-gradient flows
because `update` uses them differentiably.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

Params = dict[str, Tensor]


@dataclass
class InnerOptimizer:
    """A pair of pure functions and the learnable tensors they read."""

    init: Callable[[Params], object]
    update: Callable[[Params, object, Params, int], tuple[Params, object]]
    meta_params: nn.ParameterDict = field(default_factory=nn.ParameterDict)
    name: str = "custom"


def _key(name: str) -> str:
    # ParameterDict keys may not contain dots.
    return name.replace(".", "__")


def sgd(lr: float) -> InnerOptimizer:
    """Plain gradient descent with a fixed rate: the inner loop of MAML."""
    def update(grads: Params, state: object, params: Params, step: int) -> tuple[Params, object]:
        return {n: -lr * g for n, g in grads.items()}, state

    return InnerOptimizer(lambda params: None, update, nn.ParameterDict(), name="sgd")


def per_parameter_lr(params: Params, init_lr: float) -> InnerOptimizer:
    """Meta-SGD: a learned rate for every scalar parameter (same shape as the parameter)."""
    rates = nn.ParameterDict({_key(n): nn.Parameter(torch.full_like(p.detach(), init_lr))
                              for n, p in params.items()})

    def update(grads: Params, state: object, params: Params, step: int) -> tuple[Params, object]:
        return {n: -rates[_key(n)] * g for n, g in grads.items()}, state

    return InnerOptimizer(lambda params: None, update, rates, name="per_parameter_lr")


def per_layer_per_step_lr(params: Params, init_lr: float, steps: int) -> InnerOptimizer:
    """MAML++ LSLR: one learned rate per parameter tensor and inner step."""
    rates = nn.ParameterDict({_key(n): nn.Parameter(torch.full((steps,), float(init_lr),
                                                                 dtype=p.dtype, device=p.device))
                              for n, p in params.items()})

    def update(grads: Params, state: object, params: Params, step: int) -> tuple[Params, object]:
        # Evaluation may run more steps than were meta-trained: keep using the last learned rate.
        return {n: -rates[_key(n)][min(step, steps - 1)] * g for n, g in grads.items()}, state

    return InnerOptimizer(lambda params: None, update, rates, name="per_layer_per_step_lr")


def with_l2(opt: InnerOptimizer, strength: float) -> InnerOptimizer:
    """Add `strength * (params - start)` to the gradient: proximal pull toward the starting point."""
    def init(params: Params) -> object:
        return ({n: p for n, p in params.items()}, opt.init(params))

    def update(grads: Params, state: object, params: Params, step: int) -> tuple[Params, object]:
        start, inner = state
        grads = {n: g + strength * (params[n] - start[n]) for n, g in grads.items()}
        updates, inner = opt.update(grads, inner, params, step)
        return updates, (start, inner)

    return InnerOptimizer(init, update, opt.meta_params, name=f"{opt.name}+l2")
