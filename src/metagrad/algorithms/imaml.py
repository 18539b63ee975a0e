"""iMAML, implicit MAML (Rajeswaran, Finn, Kakade & Levine 2019).

    for each iteration:
        sample a batch of tasks T_i
        for each T_i:
            phi_i = argmin_phi L_support(phi) + lam/2 ||phi - theta||^2    (inner_steps of gradient descent
                                                                            at inner_lr on this objective)
            g_i = grad L_query(phi_i)
            v_i = (I + H_i / lam)^-1 g_i,  H_i = hessian L_support(phi_i)   (cg_steps of conjugate gradient,
                                                                            Hessian-vector products only)
        theta <- theta - beta * mean_i v_i

At the exact regularised optimum, d phi_i / d theta = (I + H_i / lam)^-1, so v_i is the exact
meta-gradient whatever path the inner solver took; only the memory of one task's Hessian-vector
product is needed, not the inner trajectory. `cg_damping` solves (I (1 + damping) + H / lam) v = g
instead, which keeps the system positive definite where the support loss is not convex; CG also stops
at the first direction of negative curvature (truncated CG), so v_i stays a descent direction. `order=1`
drops the Hessian (v_i = g_i: first-order iMAML). Meta-test adapts with the same regularised inner loop.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import grad, vjp

from metagrad import core
from metagrad.algorithms.base import Algorithm, check_steps
from metagrad.core import Adapter, ExecPath, LossFn, Params, Path
from metagrad.inner import sgd, with_l2


def _dot(a: Params, b: Params) -> Tensor:
    return sum((a[n] * b[n]).sum() for n in a)


def conjugate_gradient(matvec: Callable[[Params], Params], b: Params, steps: int) -> Params:
    """`steps` iterations of conjugate gradient for `matvec(x) = b` from x = 0, truncated (x frozen) at the
    first direction of non-positive curvature, where CG has no minimum to go to; no branch, so it runs under vmap."""
    x = {n: torch.zeros_like(t) for n, t in b.items()}
    r = dict(b)
    p = dict(b)
    rr = _dot(r, r)
    active = torch.ones_like(rr, dtype=torch.bool)
    for _ in range(steps):
        ap = matvec(p)
        pap = _dot(p, ap)
        # rr == 0 means converged; pap <= 0 means A is not positive definite along p: stop either way.
        active = active & (pap > 0) & (rr > 0)
        alpha = torch.where(active, rr / torch.where(active, pap, torch.ones_like(pap)), torch.zeros_like(rr))
        x = {n: x[n] + alpha * p[n] for n in x}
        r = {n: r[n] - alpha * ap[n] for n in r}
        rr_new = _dot(r, r)
        beta = torch.where(active, rr_new / torch.where(active, rr, torch.ones_like(rr)), torch.zeros_like(rr))
        p = {n: r[n] + beta * p[n] for n in p}
        rr = rr_new
    return x


class IMAML(Algorithm):
    """Implicit MAML: the meta-gradient from the implicit function theorem, solved by conjugate gradient."""

    def __init__(
        self,
        model: nn.Module,
        inner_lr: float = 0.01,
        inner_steps: int = 10,
        order: int = 2,
        loss_fn: LossFn | None = None,
        path: Path = "auto",
        eval_steps: int | None = None,
        lam: float = 2.0,
        cg_steps: int = 5,
        cg_damping: float = 1.0,
    ) -> None:
        if not lam > 0:
            raise ValueError(f"lam (the proximal regularisation strength) must be positive, got {lam!r}")
        if not cg_damping >= 0:
            raise ValueError(f"cg_damping must be non-negative, got {cg_damping!r}")
        inner_opt = with_l2(sgd(inner_lr), lam)
        super().__init__(model, inner_lr, inner_steps, order, loss_fn, inner_opt, path, eval_steps=eval_steps)
        self.lam = float(lam)
        self.cg_steps = check_steps(cg_steps=cg_steps)
        self.cg_damping = float(cg_damping)

    def _task(self, on: Adapter, theta: Params, support: Any, query: Any) -> tuple[Tensor, Params]:
        """Query loss at phi and the implicit meta-gradient v of one task."""
        phi = on.adapt(theta, support)  # the adapter's order is 0: no graph to theta
        g, query_loss = grad(lambda p: (on.loss(p, query),) * 2, has_aux=True)(phi)
        if self.order == 1:
            return query_loss, g
        # One backward graph of grad L_support at phi, reused by every Hessian-vector product (H is symmetric).
        _, hvp = vjp(grad(lambda p: on.loss(p, support)), phi)

        def matvec(v: Params) -> Params:
            hv = hvp(v)[0]
            return {n: (1.0 + self.cg_damping) * v[n] + hv[n] / self.lam for n in v}

        return query_loss, conjugate_gradient(matvec, g, self.cg_steps)

    def objective(self, batch: Any, iteration: int, path: ExecPath) -> tuple[Tensor, dict[str, Tensor]]:
        theta = self.params()
        detached = {n: p.detach() for n, p in theta.items()}
        losses, v = core.map_tasks(lambda on, s, q: self._task(on, detached, s, q), self.adapter(order=0), path,
                                   batch.support, batch.query)
        direction = {n: v[n].mean(0).detach() for n in theta}  # mean_i v_i
        # Surrogate: value = mean query loss after adaptation, gradient with respect to theta = mean_i v_i.
        surrogate = sum((theta[n] * direction[n]).sum() for n in theta)
        return losses.mean().detach() + surrogate - surrogate.detach(), {}
