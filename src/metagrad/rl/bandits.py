"""Bayesian baselines for Bernoulli bandits: the finite-horizon Gittins index, Thompson sampling, UCB1, random,
and the exact Bayes-optimal value by dynamic programming over the posterior.

A task is the arms' success probabilities `[tasks, arms]`, drawn from the prior (independent U[0, 1] =
Beta(1, 1) per arm, or the dependent two-armed prior p, 1 - p with p ~ U[0, 1]); an episode is `horizon`
pulls. The posterior of an independent arm after s successes and f failures is Beta(1 + s, 1 + f), its
predictive success probability (s + 1) / (s + f + 2).

The finite-horizon Gittins index of an arm in state (s, f) with h pulls left is the constant reward lambda
of a known arm that makes one indifferent between retiring to it for all h pulls (h lambda) and pulling the
unknown arm first, then stopping optimally (a one-armed retirement problem solved by DP over the arm's
reachable posteriors). That continuation value is convex and piecewise linear in lambda with slope (the
expected retirement pulls) below h, so `g(lambda) = continuation - h lambda` is convex and decreasing, and
Newton's method from lambda = the posterior mean (where g >= 0) climbs monotonically to the root and lands
on it exactly after finitely many pieces. The Gittins index policy is Bayes-optimal for the discounted
infinite horizon; with a finite horizon and several arms it is a close heuristic, not exactly optimal:
`bayes_optimal_value` (exact DP over the joint posterior, small problems) measures the gap.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import numpy as np
import torch
from torch import Tensor

Scorer = Callable[[np.ndarray, np.ndarray, int, np.random.Generator], np.ndarray]


def _continuation(s: np.ndarray, f: np.ndarray, h: int, lam: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Value and d/dlambda of "pull the arm (s, f) once, then retire optimally" with h pulls left, per target."""
    value = np.zeros((s.shape[0], h + 1))
    slope = np.zeros_like(value)
    for m in range(h - 1, -1, -1):                   # m pulls made; i of them successes
        i = np.arange(m + 1)
        p = (s[:, None] + i + 1) / (s + f + m + 2)[:, None]
        cont = p * (1 + value[:, 1:m + 2]) + (1 - p) * value[:, :m + 1]
        dcont = p * slope[:, 1:m + 2] + (1 - p) * slope[:, :m + 1]
        if m == 0:
            return cont[:, 0], dcont[:, 0]
        retire = (h - m) * lam[:, None]
        stop = retire >= cont
        value, slope = np.where(stop, retire, cont), np.where(stop, float(h - m), dcont)
    raise AssertionError("unreachable")


def gittins_indices(horizon: int, tol: float = 1e-13) -> np.ndarray:
    """The finite-horizon Gittins index `[s, f, h]` of a Beta(1 + s, 1 + f) arm with h pulls left, for every
    s + f + h <= horizon, h >= 1 (NaN elsewhere); exact up to float64 rounding (see the module doc)."""
    if int(horizon) != horizon or horizon < 1:
        raise ValueError(f"horizon must be a positive integer, got {horizon!r}")
    H = int(horizon)
    table = np.full((H + 1, H + 1, H + 1), np.nan)
    for h in range(1, H + 1):
        s, f = np.array([(a, b) for a in range(H - h + 1) for b in range(H - h + 1 - a)]).T
        lam = (s + 1) / (s + f + 2)                  # pull once, then retire: exactly h lambda, so g >= 0 here
        for _ in range(200):
            cont, dcont = _continuation(s, f, h, lam)
            g = cont - h * lam
            if g.max() <= tol * h:
                break
            lam = lam + np.maximum(g, 0) / (h - dcont)
        else:
            raise RuntimeError(f"Gittins index: Newton did not converge for h={h} (max g {g.max():.3g})")
        table[s, f, h] = lam
    return table


# -- scorers: (successes [tasks, arms], failures [tasks, arms], pull t, rng) -> scores; the best arm is pulled --
def gittins_scorer(horizon: int) -> Scorer:
    """Pull the arm of largest finite-horizon Gittins index (independent Beta(1, 1) priors)."""
    table = gittins_indices(horizon)
    return lambda s, f, t, rng: table[s, f, horizon - t]


def thompson_scorer(s: np.ndarray, f: np.ndarray, t: int, rng: np.random.Generator) -> np.ndarray:
    """Thompson sampling: a draw from each arm's Beta(1 + s, 1 + f) posterior."""
    return rng.beta(1 + s, 1 + f)


def ucb1_scorer(s: np.ndarray, f: np.ndarray, t: int, rng: np.random.Generator) -> np.ndarray:
    """UCB1 (Auer et al. 2002): every arm once, then the mean plus sqrt(2 ln t / n)."""
    n = s + f
    with np.errstate(divide="ignore", invalid="ignore"):
        score = s / n + np.sqrt(2 * np.log(max(t, 1)) / n)
    return np.where(n == 0, np.inf, score)


def random_scorer(s: np.ndarray, f: np.ndarray, t: int, rng: np.random.Generator) -> np.ndarray:
    """Every arm equally likely."""
    return np.zeros(s.shape)


def dependent_posterior(s: np.ndarray, f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The dependent two-armed prior (p, 1 - p), p ~ U[0, 1]: a success of arm 0 or a failure of arm 1 is
    evidence for p; the posterior of p is Beta(1 + a, 1 + b), returned as (a, b) `[tasks]`."""
    return s[:, 0] + f[:, 1], f[:, 0] + s[:, 1]


def dependent_greedy_scorer(s: np.ndarray, f: np.ndarray, t: int, rng: np.random.Generator) -> np.ndarray:
    """The posterior mean of each arm under the dependent prior: (q, 1 - q), q = E[p | data]. Every pull
    reveals the same about p whichever arm it is, so this greedy policy is Bayes-optimal
    (`dependent_bayes_optimal` checks it by DP)."""
    a, b = dependent_posterior(s, f)
    q = (a + 1) / (a + b + 2)
    return np.stack([q, 1 - q], 1)


def dependent_thompson_scorer(s: np.ndarray, f: np.ndarray, t: int, rng: np.random.Generator) -> np.ndarray:
    """Thompson sampling under the dependent prior: one draw p ~ Beta(1 + a, 1 + b), arms scored (p, 1 - p)."""
    a, b = dependent_posterior(s, f)
    p = rng.beta(1 + a, 1 + b)
    return np.stack([p, 1 - p], 1)


def play(scorer: Scorer, probs: Tensor, horizon: int, seed: int = 0) -> Tensor:
    """Total reward of each task's episode of `horizon` pulls with the index policy `scorer` (ties broken
    uniformly at random): `[tasks]`."""
    rng = np.random.default_rng(seed)
    p = probs.double().cpu().numpy()
    T, N = p.shape
    s, f = np.zeros((T, N), dtype=np.int64), np.zeros((T, N), dtype=np.int64)
    rows = np.arange(T)
    for t in range(horizon):
        score = scorer(s, f, t, rng)
        best = score >= score.max(1, keepdims=True)
        arm = np.argmax(best * rng.random((T, N)), 1)
        win = rng.random(T) < p[rows, arm]
        s[rows, arm] += win
        f[rows, arm] += ~win
    return torch.from_numpy(s.sum(1).astype(np.float64))


# -- exact values under the prior (dynamic programming over posteriors) ------------------------------------
def bayes_optimal_value(arms: int, horizon: int) -> float:
    """The expected total reward of the Bayes-optimal policy, independent Beta(1, 1) arms: exact DP over the
    joint posterior (a multiset of the arms' (s, f), so unpulled arms collapse into one state)."""
    return _joint_value(arms, horizon, None)


def index_policy_value(arms: int, horizon: int, table: np.ndarray) -> float:
    """The exact expected total reward, under the prior, of the policy pulling the largest `table[s, f, h]`
    (ties shared equally), by the same enumeration as `bayes_optimal_value`."""
    return _joint_value(arms, horizon, table)


def _joint_value(arms: int, horizon: int, table: np.ndarray | None) -> float:
    @cache
    def value(state: tuple[tuple[int, int], ...]) -> float:
        h = horizon - sum(s + f for s, f in state)
        if h == 0:
            return 0.0
        options = sorted(set(state) | ({(0, 0)} if len(state) < arms else set()))
        outcomes = []
        for s, f in options:
            rest = list(state)
            if (s, f) != (0, 0):
                rest.remove((s, f))
            q = (s + 1) / (s + f + 2)
            win = value(tuple(sorted([*rest, (s + 1, f)])))
            lose = value(tuple(sorted([*rest, (s, f + 1)])))
            outcomes.append(q * (1 + win) + (1 - q) * lose)
        if table is None:
            return max(outcomes)
        idx = [table[s, f, h] for s, f in options]
        top = [v for v, i in zip(outcomes, idx) if i >= max(idx)]
        return sum(top) / len(top)

    return value(())


def dependent_bayes_optimal(horizon: int) -> tuple[float, bool]:
    """The dependent two-armed bandit (p, 1 - p), p ~ U[0, 1]: the Bayes-optimal expected total reward by DP
    over the posterior Beta(1 + a, 1 + b) of p, and whether the greedy policy (the arm of larger posterior
    mean) attains it at every reachable state."""
    @cache
    def value(a: int, b: int) -> tuple[float, bool]:
        h = horizon - a - b
        if h == 0:
            return 0.0, True
        q = (a + 1) / (a + b + 2)
        (va, ga), (vb, gb) = value(a + 1, b), value(a, b + 1)
        arm0, arm1 = q * (1 + va) + (1 - q) * vb, (1 - q) * (1 + vb) + q * va
        greedy = arm0 if q > 0.5 else arm1 if q < 0.5 else (arm0 + arm1) / 2
        best = max(arm0, arm1)
        return best, ga and gb and abs(greedy - best) <= 1e-12 * horizon

    return value(0, 0)
