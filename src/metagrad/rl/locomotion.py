"""The MAML paper's locomotion task families on gymnasium's HalfCheetah-v5 (MuJoCo; `pip install 'metagrad[rl]'`).

Finn et al. 2017, section 5.3, with the rewards of the MAML code and ProMP's (Rothfuss et al. 2019) envs:
- forward/backward (`cheetah_dir`): a task is a direction d in {-1, +1}, drawn with probability 1/2 each;
  reward = d * forward velocity - 0.05 * |a|^2;
- goal velocity (`cheetah_vel`): a task is a goal velocity v_goal ~ U[0, 2];
  reward = -|forward velocity - v_goal| - 0.05 * |a|^2.
The forward velocity is HalfCheetah-v5's own (x displacement of the torso per control step of dt = 0.05 s),
the control cost 0.5 * 0.1 * |a|^2 as in both codes (gymnasium's default weight is 0.1, so it is set to
0.05). Observations are HalfCheetah-v5's 17 numbers (joint positions without x, velocities); an episode is
`horizon` steps (200 in the paper). Everything else (model, frame skip, reset noise) is HalfCheetah-v5's.

The task enters the environment as an attribute (`task`), set on every reused sub-environment before each
batch's reset (`GymEnv(task_attr="task")`): building a MuJoCo environment costs ~10 ms and 800 of them
(40 tasks x 20 trajectories) are stepped per rollout.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from metagrad.rl.envs import GymEnv, _gymnasium

CTRL_COST = 0.05  # 0.5 * 0.1 * |a|^2: the MAML code's and ProMP's cheetah control cost
IDS = {"dir": "metagrad/HalfCheetahDir-v5", "vel": "metagrad/HalfCheetahVel-v5"}


@contextmanager
def _no_settotalmass_warning() -> Iterator[None]:
    """MuJoCo 4 warns, once per environment built, that HalfCheetah's XML uses the deprecated `settotalmass`;
    with hundreds of sub-environments that buries the output. Only that message is dropped: any other MuJoCo
    warning is re-raised as a Python warning."""
    import warnings

    import mujoco

    def handler(message: str) -> None:
        if "settotalmass" not in message:
            warnings.warn(f"MuJoCo: {message}", RuntimeWarning, stacklevel=2)

    old = mujoco.get_mju_user_warning()
    mujoco.set_mju_user_warning(handler)
    try:
        yield
    finally:
        mujoco.set_mju_user_warning(old)


def _cheetah_class(kind: str) -> type:
    _gymnasium()
    from gymnasium.envs.mujoco.half_cheetah_v5 import HalfCheetahEnv

    class HalfCheetahTask(HalfCheetahEnv):
        """HalfCheetah-v5 whose reward is a task's: forward/backward (`dir`) or goal velocity (`vel`)."""

        def __init__(self, task: float = 1.0, ctrl_cost_weight: float = CTRL_COST,
                     **kwargs: Any) -> None:
            with _no_settotalmass_warning():
                super().__init__(ctrl_cost_weight=ctrl_cost_weight, **kwargs)
            self.task = float(task)

        def _get_rew(self, x_velocity: float, action: Any) -> tuple[float, dict[str, float]]:
            ctrl_cost = self.control_cost(action)
            run = self.task * x_velocity if kind == "dir" else -abs(x_velocity - self.task)
            return run - ctrl_cost, {"reward_forward": run, "reward_ctrl": -ctrl_cost}

    HalfCheetahTask.__name__ = HalfCheetahTask.__qualname__ = f"HalfCheetah{kind.capitalize()}Env"
    return HalfCheetahTask


def register_cheetah() -> None:
    """Register `metagrad/HalfCheetahDir-v5` and `metagrad/HalfCheetahVel-v5` with gymnasium (idempotent)."""
    gym = _gymnasium()
    for kind, env_id in IDS.items():
        if env_id not in gym.registry:
            gym.register(env_id, entry_point=_cheetah_class(kind), max_episode_steps=1000)


def sample_directions(n: int, generator: torch.Generator | None = None) -> Tensor:
    """Directions `[n, 1]`, -1 or +1 with probability 1/2 each."""
    return (torch.randint(0, 2, (n, 1), generator=generator) * 2 - 1).double()


def sample_velocities(n: int, generator: torch.Generator | None = None, high: float = 2.0) -> Tensor:
    """Goal velocities `[n, 1]`, uniform in [0, high]."""
    return torch.rand(n, 1, generator=generator, dtype=torch.float64) * high


def cheetah(kind: str, horizon: int = 200, **make_kwargs: Any) -> GymEnv:
    """The task family `kind` ('dir': forward/backward, 'vel': goal velocity) on HalfCheetah-v5, episodes of
    `horizon` steps, as a `GymEnv` (reused sub-environments, the task set before each reset)."""
    if kind not in IDS:
        raise ValueError(f"cheetah task family must be 'dir' or 'vel', got {kind!r}")
    register_cheetah()
    sampler = sample_directions if kind == "dir" else sample_velocities
    return GymEnv(IDS[kind], horizon, sample_tasks=sampler, task_attr="task", max_episode_steps=int(horizon),
                  **make_kwargs)


def cheetah_dir(horizon: int = 200, **make_kwargs: Any) -> GymEnv:
    """Forward/backward running on HalfCheetah-v5 (see the module doc)."""
    return cheetah("dir", horizon, **make_kwargs)


def cheetah_vel(horizon: int = 200, **make_kwargs: Any) -> GymEnv:
    """Running at a goal velocity in U[0, 2] on HalfCheetah-v5 (see the module doc)."""
    return cheetah("vel", horizon, **make_kwargs)
