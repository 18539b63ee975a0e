"""Learning to learn by gradient descent by gradient descent (Andrychowicz et al. 2016).

The optimizer is the meta-learned object: a coordinate-wise LSTM (`inner.learned_lstm`) takes
each task from a fixed start theta_0 (the model's parameters, not trained unless `learn_init`),
and its weights phi are trained by truncated back-propagation through the unrolled inner loop:

    for each iteration:
        sample a batch of tasks T_i;  theta_i <- theta_0;  state_i <- init
        for each truncation of `unroll` steps t = s .. s+unroll-1:
            theta_i, state_i <- theta_i + m(grad L_support(theta_i), state_i; phi)   (every task)
            L = mean_i mean_t L_query(theta_i after step t)
            phi <- phi - outer step on grad_phi L       (order 1: d grad / d phi dropped, as in the paper)
            theta_i, state_i <- detached                (the truncation)

`meta_loss` is the same objective over the whole horizon without truncation (its gradient is the
full back-propagation through time). Any `InnerOptimizer` plugs in; `MAML(model,
inner_opt=learned_lstm(...))` instead learns the start and the optimizer together.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.func import vmap
from torch.utils._pytree import tree_map

from metagrad import core
from metagrad.algorithms.base import Algorithm
from metagrad.core import LossFn, Params, Path, TaskBatch
from metagrad.inner import InnerOptimizer, learned_lstm


def detach_state(tree: Any) -> Any:
    """Every tensor of a (params, optimizer state) pytree detached: the cut of truncated BPTT."""
    return tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, tree)


def _stack(*tensors: Tensor) -> Tensor:
    return torch.stack(tensors)


class L2O(Algorithm):
    """A learned inner optimizer meta-trained by truncated BPTT from a fixed (or learned) start."""

    def __init__(
        self,
        model: nn.Module,
        inner_opt: InnerOptimizer | None = None,
        inner_steps: int = 20,
        unroll: int = 5,
        order: int = 1,
        loss_fn: LossFn | None = None,
        path: Path = "auto",
        learn_init: bool = False,
        inner_lr: float = 0.01,
    ) -> None:
        inner_opt = inner_opt or learned_lstm(inner_lr, dtype=next(model.parameters()).dtype)
        super().__init__(model, inner_lr=inner_lr, inner_steps=inner_steps, order=order, loss_fn=loss_fn,
                         inner_opt=inner_opt, path=path)
        if int(unroll) != unroll or unroll < 1:
            raise ValueError(f"unroll must be a positive integer, got {unroll!r}")
        if self.inner_steps < 1:
            raise ValueError(f"inner_steps must be at least 1 for L2O, got {inner_steps!r}")
        if not self.inner_opt.meta_params and not learn_init:
            raise ValueError("L2O needs something to learn: an inner_opt with meta_params (e.g. learned_lstm) "
                             "or learn_init=True")
        self.unroll = int(unroll)
        self.learn_init = bool(learn_init)

    def parameters(self, recurse: bool = True):
        """What the outer optimizer trains: the learned optimizer's weights, and the start if `learn_init`."""
        return super().parameters(recurse) if self.learn_init else self.inner_meta_params.parameters(recurse)

    def start(self) -> Params:
        """The starting point of every task: the model's parameters, a constant unless `learn_init`."""
        return self.params() if self.learn_init else {n: p.detach() for n, p in self.params().items()}

    def segment(self, params: Params, state: Any, batch: TaskBatch, first: int, steps: int
                ) -> tuple[Tensor, Params, Any]:
        """`steps` inner steps from step `first` on every task; per-task params and state carry a leading
        `[tasks]` dimension. Returns query losses `[tasks, steps]` (after each step), params and state."""
        order, path = self.order, self.exec_path()

        def one_task(p: Params, s: Any, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor, vmapped: bool):
            losses, f = [], core.for_vmap(self.f) if vmapped else self.f
            for k in range(first, first + steps):
                p, s, _ = core.inner_step(f, self.loss_fn, p, s, sx, sy, self.inner_opt, k, order,
                                          vmapped=vmapped)
                losses.append(self.loss_fn(f(p, qx), qy))
            return torch.stack(losses), p, s

        if core.parse_path(path)[0] == "vmap":
            return vmap(lambda p, s, *t: one_task(p, s, *t, vmapped=True), randomness="different")(
                params, state, *batch.tensors())
        outs = [one_task(tree_map(lambda t, i=i: t[i], params), tree_map(lambda t, i=i: t[i], state),
                         *(t[i] for t in batch.tensors()), vmapped=False) for i in range(len(batch))]
        return torch.stack([o[0] for o in outs]), tree_map(_stack, *[o[1] for o in outs]), \
            tree_map(_stack, *[o[2] for o in outs])

    def initial(self, batch: TaskBatch) -> tuple[Params, Any]:
        """Start parameters and optimizer state of every task, each with a leading `[tasks]` dimension."""
        start = self.start()
        params = {n: p.unsqueeze(0).expand(len(batch), *p.shape) for n, p in start.items()}
        state = tree_map(lambda t: t.unsqueeze(0).expand(len(batch), *t.shape).contiguous(),
                         self.inner_opt.init(start))
        return params, state

    def _meta_loss(self, batch: TaskBatch) -> tuple[Tensor, dict[str, float]]:
        params, state = self.initial(batch)
        losses, _, _ = self.segment(params, state, batch, 0, self.inner_steps)
        return losses.mean(), {"final_loss": float(losses[:, -1].detach().mean())}

    def meta_step(self, batch: TaskBatch, optimizer: torch.optim.Optimizer) -> dict[str, float]:
        """One iteration: `inner_steps / unroll` truncations, each followed by an outer update."""
        self._check_batch(batch)
        params, state = self.initial(batch)
        seg_losses, norms = [], []
        for first in range(0, self.inner_steps, self.unroll):
            optimizer.zero_grad(set_to_none=True)
            losses, params, state = self.segment(params, state, batch, first,
                                                 min(self.unroll, self.inner_steps - first))
            loss = losses.mean()
            core.check_finite(loss, f"L2O truncated loss at iteration {int(self.iteration)}, step {first}")
            loss.backward()
            grads = [p.grad for p in self.parameters() if p.grad is not None]
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
            core.check_finite(norm, f"L2O meta-gradient norm at iteration {int(self.iteration)}")
            optimizer.step()
            params, state = detach_state((params, state))
            seg_losses.append(float(loss.detach()))
            norms.append(float(norm))
        self.iteration += 1
        return {"meta_loss": sum(seg_losses) / len(seg_losses), "final_loss": float(losses[:, -1].detach().mean()),
                "grad_norm": max(norms)}
