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

import math
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


class Trading:
    """Trading on daily price series, each asset a task: a long / flat / short policy (3 actions: 0 short,
    1 flat, 2 long) on features of the recent returns, with transaction costs.

    `prices` is a list of `[days + 1]` series (one per asset). A task setting is a row `(asset, t0)` of a
    long tensor `[tasks, 2]`: an episode trades the asset from day t0 for `horizon` days, starting flat. On
    day t the policy observes `features(prices)[t]` (only prices up to day t; see `trading_features`) and
    its current position, picks the position held from t to t + 1, and earns the reward

        position_t * (p_{t+1} / p_t - 1)  -  cost * |position_t - position_{t-1}|,

    the strategy's simple return that day. `sample_tasks` draws training settings: an asset of
    `train_assets`, a t0 whose support window (t0 .. t0 + horizon) and query window (the `horizon` days
    after it, `query_settings`) end before the asset's `train_end` day: walk-forward, the meta-objective
    of MAMLRL is the return on the dates after the window it adapted on.
    """

    n_features = 8
    obs_dim = n_features + 1
    action_space: Space = Discrete(3)
    lookback = 60

    def __init__(self, prices: list[Tensor], horizon: int = 60, cost: float = 5e-4,
                 train_assets: list[int] | None = None, train_end: list[int] | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        if int(horizon) != horizon or horizon < 2:
            raise ValueError(f"horizon must be an integer >= 2, got {horizon!r}")
        if not prices:
            raise ValueError("Trading needs at least one price series")
        for i, p in enumerate(prices):
            if p.dim() != 1 or not (torch.isfinite(p).all() and (p > 0).all()):
                raise ValueError(f"prices[{i}] must be a 1-D series of finite positive prices")
        self.horizon, self.cost, self.dtype = int(horizon), float(cost), dtype
        self.days = torch.tensor([p.shape[0] - 1 for p in prices])
        width = int(self.days.max()) + 1
        pad = [torch.cat([p.double(), p.new_full((width - p.shape[0],), float(p[-1])).double()]) for p in prices]
        bank = torch.stack(pad)                                          # [assets, days + 1]
        self.features = trading_features(bank).to(dtype)                 # [assets, days + 1, n_features]
        gain = bank[:, 1:] / bank[:, :-1] - 1                            # gain[t] = p_{t+1} / p_t - 1
        self.gains = torch.cat([gain, torch.zeros(len(prices), 1, dtype=torch.float64)], 1).to(dtype)
        self.train_assets = list(range(len(prices))) if train_assets is None else [int(a) for a in train_assets]
        self.train_end = [int(d) for d in self.days] if train_end is None else [int(d) for d in train_end]
        for a in self.train_assets:
            if self.train_end[a] - 2 * self.horizon < self.lookback:
                raise ValueError(f"asset {a}: train_end {self.train_end[a]} leaves no room for a support and a query "
                                 f"window of {self.horizon} days after the {self.lookback}-day lookback")

    def sample_tasks(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Training settings `[n, 2]` (asset, t0): an asset of `train_assets`, t0 uniform over the days whose
        support and query windows end by the asset's `train_end`."""
        pick = torch.randint(0, len(self.train_assets), (n,), generator=generator)
        assets = torch.tensor(self.train_assets)[pick]
        hi = torch.tensor(self.train_end)[assets] - 2 * self.horizon - self.lookback + 1
        t0 = self.lookback + (torch.rand(n, generator=generator, dtype=torch.float64) * hi).long()
        return torch.stack([assets, t0], 1)

    def query_settings(self, settings: Tensor) -> Tensor:
        """The walk-forward query of each task: the same asset, the `horizon` days after its support window."""
        return settings + torch.tensor([0, self.horizon])

    def batch(self, settings: Tensor, episodes: int, generator: torch.Generator | None = None) -> _TradingBatch:
        """`episodes` episodes of every task `(asset, t0)` of `settings [tasks, 2]` (any number of days: an
        episode may run until the asset's last day)."""
        if settings.dim() != 2 or settings.shape[1] != 2 or settings.is_floating_point():
            raise ValueError(f"Trading task settings are integer rows (asset, t0) of shape [tasks, 2], got "
                             f"{tuple(settings.shape)} {settings.dtype}")
        a, t0 = settings[:, 0], settings[:, 1]
        if (a < 0).any() or (a >= len(self.days)).any():
            raise ValueError(f"asset index out of range [0, {len(self.days)})")
        if (t0 < self.lookback).any() or (t0 >= self.days[a]).any():
            raise ValueError(f"every window must start on or after day {self.lookback} (the features' lookback) and "
                             f"before the asset's last day")
        return _TradingBatch(self, a, t0, int(episodes))


def trading_features(prices: Tensor) -> Tensor:
    """Features of day t from prices up to day t only: `[..., days + 1, 8]` (NaN-free from day 60 on).

    With r_t = log(p_t / p_{t-1}) and v_t the 20-day std of r: r_{t-k} / v_t for k = 0..4; the 20-day
    momentum (x_t - x_{t-20}) / (v_t sqrt(20)); the distance to the 20-day mean of log prices
    (x_t - mean x_{t-19..t}) / (v_t sqrt(20)); log(v_t / v60_t) (volatility against its 60-day level);
    each clipped to [-5, 5]. Days before the lookback are 0.
    """
    x = torch.log(prices.double())
    r = torch.cat([torch.zeros_like(x[..., :1]), x[..., 1:] - x[..., :-1]], -1)   # r[t] = x_t - x_{t-1}

    def trailing(v: Tensor, n: int) -> Tensor:  # windows ending at t: [..., days + 1, n], left-padded
        padded = torch.cat([v[..., :1].expand(*v.shape[:-1], n - 1), v], -1)
        return padded.unfold(-1, n, 1)

    vol = trailing(r, 20).std(-1).clamp(min=1e-6)
    vol60 = trailing(r, 60).std(-1).clamp(min=1e-6)
    lags = [torch.cat([torch.zeros_like(r[..., :k]), r[..., :r.shape[-1] - k]], -1) / vol for k in range(5)]
    x20 = torch.cat([x[..., :1].expand(*x.shape[:-1], 20), x[..., :-20]], -1)
    mom = (x - x20) / (vol * math.sqrt(20))
    dev = (x - trailing(x, 20).mean(-1)) / (vol * math.sqrt(20))
    feats = torch.stack([*lags, mom, dev, torch.log(vol / vol60)], -1).clamp(-5, 5)
    feats[..., :Trading.lookback, :] = 0
    return feats


class _TradingBatch:
    def __init__(self, env: Trading, assets: Tensor, t0: Tensor, episodes: int) -> None:
        self.env, self.assets, self.t0, self.episodes = env, assets, t0, episodes

    def _obs(self) -> Tensor:
        f = self.env.features[self.assets, self.t0 + self.k]                       # [tasks, n_features]
        f = f.unsqueeze(1).expand(-1, self.episodes, -1)
        return torch.cat([f, self.position.unsqueeze(-1)], -1)                       # [tasks, episodes, obs_dim]

    def reset(self) -> Tensor:
        self.k = 0
        self.position = torch.zeros(self.assets.shape[0], self.episodes, dtype=self.env.dtype)
        return self._obs()

    def step(self, actions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if (self.t0 + self.k >= self.env.days[self.assets]).any():
            raise ValueError("Trading: an episode ran past its asset's last day (shorten the horizon)")
        new = actions.to(self.env.dtype) - 1                                          # 0, 1, 2 -> -1, 0, +1
        gain = self.env.gains[self.assets, self.t0 + self.k].unsqueeze(1)            # [tasks, 1]
        reward = new * gain - self.env.cost * (new - self.position).abs()
        self.position, self.k = new, self.k + 1
        return self._obs(), reward, torch.zeros(reward.shape, dtype=torch.bool)

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
