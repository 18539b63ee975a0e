"""Environments as task families, batched over tasks and episodes.

An environment family samples task settings (`sample_tasks(n, generator) -> [tasks, ...]`: a goal, the
arms' reward probabilities) and runs a batch of them: `batch(settings, episodes, generator)` returns a
running batch whose `reset() -> obs [tasks, episodes, obs_dim]` and `step(actions [tasks, episodes,
...]) -> (obs, reward [tasks, episodes], terminated [tasks, episodes])` work on torch tensors. `rollout`
(metagrad.rl.rollout) drives any of them the same way.

- `Nav2D` and `Bandit` are written as batched torch tensors: exact, fast, no gymnasium needed.
- `GymEnv` runs any registered gymnasium environment id through `gymnasium.vector.SyncVectorEnv`, one
  sub-environment per (task, episode); gymnasium is imported only when one is built (`pip install
  metagrad[rl]`). A task's setting is either keyword arguments of `gymnasium.make` (a fresh vector env per
  batch) or an attribute of the environment set before every reset (`task_attr`: the sub-environments
  are built once and reused, which matters for MuJoCo, where building one costs ~10 ms). `register_gymnasium()`
  registers `metagrad/Nav2D-v0`, the same navigation task as a gymnasium environment; the MuJoCo
  cheetah families are in `metagrad.rl.locomotion`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from metagrad.rl.policies import Box, Discrete, Space, from_gymnasium


class Nav2D:
    """The MAML paper's 2D navigation (Finn et al. 2017, section 5.3; as in its code, rllab's point env).

    A point starts at the origin; a task is a goal drawn uniformly from [-goal_range, goal_range]^2; the
    action is a velocity, clipped to [-max_action, max_action] per coordinate; the reward after a step
    is minus the distance to the goal (the MAML code's `-sqrt(dx^2 + dy^2)`; the paper's text says
    squared distance); an episode ends at the horizon or when the point is within `success_radius`
    of the goal in both coordinates (the MAML code). The observation is the position: the goal is not
    observed, a policy must find it from the rewards.
    """

    obs_dim = 2
    action_space: Space = Box(2)

    def __init__(self, horizon: int = 100, goal_range: float = 0.5, max_action: float = 0.1,
                 success_radius: float = 0.01, dtype: torch.dtype = torch.float32) -> None:
        if int(horizon) != horizon or horizon < 1:
            raise ValueError(f"horizon must be a positive integer, got {horizon!r}")
        self.horizon, self.goal_range, self.max_action = int(horizon), float(goal_range), float(max_action)
        self.success_radius, self.dtype = float(success_radius), dtype

    def sample_tasks(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Goals `[n, 2]`, uniform in [-goal_range, goal_range]^2."""
        return (torch.rand(n, 2, generator=generator, dtype=torch.float64) * 2 - 1).to(self.dtype) * self.goal_range

    sample = sample_tasks  # the name train.meta_train draws meta-batches by

    def batch(self, settings: Tensor, episodes: int, generator: torch.Generator | None = None) -> _Nav2DBatch:
        """`episodes` episodes of every task whose goal is a row of `settings [tasks, 2]`."""
        if settings.dim() != 2 or settings.shape[1] != 2:
            raise ValueError(f"Nav2D task settings are goals of shape [tasks, 2], got {tuple(settings.shape)}")
        return _Nav2DBatch(self, settings.to(self.dtype), episodes)

    def oracle_action(self, goal: Tensor, obs: Tensor) -> Tensor:
        """The best action knowing the goal: the allowed velocity closest to the goal. It minimises every
        step's distance at once, so it is the optimal policy (the upper bound the table compares to)."""
        return (goal.unsqueeze(-2) - obs).clamp(-self.max_action, self.max_action)


class _Nav2DBatch:
    def __init__(self, env: Nav2D, goals: Tensor, episodes: int) -> None:
        self.env, self.goals, self.episodes = env, goals, int(episodes)

    def reset(self) -> Tensor:
        self.pos = torch.zeros(self.goals.shape[0], self.episodes, 2, dtype=self.env.dtype)
        return self.pos.clone()

    def step(self, actions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        a = actions.to(self.env.dtype).clamp(-self.env.max_action, self.env.max_action)
        self.pos = self.pos + a
        d = self.pos - self.goals.unsqueeze(1)
        reward = -torch.sqrt((d ** 2).sum(-1))
        done = (d.abs() < self.env.success_radius).all(-1)
        return self.pos.clone(), reward, done

    def close(self) -> None:
        pass


class Bandit:
    """A multi-armed bandit: a task is the arms' success probabilities `[tasks, arms]`; an episode is
    `horizon` pulls; a pull of arm a pays 1 with probability p_a (or p_a itself with `expected=True`, the
    exact-expectation variant the tests use). The observation is a constant 1 (no memory in the policy).

    `reward` says when the pulls pay: "immediate" (each pull its own reward), "delayed" (nothing until the
    last pull, which pays the episode's total), "sparse" (the last pull pays 1 if every pull paid, else 0)."""

    obs_dim = 1

    def __init__(self, arms: int = 2, horizon: int = 1, expected: bool = False,
                 sampler: Callable[[int, torch.Generator | None], Tensor] | None = None,
                 dtype: torch.dtype = torch.float32, reward: str = "immediate") -> None:
        if reward not in ("immediate", "delayed", "sparse"):
            raise ValueError(f"reward must be 'immediate', 'delayed' or 'sparse', got {reward!r}")
        if int(arms) != arms or arms < 2:
            raise ValueError(f"a bandit needs at least 2 arms, got {arms!r}")
        if int(horizon) != horizon or horizon < 1:
            raise ValueError(f"horizon must be a positive integer, got {horizon!r}")
        self.arms, self.horizon, self.expected, self.dtype = int(arms), int(horizon), bool(expected), dtype
        self.action_space: Space = Discrete(self.arms)
        self.sampler, self.reward = sampler, reward

    def sample_tasks(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Arm probabilities `[n, arms]` (uniform in [0, 1] unless a `sampler` was given)."""
        if self.sampler is not None:
            return self.sampler(n, generator).to(self.dtype)
        return torch.rand(n, self.arms, generator=generator, dtype=torch.float64).to(self.dtype)

    sample = sample_tasks  # the name train.meta_train draws meta-batches by

    def batch(self, settings: Tensor, episodes: int, generator: torch.Generator | None = None) -> _BanditBatch:
        if settings.dim() != 2 or settings.shape[1] != self.arms:
            raise ValueError(f"Bandit task settings are arm probabilities of shape [tasks, {self.arms}], "
                             f"got {tuple(settings.shape)}")
        return _BanditBatch(self, settings.to(self.dtype), episodes, generator)


class _BanditBatch:
    def __init__(self, env: Bandit, probs: Tensor, episodes: int, generator: torch.Generator | None) -> None:
        self.env, self.probs, self.episodes, self.generator = env, probs, int(episodes), generator

    def obs(self) -> Tensor:
        return torch.ones(self.probs.shape[0], self.episodes, 1, dtype=self.env.dtype)

    def reset(self) -> Tensor:
        self.t, self.total = 0, torch.zeros(self.probs.shape[0], self.episodes, dtype=self.env.dtype)
        return self.obs()

    def step(self, actions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        p = self.probs.gather(1, actions.long())
        reward = p if self.env.expected else (torch.rand(p.shape, generator=self.generator, dtype=torch.float64)
                                              < p.double()).to(self.env.dtype)
        self.t, self.total = self.t + 1, self.total + reward
        if self.env.reward != "immediate":
            last = self.t == self.env.horizon
            paid = self.total if self.env.reward == "delayed" else (self.total == self.t).to(reward.dtype)
            reward = paid if last else torch.zeros_like(reward)
        done = torch.zeros(p.shape, dtype=torch.bool)
        return self.obs(), reward, done

    def close(self) -> None:
        pass


# -- gymnasium ---------------------------------------------------------------------------------------------
def _gymnasium() -> Any:
    try:
        import gymnasium
    except ImportError:
        raise ImportError("gymnasium environments need the optional dependency gymnasium: "
                          "pip install 'metagrad[rl]'") from None
    return gymnasium


class GymEnv:
    """Any registered gymnasium environment id as a task family, run through `gymnasium.vector.SyncVectorEnv`.

    A task's setting (a row of `settings`) reaches the environment in one of two ways:
    - `task_kwargs(setting) -> dict`: keyword arguments of `gymnasium.make` (e.g. the goal); every batch
      builds its sub-environments afresh;
    - `task_attr`: the name of an attribute of the environment that holds the setting (a float, or a list
      of floats). The sub-environments are built once per batch size and reused; before every batch's
      reset each one gets its task's setting, so nothing of one task's episodes reaches the next batch's
      (the reset re-seeds and re-initialises every sub-environment; tests/test_rl_cheetah.py checks it).
    `sample_tasks(n, generator)` draws settings (default: no settings, every task the same environment).
    Unknown ids are a clear error at construction.
    """

    def __init__(self, env_id: str, horizon: int,
                 task_kwargs: Callable[[Tensor], dict[str, Any]] | None = None,
                 sample_tasks: Callable[[int, torch.Generator | None], Tensor] | None = None,
                 task_attr: str | None = None, dtype: torch.dtype = torch.float32, **make_kwargs: Any) -> None:
        gym = _gymnasium()
        if env_id == "metagrad/Nav2D-v0":
            register_gymnasium()
        if env_id.startswith("metagrad/HalfCheetah"):
            from metagrad.rl.locomotion import register_cheetah
            register_cheetah()
        try:
            gym.spec(env_id)
        except gym.error.Error as e:
            raise ValueError(f"unknown gymnasium environment id {env_id!r} ({type(e).__name__}: {e}); "
                             "see gymnasium.pprint_registry() for the registered ids") from None
        if task_kwargs is not None and task_attr is not None:
            raise ValueError("give a task's setting as task_kwargs (make arguments) or task_attr (an attribute), "
                             "not both")
        self.env_id, self.horizon, self.dtype = env_id, int(horizon), dtype
        self.task_kwargs, self._sample, self.make_kwargs = task_kwargs, sample_tasks, make_kwargs
        self.task_attr = task_attr
        self._pools: dict[int, Any] = {}  # sub-environment count -> vector env (task_attr only)
        probe = gym.make(env_id, **make_kwargs)
        try:
            shape = probe.observation_space.shape
            if shape is None or len(shape) != 1:
                raise ValueError(f"{env_id}: observations of shape {shape} are not supported (a flat vector is needed)")
            self.obs_dim = int(shape[0])
            self.action_space = from_gymnasium(probe.action_space)
            if task_attr is not None and not hasattr(probe.unwrapped, task_attr):
                raise ValueError(f"{env_id} has no attribute {task_attr!r} to hold a task's setting")
        finally:
            probe.close()

    def sample_tasks(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Task settings `[n, ...]` (`[n, 0]` without a sampler: every task the same environment)."""
        if self._sample is None:
            return torch.zeros(n, 0, dtype=self.dtype)
        return self._sample(n, generator).to(self.dtype)

    sample = sample_tasks  # the name train.meta_train draws meta-batches by

    def batch(self, settings: Tensor, episodes: int, generator: torch.Generator | None = None) -> _GymBatch:
        """`episodes` episodes of every task of `settings [tasks, ...]`, one sub-environment each."""
        gym = _gymnasium()
        seed = int(torch.randint(0, 2 ** 31 - 1, (), generator=generator))
        n = settings.shape[0] * int(episodes)
        if self.task_attr is None:
            fns = []
            for setting in settings:
                kwargs = {**self.make_kwargs, **(self.task_kwargs(setting) if self.task_kwargs else {})}
                fns += [(lambda kw=kwargs: gym.make(self.env_id, **kw))] * int(episodes)
            return _GymBatch(gym.vector.SyncVectorEnv(fns), settings.shape[0], int(episodes), seed, self.dtype,
                             owned=True)
        if n not in self._pools:
            self._pools[n] = gym.vector.SyncVectorEnv([lambda: gym.make(self.env_id, **self.make_kwargs)] * n)
        vec = self._pools[n]
        values = settings.double().reshape(settings.shape[0], -1).tolist()
        values = [v[0] if len(v) == 1 else v for v in values]
        vec.set_attr(self.task_attr, [v for v in values for _ in range(int(episodes))])
        return _GymBatch(vec, settings.shape[0], int(episodes), seed, self.dtype, owned=False)

    def close(self) -> None:
        """Close the reused sub-environments."""
        for vec in self._pools.values():
            vec.close()
        self._pools.clear()


class _GymBatch:
    def __init__(self, vec: Any, tasks: int, episodes: int, seed: int, dtype: torch.dtype, owned: bool) -> None:
        self.vec, self.tasks, self.episodes, self.seed = vec, tasks, episodes, seed
        self.dtype, self.owned = dtype, owned

    def _t(self, x: Any) -> Tensor:
        t = torch.as_tensor(x)
        return t.to(self.dtype if t.is_floating_point() else t.dtype).reshape(self.tasks, self.episodes, *t.shape[1:])

    def reset(self) -> Tensor:
        obs, _ = self.vec.reset(seed=self.seed)
        return self._t(obs)

    def step(self, actions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        a = actions.reshape(self.tasks * self.episodes, *actions.shape[2:]).cpu().numpy()
        obs, reward, terminated, truncated, _ = self.vec.step(a)
        return self._t(obs), self._t(reward).to(self.dtype), self._t(terminated | truncated)

    def close(self) -> None:
        if self.owned:  # a reused pool stays open for the next batch
            self.vec.close()


def _nav2d_gymnasium_class() -> type:
    gym = _gymnasium()
    import numpy as np

    class Nav2DEnv(gym.Env):
        """`Nav2D` as a gymnasium environment (float64, one goal per instance): `metagrad/Nav2D-v0`."""

        metadata: dict = {"render_modes": []}

        def __init__(self, goal: Any = (0.0, 0.0), max_action: float = 0.1, success_radius: float = 0.01) -> None:
            self.goal = np.asarray(goal, dtype=np.float64)
            self.max_action, self.success_radius = float(max_action), float(success_radius)
            self.observation_space = gym.spaces.Box(-np.inf, np.inf, (2,), np.float64)
            self.action_space = gym.spaces.Box(-max_action, max_action, (2,), np.float64)

        def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple:
            super().reset(seed=seed)
            self.pos = np.zeros(2)
            return self.pos.copy(), {}

        def step(self, action: Any) -> tuple:
            self.pos = self.pos + np.clip(np.asarray(action, dtype=np.float64), -self.max_action, self.max_action)
            d = self.pos - self.goal
            reward = -float(np.sqrt((d ** 2).sum()))
            return self.pos.copy(), reward, bool((np.abs(d) < self.success_radius).all()), False, {}

    return Nav2DEnv


def register_gymnasium() -> None:
    """Register `metagrad/Nav2D-v0` with gymnasium (idempotent); the horizon is gymnasium's `max_episode_steps`."""
    gym = _gymnasium()
    if "metagrad/Nav2D-v0" not in gym.registry:
        gym.register("metagrad/Nav2D-v0", entry_point=_nav2d_gymnasium_class(), max_episode_steps=100)
