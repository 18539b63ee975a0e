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
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from metagrad import core, distributed
from metagrad.algorithms.base import Algorithm
from metagrad.core import Adapter, ExecPath, LossFn, Params, Path
from metagrad.inner import InnerOptimizer, learned_lstm


def detach_state(tree: Any) -> Any:
    """Every tensor of a (params, optimizer state) pytree detached: the cut of truncated BPTT."""
    return tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, tree)


class L2O(Algorithm):
    """A learned inner optimizer meta-trained by truncated BPTT from a fixed (or learned) start."""

    refused_options = {"parallel": "truncated BPTT takes several outer steps per iteration, each on the state "
                                   "the previous one left; shard it by running one L2O per process"}

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

    def meta_parameters(self) -> dict[str, nn.Parameter]:
        """The learned optimizer's weights (and the model's parameters with `learn_init`), named."""
        return {n: p for n, p in self.named_parameters() if p.requires_grad
                and (self.learn_init or n.startswith("inner_meta_params."))}

    def start(self) -> Params:
        """The starting point of every task: the model's parameters, a constant unless `learn_init`."""
        return self.params() if self.learn_init else {n: p.detach() for n, p in self.params().items()}

    def segment(self, params: Params, state: Any, batch: Any, first: int, steps: int,
                path: ExecPath | None = None) -> tuple[Tensor, Params, Any]:
        """`steps` inner steps from step `first` on every task; per-task params and state carry a leading
        `[tasks]` dimension. Returns query losses `[tasks, steps]` (after each step), params and state."""
        path = ExecPath.parse(path or self.exec_path()).replace(parallel=False)
        leaves, spec = tree_flatten(state)
        batched = [i for i, t in enumerate(leaves) if isinstance(t, Tensor)]
        constants: list[Any] = []  # non-tensor state (a step count): the same for every task

        def one_task(on: Adapter, p: Params, s: list[Tensor], support: Any, query: Any):
            full = list(leaves)
            for i, t in zip(batched, s):
                full[i] = t
            st = tree_unflatten(full, spec)
            losses = []
            for k in range(first, first + steps):
                p, st, _ = on.step(p, st, support, k)
                losses.append(on.loss(p, query, k + 1))
            new, _ = tree_flatten(st)
            constants[:] = [t for t in new if not isinstance(t, Tensor)]
            return torch.stack(losses), p, [t for t in new if isinstance(t, Tensor)]

        losses, params, tensors = core.map_tasks(one_task, self.adapter(), path, params,
                                                 [leaves[i] for i in batched], batch.support, batch.query)
        new = iter(tensors)
        consts = iter(constants)
        full = [next(new) if isinstance(t, Tensor) else next(consts, t) for t in leaves]
        return losses, params, tree_unflatten(full, spec)

    def initial(self, batch: Any) -> tuple[Params, Any]:
        """Start parameters and optimizer state of every task, each with a leading `[tasks]` dimension."""
        start = self.start()
        params = {n: p.unsqueeze(0).expand(len(batch), *p.shape) for n, p in start.items()}
        state = tree_map(lambda t: t.unsqueeze(0).expand(len(batch), *t.shape).contiguous()
                         if isinstance(t, Tensor) else t, self.inner_opt.init(start))
        return params, state

    def objective(self, batch: Any, iteration: int, path: ExecPath) -> tuple[Tensor, dict[str, Tensor]]:
        params, state = self.initial(batch)
        losses, _, _ = self.segment(params, state, batch, 0, self.inner_steps, path)
        return losses.mean(), {"final_loss": losses[:, -1].detach().mean()}

    def train_step(self, batch: Any, optimizer: torch.optim.Optimizer,
                   iteration: int | None = None) -> dict[str, float]:
        """One iteration: `inner_steps / unroll` truncations, each followed by an outer update."""
        self._check_batch(batch)
        if distributed.world() > 1:
            raise ValueError("L2O cannot be sharded over the ranks of a torchrun job: "
                             + self.refused_options["parallel"])
        iteration = int(self.iteration) if iteration is None else int(iteration)
        path = self._path_for(batch, iteration)
        params, state = self.initial(batch)
        seg_losses, norms = [], []
        weights = self.meta_parameters()
        for first in range(0, self.inner_steps, self.unroll):
            with torch.enable_grad():
                losses, params, state = self.segment(params, state, batch, first,
                                                     min(self.unroll, self.inner_steps - first), path)
                loss = losses.mean()
                core.check_finite(loss, f"L2O truncated loss at iteration {iteration}, step {first}")
                grads = torch.autograd.grad(loss, list(weights.values()), allow_unused=True)
            self._set_grads({n: g if g is not None else torch.zeros_like(p)
                             for (n, p), g in zip(weights.items(), grads)})
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad)
                                                         for p in weights.values()]))
            core.check_finite(norm, f"L2O meta-gradient norm at iteration {iteration}")
            optimizer.step()
            params, state = detach_state((params, state))
            seg_losses.append(float(loss.detach()))
            norms.append(float(norm))
        self.timer.ran = path
        self.iteration.fill_(iteration + 1)
        return {"meta_loss": sum(seg_losses) / len(seg_losses), "final_loss": float(losses[:, -1].detach().mean()),
                "grad_norm": max(norms)}
