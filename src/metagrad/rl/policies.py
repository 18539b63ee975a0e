"""Functional policies: `f(params, obs)` gives the parameters of a distribution over actions.

A policy is an `nn.Module` run as a pure function of its parameter dict (`core.functional`), like
every model of metagrad. Its output is a tensor, so it batches under `vmap`:
- `Discrete(n)` actions: `n` logits, a categorical distribution (`CategoricalMLPPolicy`);
- `Box(dim)` actions: `2 * dim` numbers, the mean and the log standard deviation of a diagonal
  Gaussian (`GaussianMLPPolicy` learns one log-std per action dimension, independent of the state,
  as in the MAML paper's code).
`log_prob`, `sample` and `entropy` read that tensor for the action space; `check_output` raises a clear
error when the output does not fit the space.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from metagrad.models import MLP


@dataclass(frozen=True)
class Discrete:
    """`n` actions, numbered 0..n-1 (gymnasium's `Discrete`)."""

    n: int

    def __post_init__(self) -> None:
        if int(self.n) != self.n or self.n < 1:
            raise ValueError(f"Discrete(n) needs a positive integer n, got {self.n!r}")


@dataclass(frozen=True)
class Box:
    """Continuous actions in R^dim (gymnasium's `Box` of shape (dim,)); an environment clips them if it must."""

    dim: int

    def __post_init__(self) -> None:
        if int(self.dim) != self.dim or self.dim < 1:
            raise ValueError(f"Box(dim) needs a positive integer dim, got {self.dim!r}")


Space = Discrete | Box


def from_gymnasium(space: Any) -> Space:
    """Our action space for a gymnasium space (Discrete, or a one-dimensional Box)."""
    name = type(space).__name__
    if name == "Discrete":
        return Discrete(int(space.n))
    if name == "Box" and len(space.shape) == 1:
        return Box(int(space.shape[0]))
    raise ValueError(f"action space {space} is not supported: a Discrete space or a one-dimensional Box is needed")


def output_size(space: Space) -> int:
    """How many numbers a policy must output per observation for `space`."""
    return space.n if isinstance(space, Discrete) else 2 * space.dim


def check_output(space: Space, out: Tensor, finite: bool = True) -> None:
    """A clear error when the policy's output `out [..., k]` does not fit the action space (or, with
    `finite`, is NaN or inf: not under vmap, where data cannot steer control flow)."""
    need = output_size(space)
    if out.dim() == 0 or out.shape[-1] != need:
        got = tuple(out.shape)
        if isinstance(space, Discrete):
            raise ValueError(f"the policy's output has shape {got} but the action space Discrete({space.n}) needs "
                             f"{need} logits in the last dimension (a categorical policy: CategoricalMLPPolicy)")
        raise ValueError(f"the policy's output has shape {got} but the action space Box({space.dim}) needs {need} "
                         f"numbers in the last dimension: {space.dim} means and {space.dim} log standard deviations "
                         "(a diagonal Gaussian policy: GaussianMLPPolicy)")
    if finite and not torch.isfinite(out).all():
        raise FloatingPointError("the policy's output is not finite (NaN or inf): lower the learning rates")


def _gaussian(space: Box, out: Tensor) -> tuple[Tensor, Tensor]:
    return out[..., :space.dim], out[..., space.dim:]


def log_prob(space: Space, out: Tensor, actions: Tensor) -> Tensor:
    """Log-probability (density for Box) of `actions` under the distribution `out`; shape `out.shape[:-1]`."""
    if isinstance(space, Discrete):
        return torch.log_softmax(out, -1).gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)
    mean, log_std = _gaussian(space, out)
    z = (actions - mean) * torch.exp(-log_std)
    return (-0.5 * z ** 2 - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)


def sample(space: Space, out: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Actions drawn from the distribution `out` (no gradient): integers for Discrete, `[..., dim]` for Box."""
    out = out.detach()
    if isinstance(space, Discrete):
        probs = torch.softmax(out, -1).reshape(-1, space.n)
        return torch.multinomial(probs, 1, generator=generator).view(out.shape[:-1])
    mean, log_std = _gaussian(space, out)
    noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
    return mean + torch.exp(log_std) * noise


def mode(space: Space, out: Tensor) -> Tensor:
    """The most likely action of the distribution `out`: the argmax logit (Discrete) or the mean (Box)."""
    out = out.detach()
    return out.argmax(-1) if isinstance(space, Discrete) else _gaussian(space, out)[0]


def entropy(space: Space, out: Tensor) -> Tensor:
    """Entropy of the distribution `out`; shape `out.shape[:-1]`."""
    if isinstance(space, Discrete):
        logp = torch.log_softmax(out, -1)
        return -(logp.exp() * logp).sum(-1)
    _, log_std = _gaussian(space, out)
    return (log_std + 0.5 * math.log(2 * math.pi * math.e)).sum(-1)


class CategoricalMLPPolicy(nn.Module):
    """Logits of a categorical policy from an MLP of the observation (ReLU hidden layers)."""

    def __init__(self, obs_dim: int, n_actions: int, hidden: tuple[int, ...] = (100, 100)) -> None:
        super().__init__()
        self.space = Discrete(n_actions)
        self.net = MLP((obs_dim, *hidden, n_actions))

    def forward(self, obs: Tensor) -> Tensor:
        return self.net(obs)


class GaussianMLPPolicy(nn.Module):
    """A diagonal Gaussian policy: the mean from an MLP of the observation (ReLU hidden layers, as in the
    MAML paper), a learned log standard deviation per action dimension; the output is `[mean, log_std]`."""

    def __init__(self, obs_dim: int, action_dim: int, hidden: tuple[int, ...] = (100, 100),
                 init_std: float = 1.0) -> None:
        super().__init__()
        if not init_std > 0:
            raise ValueError(f"init_std must be positive, got {init_std!r}")
        self.space = Box(action_dim)
        self.net = MLP((obs_dim, *hidden, action_dim))
        self.log_std = nn.Parameter(torch.full((action_dim,), math.log(init_std)))

    def forward(self, obs: Tensor) -> Tensor:
        mean = self.net(obs)
        return torch.cat([mean, self.log_std.expand_as(mean)], -1)


class SoftmaxPolicy(nn.Module):
    """A state-independent softmax policy over `n` actions: its parameter is the logits themselves
    (bandits; theta = 0 is the uniform policy)."""

    def __init__(self, n_actions: int, init: Tensor | None = None) -> None:
        super().__init__()
        self.space = Discrete(n_actions)
        self.logits = nn.Parameter(torch.zeros(n_actions) if init is None else init.detach().clone())

    def forward(self, obs: Tensor) -> Tensor:
        return self.logits.expand(*obs.shape[:-1], self.space.n)
