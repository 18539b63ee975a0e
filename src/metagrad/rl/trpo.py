"""The MAML paper's TRPO outer step (Schulman et al. 2015, as in Finn et al. 2017 for meta-RL).

    sample support trajectories with theta, adapt (no graph), sample query trajectories with the adapted policies
    L(theta)  = -mean_i mean_{query steps} ratio_i * A       ratio = pi_{theta_i'(theta)}(a|s) / pi_old'(a|s)
    KL(theta) =  mean_i mean_{query states} KL(pi_old'(.|s) || pi_{theta_i'(theta)}(.|s))
    g = grad L at theta_old;  F v = Hessian-vector product of KL through the inner step (double backward)
    x = CG(F, -g) (cg_iters, damping);  step = sqrt(2 max_kl / x^T F x) x
    backtracking line search: the largest step_frac^j * step with L lower and KL <= max_kl (else no step)

theta_i'(theta) re-adapts on the SAME support trajectories, through `Adapter.adapt` at the algorithm's
order, so the gradient and the Fisher products go through the inner policy-gradient step. The step
optimises the original MAML-RL surrogate, as the MAML paper's TRPO did: the inner loss is the plain
REINFORCE one and no sampling term is added, whatever `alg.sampling_term` says. The DiCE and LVC
estimators are not derivatives of the surrogate the line search evaluates (LVC's Hessian differs from
that of the sampled update), so the search could not check their steps: measured on a tiny nav2d
problem, the LVC direction raised the evaluated surrogate at every step size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from metagrad import core
from metagrad.core import ExecPath
from metagrad.rl.losses import PolicyGradientLoss
from metagrad.rl.policies import Box, Discrete, Space

if TYPE_CHECKING:
    from metagrad.rl.maml_rl import MAMLRL

Params = dict[str, Tensor]


def kl_divergence(space: Space, old: Tensor, new: Tensor) -> Tensor:
    """KL(old || new) of the distributions the policy outputs `old`, `new` describe: `old.shape[:-1]`."""
    if isinstance(space, Discrete):
        lp_old, lp_new = torch.log_softmax(old, -1), torch.log_softmax(new, -1)
        return (lp_old.exp() * (lp_old - lp_new)).sum(-1)
    assert isinstance(space, Box)
    m0, s0 = old[..., :space.dim], old[..., space.dim:]
    m1, s1 = new[..., :space.dim], new[..., space.dim:]
    return (s1 - s0 + (torch.exp(2 * s0) + (m0 - m1) ** 2) / (2 * torch.exp(2 * s1)) - 0.5).sum(-1)


@dataclass
class TRPOResult:
    """What one TRPO step did: surrogate and KL before/after, the accepted step fraction (0: rejected)."""

    surrogate_before: float
    surrogate_after: float
    kl: float
    step_fraction: float
    metrics: dict


def _conjugate_gradient(fvp, b: Tensor, iters: int, tol: float = 1e-10) -> Tensor:
    x = torch.zeros_like(b)
    r, p = b.clone(), b.clone()
    rr = r @ r
    for _ in range(iters):
        Ap = fvp(p)
        alpha = rr / (p @ Ap)
        x += alpha * p
        r -= alpha * Ap
        new = r @ r
        if new < tol:
            break
        p = r + new / rr * p
        rr = new
    return x


def trpo_step(alg: MAMLRL, settings: Tensor, iteration: int | None = None, max_kl: float = 0.01,
              cg_iters: int = 10, damping: float = 0.01, backtrack: float = 0.5, ls_steps: int = 15) -> TRPOResult:
    """One TRPO meta-update of `alg`'s policy on the tasks `settings` (see the module doc); returns what it did."""
    iteration = int(alg.iteration) if iteration is None else int(iteration)
    path = ExecPath.parse(alg.path)
    theta0, support, adapted0, query = alg.sample_pre_and_post(settings, iteration)
    space = alg.space
    with torch.no_grad():
        old_out = core.map_tasks(lambda on, a, q: on.f(a, q["obs"]), alg.adapter(order=0), path, adapted0, query)
    # The plain inner loss: the line search evaluates this surrogate, so its gradient must be the surrogate's own.
    adapter = alg.adapter(iteration).replace(task_loss=PolicyGradientLoss(space))

    def surrogate_and_kl(theta: Params) -> tuple[Tensor, Tensor]:
        def one(on, s, q, old):
            out = on.f(on.adapt(theta, s), q["obs"])
            logp = alg.task_loss.log_probs(lambda p, o: out, None, q)
            logp_old = alg.task_loss.log_probs(lambda p, o: old, None, q)
            ratio = torch.exp(logp - logp_old)
            loss = -(ratio * q["advantages"] * q["mask"]).sum() / q["mask"].numel()
            kl = (kl_divergence(space, old, out) * q["mask"]).sum() / q["mask"].sum().clamp(min=1)
            return loss, kl

        losses, kls = core.map_tasks(one, adapter, path, support, query, old_out)
        return losses.mean(), kls.mean()

    names = list(theta0)
    flat0 = torch.cat([theta0[n].reshape(-1) for n in names])

    def unflat(v: Tensor) -> Params:
        out, i = {}, 0
        for n in names:
            k = theta0[n].numel()
            out[n] = v[i:i + k].view_as(theta0[n])
            i += k
        return out

    theta = {n: t.clone().requires_grad_(True) for n, t in theta0.items()}
    with torch.enable_grad():
        loss, _ = surrogate_and_kl(theta)
        g = torch.cat([x.reshape(-1) for x in torch.autograd.grad(loss, list(theta.values()))])

    # The KL's gradient with its graph, built once; every Fisher-vector product differentiates it again.
    th = {n: t.clone().requires_grad_(True) for n, t in theta0.items()}
    with torch.enable_grad():
        _, kl0 = surrogate_and_kl(th)
        kl_grads = torch.autograd.grad(kl0, list(th.values()), create_graph=True)

    def fvp(v: Tensor) -> Tensor:
        with torch.enable_grad():
            gv = sum((gi * vi).sum() for gi, vi in zip(kl_grads, unflat(v).values()))
            hv = torch.autograd.grad(gv, list(th.values()), retain_graph=True)
        return torch.cat([h.reshape(-1) for h in hv]) + damping * v

    x = _conjugate_gradient(fvp, -g, cg_iters)
    shs = 0.5 * (x @ fvp(x))
    full = x * torch.sqrt(max_kl / shs.clamp(min=1e-12))
    before = float(loss.detach())
    accepted, after, kl_after = 0.0, before, 0.0
    frac = 1.0
    with torch.no_grad():
        for _ in range(ls_steps):
            cand = unflat(flat0 + frac * full)
            new_loss, new_kl = surrogate_and_kl(cand)
            if float(new_loss) < before and float(new_kl) <= max_kl:
                accepted, after, kl_after = frac, float(new_loss), float(new_kl)
                for n, p in alg.params().items():
                    p.copy_(cand[n])
                break
            frac *= backtrack
    alg.iteration.fill_(iteration + 1)
    ret = float((query["rewards"] * query["mask"]).sum(-1).mean())
    pre = float((support["rewards"] * support["mask"]).sum(-1).mean())
    return TRPOResult(before, after, kl_after, accepted, {"return": ret, "return_before": pre})
