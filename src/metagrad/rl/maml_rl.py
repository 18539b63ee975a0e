"""MAML for reinforcement learning (Finn et al. 2017, algorithm 3) with the exact meta-policy-gradient.

    for each iteration:
        sample a batch of tasks T_i (environment settings)
        for each T_i:
            sample K support trajectories D_i with pi_theta                     (rollout, all tasks at once)
            theta_i' = theta - alpha grad L_i(theta; D_i)                       (Adapter.adapt: a policy-gradient step)
            sample K query trajectories D_i' with pi_theta_i'                   (rollout of the adapted policies)
        theta <- outer step on grad_theta mean_i  box(log pi_theta(D_i)) * L_i(theta_i'; D_i')

The objective is the expected post-update return J(theta) = E_{D ~ pi_theta}[ E_{D' ~ pi_theta'}[R(D')] ],
theta' = U(theta, D). Its gradient has two parts: the gradient through U (what the original MAML-RL code
computes) and `E[R(D') grad log pi_theta(D)]`, the term through the sampling distribution of the inner
trajectories, which that code drops. Here the second part comes from DiCE (Foerster et al. 2018): the
query loss, whose value is the return, is multiplied by the magic box `exp(S - stop(S))` of S = log
pi_theta(D), the log-probability of the task's support actions, the stochastic nodes upstream of the
query returns. The inner loss stays the plain REINFORCE surrogate, so `grad U` is the derivative of the
sampled update; with both, `order=2` is an unbiased estimate of grad J (tests/test_rl.py checks it by
exact enumeration on a bandit). Putting the magic box in the inner loss instead (ProMP's "DiCE-MAML",
close to its LVC) differentiates the expected update rather than the sampled one: it agrees with grad J
to first order in the inner rate only, but its variance is far lower (DiCE's term multiplies the return
by the score of every support action). `sampling_term="lvc"` is that estimator with ProMP's per-step
likelihood ratio (LVC); `sampling_term="none"` is the original estimator (biased at first order).
`order=1` is first-order MAML: the query loss's gradient at theta', applied to theta, no sampling term.
`inner_steps=0` trains one policy on all tasks pooled (the pretrained baseline). An environment with
`query_settings(settings)` (`Trading`) runs the query trajectories elsewhere than the support's: walk-forward,
the dates after the window the policy adapted on.

The outer step (`outer`, taken by `train_step`, so `train.meta_train` runs all three with checkpoints and
resume): "gradient", any torch optimizer on `meta_gradient` (Adam in the experiments); "trpo", the MAML
paper's TRPO step `metagrad.rl.trpo.trpo_step` (conjugate gradient on Fisher-vector products through the
inner step, `max_kl`, line search; it optimises the original surrogate); "ppo", ProMP's PPO-clip step
`metagrad.rl.ppo.ppo_step` (`ppo_epochs` optimizer steps on the clipped surrogate of the same trajectories,
the inner step re-run through the graph each time, clip `ppo_clip`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from metagrad import core
from metagrad.algorithms.base import Algorithm, MetaGradient
from metagrad.core import Adapter, ExecPath
from metagrad.rl import ppo, trpo
from metagrad.rl.losses import PolicyGradientLoss, magic_box
from metagrad.rl.rollout import add_advantages, rollout

Params = dict[str, Tensor]


def post_update_loss(on: Adapter, theta: Params, adapted: Params, support: Any, query: Any,
                     sampling_term: str = "dice", baseline: Tensor | float = 0.0) -> tuple[Tensor, dict[str, Tensor]]:
    """One task's meta-loss: the query loss L of the adapted policy and, at order 2, DiCE's sampling term
    `(box(S) - 1) * (L - b)`, S the support trajectories' log-probability under theta. The value stays L;
    the gradient gains `grad S * (L - b)`, unbiased for any `baseline` b independent of this task's
    support trajectories (b = 0 is `box(S) * L`, DiCE without a baseline; see the module doc)."""
    loss, metrics = on.evaluate(adapted, query)
    if sampling_term == "dice" and on.order == 2 and on.steps > 0:
        box = magic_box(on.task_loss.log_prob_sum(on.f, theta, support))
        loss = loss + (box - 1) * (loss.detach() - baseline)
    return loss, metrics


class MAMLRL(Algorithm):
    """MAML with policy-gradient inner steps on trajectories sampled inside the meta-gradient.

    A batch is a tensor of task settings `[tasks, ...]` from `env.sample_tasks` (goals, arm probabilities).
    `episodes` is K, the trajectories per task and step; `gamma`, `gae_lambda`, `baseline` ('linear': the
    MAML paper's feature baseline refitted per task, leave-one-out) and `normalize_advantages` shape the
    advantages; `sampling_baseline` subtracts from each task's return in the DiCE sampling term the mean of
    the other tasks' (unbiased: they are independent of its support trajectories). Rollouts draw from a
    generator seeded by (`seed`, iteration): the same seed and iteration give the same trajectories.
    `outer` chooses the outer step `train_step` takes (see the module doc): "gradient", "trpo" or "ppo".
    """

    OUTER_STEPS = ("gradient", "trpo", "ppo")

    refused_options = {"parallel": "trajectories are sampled inside the meta-gradient from one generator; "
                                   "shard the tasks of a meta-RL batch yourself"}

    def __init__(self, policy: nn.Module, env: Any, episodes: int = 20, inner_lr: float = 0.1, inner_steps: int = 1,
                 order: int = 2, gamma: float = 0.99, gae_lambda: float = 1.0, baseline: str | None = "linear",
                 normalize_advantages: bool = True, sampling_term: str = "dice", sampling_baseline: bool = True,
                 path: str = "loop", seed: int = 0, outer: str = "gradient", max_kl: float = 0.01,
                 ppo_clip: float = 0.3, ppo_epochs: int = 5) -> None:
        space = getattr(policy, "space", None) or env.action_space
        if space != env.action_space:
            raise ValueError(f"the policy's action space {space} does not fit the environment's {env.action_space}")
        if sampling_term not in ("dice", "lvc", "none"):
            raise ValueError(f"sampling_term must be 'dice' (exact), 'lvc' (ProMP's low-variance objective, exact "
                             f"to first order in inner_lr) or 'none' (the original MAML-RL estimator), got "
                             f"{sampling_term!r}")
        if path not in ("loop", "vmap"):
            raise ValueError(f"MAMLRL runs on path 'loop' or 'vmap', got {path!r}")
        if int(episodes) != episodes or episodes < 1:
            raise ValueError(f"episodes must be a positive integer, got {episodes!r}")
        if outer not in self.OUTER_STEPS:
            raise ValueError(f"outer must be one of {self.OUTER_STEPS}, got {outer!r}")
        if not (max_kl > 0 and 0 < ppo_clip < 1 and int(ppo_epochs) == ppo_epochs and ppo_epochs >= 1):
            raise ValueError(f"need max_kl > 0, 0 < ppo_clip < 1 and a positive integer ppo_epochs; got max_kl="
                             f"{max_kl!r}, ppo_clip={ppo_clip!r}, ppo_epochs={ppo_epochs!r}")
        loss = PolicyGradientLoss(space, lvc=sampling_term == "lvc")
        super().__init__(policy, inner_lr, inner_steps, order, task_loss=loss, path=path)
        self.env, self.space, self.episodes = env, space, int(episodes)
        self.gamma, self.gae_lambda, self.baseline = float(gamma), float(gae_lambda), baseline
        self.normalize_advantages, self.sampling_term, self.seed = bool(normalize_advantages), sampling_term, int(seed)
        self.sampling_baseline = bool(sampling_baseline)
        self.outer, self.max_kl, self.ppo_clip, self.ppo_epochs = outer, float(max_kl), float(ppo_clip), int(ppo_epochs)

    # -- pieces ------------------------------------------------------------------------------------------
    def generator(self, iteration: int, stream: int = 0) -> torch.Generator:
        """The rollout generator of `iteration` (and of a `stream`, e.g. meta-test)."""
        return torch.Generator().manual_seed((self.seed * 1_000_003 + iteration) * 7 + stream)

    def sample(self, params: Params, settings: Tensor, generator: torch.Generator, stacked: bool) -> dict[str, Tensor]:
        """K trajectories of every task with `params` (shared, or stacked per task), with their advantages."""
        traj = rollout(self.f, params, self.env, settings, self.episodes, self.space, generator, stacked)
        return add_advantages(traj, self.gamma, self.gae_lambda, self.baseline, self.normalize_advantages)

    def query_settings(self, settings: Tensor) -> Tensor:
        """Where each task's query trajectories run: the env's `query_settings` if it has one (`Trading`: the
        dates after the support window), else the support's settings."""
        fn = getattr(self.env, "query_settings", None)
        return settings if fn is None else fn(settings)

    def sample_pre_and_post(self, settings: Tensor, iteration: int) -> tuple[Params, dict, Params, dict]:
        """What TRPO and PPO step on: theta_old, its support trajectories, the adapted policies theta_old_i'
        (no graph) and their query trajectories; with no inner step the query trajectories are the support."""
        gen = self.generator(iteration)
        theta0 = {n: p.detach().clone() for n, p in self.params().items()}
        support = self.sample(theta0, settings, gen, stacked=False)
        if self.inner_steps == 0:
            n = settings.shape[0]
            return theta0, support, {k: v.unsqueeze(0).expand(n, *v.shape) for k, v in theta0.items()}, support
        path = ExecPath.parse(self.path)
        adapted0 = core.map_tasks(lambda on, s: on.adapt(theta0, s), self.adapter(iteration, order=0), path, support)
        return theta0, support, adapted0, self.sample(adapted0, self.query_settings(settings), gen, stacked=True)

    def train_step(self, batch: Any, optimizer: torch.optim.Optimizer,
                   iteration: int | None = None) -> dict[str, float]:
        """One outer update by the `outer` step: the optimizer on the meta-gradient, TRPO, or PPO-clip."""
        if self.outer == "gradient":
            return super().train_step(batch, optimizer, iteration)
        self._check_batch(batch)
        if self.outer == "trpo":
            r = trpo.trpo_step(self, batch, iteration, max_kl=self.max_kl)
            return {**r.metrics, "surrogate": r.surrogate_after, "kl": r.kl, "step_fraction": r.step_fraction}
        return ppo.ppo_step(self, batch, optimizer, iteration, clip=self.ppo_clip, epochs=self.ppo_epochs)

    def _check_batch(self, batch: Any) -> None:
        if not isinstance(batch, Tensor) or batch.dim() < 1 or batch.shape[0] == 0:
            raise TypeError(f"a meta-RL batch is a tensor of task settings [tasks, ...] from env.sample_tasks, "
                            f"got {type(batch).__name__}")

    # -- the paper's pseudo-code -------------------------------------------------------------------------
    def objective(self, settings: Tensor, iteration: int, path: ExecPath) -> tuple[Tensor, dict[str, Tensor]]:
        gen = self.generator(iteration)
        theta = self.params()
        adapter = self.adapter(iteration)
        if self.inner_steps == 0:  # pooled training: the query trajectories of theta itself
            query = self.sample(theta, settings, gen, stacked=False)
            losses, metrics = core.map_tasks(lambda on, q: on.evaluate(theta, q), adapter, path, query)
            return losses.mean(), {"return": metrics["return"].mean()}
        # 1. support trajectories with theta, every task
        support = self.sample(theta, settings, gen, stacked=False)
        # 2. theta_i' = inner policy-gradient steps on each task's support trajectories
        adapted = core.map_tasks(lambda on, s: on.adapt(theta, s), adapter, path, support)
        # 3. query trajectories with each adapted policy (on the dates after the support's, for a walk-forward env)
        query = self.sample(adapted, self.query_settings(settings), gen, stacked=True)
        # 4. the meta-loss: the adapted policies' query loss (with the DiCE sampling term at order 2)
        data = core.Tasks(support, query)
        baseline = self._sampling_baseline(adapter, path, adapted, data.query)
        losses, metrics = core.map_tasks(
            lambda on, a, s, q, b: post_update_loss(on, theta, a, s, q, self.sampling_term, b),
            adapter, path, adapted, data.support, data.query, baseline)
        pre = (support["rewards"] * support["mask"]).sum(-1).mean()
        return losses.mean(), {"return": metrics["return"].mean(), "return_before": pre}

    def _sampling_baseline(self, adapter: Adapter, path: ExecPath, adapted: Params, query: Any) -> Tensor:
        """Each task's baseline for the sampling term: the mean query loss of the OTHER tasks of the batch
        (independent of this task's support trajectories, so unbiased); 0 for a single task or without it."""
        n = core.task_count(query)
        if not self.sampling_baseline or n < 2 or self.sampling_term != "dice":
            return torch.zeros(n)
        with torch.no_grad():
            q = core.map_tasks(lambda on, a, d: on.evaluate(a, d)[0], adapter.replace(order=0), path,
                               {k: v.detach() for k, v in adapted.items()}, query)
        return (q.sum() - q) / (n - 1)

    def meta_gradient(self, batch: Tensor, iteration: int | None = None, chunk_size: int | None = None) -> MetaGradient:
        """The meta-policy-gradient of the tasks `batch` at `iteration` (trajectories sampled inside): pure."""
        self._check_batch(batch)
        iteration = int(self.iteration) if iteration is None else int(iteration)
        path = ExecPath.parse(self.path)
        names, leaves = zip(*self.meta_parameters().items())
        with torch.enable_grad():
            loss, metrics = self.objective(batch, iteration, path)
            core.check_finite(loss, f"meta-loss at iteration {iteration}")
            grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(leaves, grads)]
        return MetaGradient(dict(zip(names, grads)), {"meta_loss": float(loss.detach()), **{k: float(v) for k, v in
                                                                                    metrics.items()}}, path)

    def adapt(self, batch: Any, steps: int | None = None) -> Params:
        """Not for meta-RL: adaptation needs trajectories sampled along the way (`returns_after_steps`)."""
        raise TypeError("MAMLRL adapts on trajectories it samples itself: use returns_after_steps(settings, steps) "
                        "(or adapter().adapt(params, trajectories) on trajectories from metagrad.rl.rollout)")

    def adaptation_curve(self, batch: Any, steps: int) -> tuple[Tensor, Tensor | None]:
        """Not for meta-RL: see `returns_after_steps`."""
        raise TypeError("MAMLRL's adaptation curve is returns_after_steps(settings, steps): returns after 0..steps "
                        "policy-gradient steps, each on trajectories of the current policy")

    @torch.no_grad()
    def returns_after_steps(self, settings: Tensor, steps: int, seed: int = 0, params: Params | None = None,
                            inner_lr: float | None = None) -> Tensor:
        """Meta-test: each task's mean return over K fresh trajectories after 0..`steps` policy-gradient steps,
        every step on trajectories sampled with the current policy: `[tasks, steps + 1]`."""
        return self.adapt_by_sampling(settings, steps, seed, params, inner_lr)[1]

    @torch.no_grad()
    def adapt_by_sampling(self, settings: Tensor, steps: int, seed: int = 0, params: Params | None = None,
                          inner_lr: float | None = None) -> tuple[Params, Tensor]:
        """`steps` policy-gradient steps per task from `params` (default theta), each on K fresh trajectories of
        the current policy: the adapted parameters stacked `[tasks, ...]` and the mean return of the K
        trajectories before every step and after the last, `[tasks, steps + 1]`."""
        gen = torch.Generator().manual_seed(seed)
        theta = self.params() if params is None else params
        n = settings.shape[0]
        current = {k: v.detach().unsqueeze(0).expand(n, *v.shape).clone() for k, v in theta.items()}
        adapter = self.adapter(steps=1, order=0)
        if inner_lr is not None:
            from metagrad.inner import sgd
            adapter = adapter.replace(inner_opt=sgd(inner_lr))
        out = []
        for k in range(steps + 1):
            traj = self.sample(current, settings, gen, stacked=True)
            out.append((traj["rewards"] * traj["mask"]).sum(-1).mean(-1))
            if k < steps:
                current = core.map_tasks(lambda on, p, s: on.adapt(p, s), adapter, ExecPath.parse(self.path),
                                         current, traj)
        return current, torch.stack(out, 1)
