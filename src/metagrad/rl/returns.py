"""Discounted returns, generalised advantage estimation, and the MAML paper's linear feature baseline.

All work on trajectories `[..., episodes, horizon]` with a `mask` that is 1 while the episode runs
(rewards after the end are zero and count nowhere).
"""

from __future__ import annotations

import torch
from torch import Tensor


def discounted_returns(rewards: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """Reward-to-go `G_t = sum_{k >= t} gamma^(k-t) r_k` over each episode's running steps: `[..., horizon]`."""
    rewards = rewards * mask
    out = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[..., 0])
    for t in range(rewards.shape[-1] - 1, -1, -1):
        running = rewards[..., t] + gamma * running
        out[..., t] = running
    return out * mask


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> Tensor:
    """Generalised advantage estimation (Schulman et al. 2016): `A_t = sum_k (gamma lam)^k delta_{t+k}` with
    `delta_t = r_t + gamma V_{t+1} - V_t`; the value after the last running step is 0 (the MAML code's
    convention: the horizon ends the episode). `lam = 1` gives `G_t - V_t`."""
    rewards, values = rewards * mask, values * mask
    next_values = torch.cat([values[..., 1:], torch.zeros_like(values[..., :1])], -1)
    delta = (rewards + gamma * next_values - values) * mask
    out = torch.zeros_like(delta)
    running = torch.zeros_like(delta[..., 0])
    for t in range(delta.shape[-1] - 1, -1, -1):
        running = delta[..., t] + gamma * lam * running * (mask[..., t + 1] if t + 1 < mask.shape[-1] else 0)
        out[..., t] = running
    return out * mask


def baseline_features(obs: Tensor, mask: Tensor) -> Tensor:
    """The MAML code's (rllab's) linear-baseline features per step: obs, obs^2, t, t^2, t^3, 1, with t the
    step index / 100 and obs clipped to [-10, 10]: `[..., horizon, 2 * obs_dim + 4]`, zero after the end."""
    o = obs.clamp(-10, 10)
    t = torch.arange(obs.shape[-2], dtype=obs.dtype, device=obs.device) / 100.0
    t = t.expand(obs.shape[:-1]).unsqueeze(-1)
    feats = torch.cat([o, o ** 2, t, t ** 2, t ** 3, torch.ones_like(t)], -1)
    return feats * mask.unsqueeze(-1)


def linear_baseline(obs: Tensor, returns: Tensor, mask: Tensor, reg: float = 1e-5,
                    leave_one_out: bool = True) -> Tensor:
    """Values `[..., episodes, horizon]` of the linear feature baseline fitted per task by ridge least squares
    on the returns of its episodes (`obs [..., episodes, horizon, obs_dim]`; the leading dims are tasks).

    `leave_one_out=True` fits each episode's baseline on the task's OTHER episodes, so it is independent of
    the episode it is subtracted from and the policy gradient's expectation is exactly unchanged; the MAML
    code fits on all episodes (`False`), which biases the gradient by O(1/episodes). Fitted in float64.
    """
    X = baseline_features(obs.double(), mask.double())              # [..., E, H, d]
    y = (returns * mask).double()
    per_ep_xx = X.transpose(-1, -2) @ X                              # [..., E, d, d]
    per_ep_xy = (X.transpose(-1, -2) @ y.unsqueeze(-1)).squeeze(-1)  # [..., E, d]
    xx, xy = per_ep_xx.sum(-3, keepdim=True), per_ep_xy.sum(-2, keepdim=True)
    if leave_one_out:
        if obs.shape[-3] < 2:
            return torch.zeros_like(returns)
        xx, xy = xx - per_ep_xx, xy - per_ep_xy
    eye = torch.eye(X.shape[-1], dtype=X.dtype, device=X.device)
    w = torch.linalg.solve(xx + reg * eye, xy.unsqueeze(-1)).squeeze(-1)  # [..., E or 1, d]
    values = (X @ w.unsqueeze(-1)).squeeze(-1)
    return values.to(returns.dtype) * mask


def normalize(advantages: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """Advantages standardised per task over its running steps (mean 0, std 1), as in the MAML code."""
    dims = (-2, -1)
    n = mask.sum(dims, keepdim=True).clamp(min=1)
    mean = (advantages * mask).sum(dims, keepdim=True) / n
    var = (((advantages - mean) * mask) ** 2).sum(dims, keepdim=True) / n
    return (advantages - mean) / (var.sqrt() + eps) * mask
