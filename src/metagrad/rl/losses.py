"""Policy-gradient task losses on trajectories, and DiCE's magic box.

`PolicyGradientLoss(space)` is a task loss `task_loss(f, params, data)` for one task's trajectories
`data` (`obs`, `actions`, `rewards`, `mask`, `advantages`, each `[episodes, horizon, ...]`):

    loss = -1/(episodes * horizon) * sum_{e,t} mask * ( log pi(a|s) A  -  stop(log pi(a|s) A)  +  r )

Its value is minus the mean reward per step of the sampled episodes (so that a DiCE weight on it
weights the true return), its gradient is the REINFORCE estimate `-mean(A grad log pi)`, and its
Hessian is the plain `-mean(A hess log pi)`: the derivative of the sampled update as a function of the
parameters, which the exact meta-gradient of `metagrad.rl.maml_rl` needs. With `lvc=True` the log-
probability is replaced by ProMP's likelihood ratio `pi / stop(pi)` (Rothfuss et al. 2019, the LVC
objective): same value and gradient, Hessian of the expected objective; `pi / pi_sampling` where the data
holds the sampling policy's log-probabilities `sampling_log_prob` (the PPO outer step's later epochs).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from metagrad.rl.policies import Space, check_output, log_prob


def magic_box(x: Tensor) -> Tensor:
    """DiCE's magic box (Foerster et al. 2018): `exp(x - stop(x))`, value 1, gradient `grad x` at every order."""
    return torch.exp(x - x.detach())


class PolicyGradientLoss:
    """The policy-gradient surrogate of one task's trajectories (see the module doc); `space` is the action space."""

    def __init__(self, space: Space, lvc: bool = False) -> None:
        self.space, self.lvc = space, bool(lvc)

    def log_probs(self, f: Any, params: dict[str, Tensor], data: dict[str, Tensor]) -> Tensor:
        """`log pi(a_t | s_t)` of every step, `[episodes, horizon]` (0 after the end)."""
        out = f(params, data["obs"])
        check_output(self.space, out, finite=False)
        return log_prob(self.space, out, data["actions"]) * data["mask"]

    def log_prob_sum(self, f: Any, params: dict[str, Tensor], data: dict[str, Tensor]) -> Tensor:
        """`log` of the probability of all the task's sampled actions: the DiCE weight's argument."""
        return self.log_probs(f, params, data).sum()

    def __call__(self, f: Any, params: dict[str, Tensor], data: dict[str, Tensor]) -> Tensor:
        return self.with_metrics(f, params, data)[0]

    def with_metrics(self, f: Any, params: dict[str, Tensor],
                     data: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        logp = self.log_probs(f, params, data)
        mask, adv, rew = data["mask"], data["advantages"], data["rewards"]
        # LVC (ProMP): the likelihood ratio pi / stop(pi) in place of log pi: the same gradient, and a Hessian
        # with the extra A grad log pi grad log pi^T of the expected objective's (low variance, see maml_rl).
        # With the sampling policy's log-probabilities in the data (PPO's later epochs, away from the policy
        # that sampled), the ratio is pi / pi_sampling: ProMP's importance-weighted J^LR.
        behaviour = data["sampling_log_prob"] if "sampling_log_prob" in data else logp.detach()
        surrogate = (torch.exp(logp - behaviour) if self.lvc else logp) * adv.detach()
        per_step = (surrogate - surrogate.detach() + rew) * mask
        loss = -per_step.sum() / mask.numel()
        episode_return = (rew * mask).sum(-1).mean()
        return loss, {"return": episode_return.detach()}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PolicyGradientLoss) and other.space == self.space and other.lvc == self.lvc

    def __hash__(self) -> int:
        return hash((self.space, self.lvc))
