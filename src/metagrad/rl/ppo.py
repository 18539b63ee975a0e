"""ProMP's PPO-clip outer step for MAML-RL (Rothfuss et al. 2019, algorithm 1; Schulman et al. 2017).

    sample support trajectories with theta_old, adapt (no graph), sample query trajectories with theta_old_i'
    for epoch in 1..epochs, on the same trajectories:
        theta_i'(theta) = inner steps from theta on task i's support trajectories     (through the graph)
        r = pi_{theta_i'(theta)}(a|s) / pi_{theta_old_i'}(a|s)                        (every query step)
        L(theta) = -mean_i mean_steps min(r A, clip(r, 1 - eps, 1 + eps) A)
        optimizer step on grad L

The inner step is the algorithm's own (`Adapter.adapt` at its order). With `sampling_term="lvc"` it is
ProMP's LVC objective with the likelihood ratio to the policy that sampled the support trajectories,
`pi_theta / pi_theta_old` (the support data carries `sampling_log_prob`), so later epochs weight the
off-policy support steps as ProMP does. Otherwise the inner loss is the plain REINFORCE one and, as in
the TRPO step, no DiCE sampling term is added. At the first epoch r = 1 and the step is the optimizer's
on the meta-policy-gradient of the post-update surrogate (tests/test_rl.py checks it against
`MAMLRL.meta_gradient`). Not implemented: ProMP's adaptive KL penalty on the pre-update policy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from metagrad import core
from metagrad.core import ExecPath

if TYPE_CHECKING:
    from metagrad.rl.maml_rl import MAMLRL


def clipped_surrogate(logp: Tensor, logp_old: Tensor, advantages: Tensor, mask: Tensor, clip: float) -> Tensor:
    """One task's PPO-clip loss `-mean_steps min(r A, clip(r, 1 - clip, 1 + clip) A)`, r = exp(logp - logp_old),
    over `[episodes, horizon]` steps (masked steps count as zero, as in `PolicyGradientLoss`)."""
    ratio = torch.exp(logp - logp_old)
    adv = advantages.detach()
    per_step = torch.min(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv) * mask
    return -per_step.sum() / mask.numel()


def ppo_step(alg: MAMLRL, settings: Tensor, optimizer: torch.optim.Optimizer, iteration: int | None = None,
             clip: float = 0.3, epochs: int = 5) -> dict[str, float]:
    """`epochs` PPO-clip meta-updates of `alg`'s policy on one sample of the tasks `settings` (see the module
    doc); returns the metrics (return before and after adaptation, first and last surrogate, clipped fraction)."""
    iteration = int(alg.iteration) if iteration is None else int(iteration)
    path = ExecPath.parse(alg.path)
    theta0, support, adapted0, query = alg.sample_pre_and_post(settings, iteration)
    loss_fn = alg.task_loss
    frozen = alg.adapter(iteration, order=0)
    with torch.no_grad():
        logp_old = core.map_tasks(lambda on, a, q: loss_fn.log_probs(on.f, a, q), frozen, path, adapted0, query)
        sampling = core.map_tasks(lambda on, s: loss_fn.log_probs(on.f, theta0, s), frozen, path, support)
    support = {**support, "sampling_log_prob": sampling}
    adapter = alg.adapter(iteration)
    names, leaves = zip(*alg.meta_parameters().items())

    def one(on, s, q, old):
        logp = loss_fn.log_probs(on.f, on.adapt(theta, s), q)
        clipped = ((logp - old).exp() - 1).abs().gt(clip).to(logp.dtype) * q["mask"]
        return clipped_surrogate(logp, old, q["advantages"], q["mask"], clip), clipped.sum() / q["mask"].sum()

    surrogates = []
    for _ in range(epochs):
        with torch.enable_grad():
            theta = alg.params()
            losses, clipped = core.map_tasks(one, adapter, path, support, query, logp_old)
            loss = losses.mean()
            core.check_finite(loss, f"PPO surrogate at iteration {iteration}")
            grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        for p, g in zip(leaves, grads):
            p.grad = torch.zeros_like(p) if g is None else g.detach()
        optimizer.step()
        surrogates.append(float(loss.detach()))
    alg.iteration.fill_(iteration + 1)
    return {"return": float((query["rewards"] * query["mask"]).sum(-1).mean()),
            "return_before": float((support["rewards"] * support["mask"]).sum(-1).mean()),
            "surrogate_first": surrogates[0], "surrogate_last": surrogates[-1],
            "clip_fraction": float(clipped.mean())}
