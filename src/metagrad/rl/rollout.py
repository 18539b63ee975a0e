"""Rollouts of a functional policy, batched over tasks and episodes, and trajectories as task data.

`rollout(f, params, env, settings, episodes, generator)` runs `episodes` episodes of every task of
`settings [tasks, ...]` in one batch: the policy is evaluated for all tasks at once (`vmap` over the
tasks' parameters when `params` are stacked per task, one call when they are shared). It returns a
dict of tensors `[tasks, episodes, horizon, ...]`: `obs`, `actions`, `rewards` (zero after the end),
`mask` (1 while the episode runs). `add_advantages` adds `returns` and `advantages` per task. Such a
dict is the task data of meta-RL: `core.Tasks(support=..., query=...)` holds two of them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.func import vmap

from metagrad.rl import returns as R
from metagrad.rl.policies import Space, check_output, mode, sample

Params = dict[str, Tensor]


def policy_outputs(f: Any, params: Params, obs: Tensor, stacked: bool) -> Tensor:
    """The policy's outputs for `obs [tasks, episodes, obs_dim]`: one call for shared `params`, vmap over
    the tasks for `params` stacked `[tasks, ...]`."""
    if not stacked:
        return f(params, obs)
    return vmap(f)(params, obs)


@torch.no_grad()
def rollout(f: Any, params: Params, env: Any, settings: Tensor, episodes: int, space: Space,
            generator: torch.Generator | None = None, stacked: bool = False,
            horizon: int | None = None, deterministic: bool = False) -> dict[str, Tensor]:
    """`episodes` episodes of every task in `settings` with the policy `f(params, obs)` (see the module doc);
    `deterministic` takes the most likely action (Discrete) or the mean (Box) instead of sampling."""
    horizon = int(horizon or env.horizon)
    params = {n: p.detach() for n, p in params.items()}
    batch = env.batch(settings, episodes, generator)
    try:
        obs = batch.reset()
        alive = torch.ones(obs.shape[:2], dtype=torch.bool)
        rows: dict[str, list[Tensor]] = {"obs": [], "actions": [], "rewards": [], "mask": []}
        for t in range(horizon):
            out = policy_outputs(f, params, obs.to(next(iter(params.values())).dtype), stacked)
            check_output(space, out)
            actions = mode(space, out) if deterministic else sample(space, out, generator)
            next_obs, reward, done = batch.step(actions)
            reward = torch.as_tensor(reward)
            if not torch.isfinite(reward[alive]).all():
                bad = sorted({int(i) for i in (~torch.isfinite(reward) & alive).nonzero()[:, 0]})
                raise FloatingPointError(f"rollout: the environment returned non-finite rewards (NaN or inf) at step "
                                         f"{t} for tasks {bad[:10]}; rewards must be finite numbers")
            mask = alive.to(reward.dtype)
            rows["obs"].append(obs)
            rows["actions"].append(actions)
            rows["rewards"].append(torch.where(alive, reward, torch.zeros_like(reward)))
            rows["mask"].append(mask)
            alive = alive & ~done.bool()
            obs = next_obs
    finally:
        batch.close()
    return {k: torch.stack(v, 2) for k, v in rows.items()}


def add_advantages(traj: dict[str, Tensor], gamma: float = 0.99, gae_lambda: float = 1.0,
                   baseline: str | None = "linear", normalize: bool = True,
                   leave_one_out: bool = True) -> dict[str, Tensor]:
    """`traj` with `returns` (discounted reward-to-go) and `advantages` (GAE on the per-task linear baseline,
    or the returns themselves without a baseline; standardised per task with `normalize`)."""
    if baseline not in (None, "linear"):
        raise ValueError(f"baseline must be 'linear' or None, got {baseline!r}")
    rew, mask = traj["rewards"], traj["mask"]
    ret = R.discounted_returns(rew, mask, gamma)
    if baseline == "linear":
        values = R.linear_baseline(traj["obs"], ret, mask, leave_one_out=leave_one_out)
        adv = R.gae(rew, values, mask, gamma, gae_lambda)
    else:
        adv = ret
    if normalize:
        adv = R.normalize(adv, mask)
    return {**traj, "returns": ret, "advantages": adv}
