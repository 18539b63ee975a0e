"""N-armed Bernoulli bandits (Duan et al. 2016; Mishra et al. 2018, table 3): MAML with policy-gradient inner
steps against the finite-horizon Gittins index, Thompson sampling, UCB1 and random, and the dependent
two-armed bandit (p, 1 - p) against its exact Bayes-optimal policy.

Tasks: every arm's success probability uniform in [0, 1], independently (the dependent bandit: p ~ U[0, 1],
the arms p and 1 - p); an episode is K pulls; the table gives the mean reward per episode with its 95% CI
over `eval_tasks` held-out tasks (the same tasks for every method), beside Mishra et al.'s numbers.

MAML's protocol (a policy without memory cannot change its arm distribution inside an episode, so it adapts
BETWEEN episodes): a softmax policy over the arms (logits theta, the same at every pull); on a task, one
episode of K pulls with theta (the support episode), one policy-gradient step at `inner_lr` on it (each
pull's reward is its own advantage, gamma = 0, standardised over the episode), then one episode of K pulls
with the adapted policy (the query episode). Meta-training: `MAMLRL` (order 2, exact DiCE estimator), Adam,
from random logits. Reported: the support episode, the query episode (MAML's objective, after one step),
and their mean (reward per episode over the 2K pulls MAML used). The query episode has the support
episode's K pulls of information about the task that a single-episode policy (Gittins, Thompson) does not:
beating Gittins there is not a like-for-like win; the two-episode mean is the fair reward per K pulls.

Baselines (metagrad.rl.bandits): the Gittins index is computed exactly (calibration against a known arm,
solved by DP and Newton's method on its piecewise-linear value); for K = 10 the Bayes-optimal value is
computed exactly by DP over the joint posterior (an expectation under the prior, no CI). Mishra et al.'s
numbers are quoted from their table 3; how they ran MAML (episodes per inner step) is not checked here.

    for (N, K) in the grid: meta-train MAML; on the held-out tasks play every baseline; MAML's support and
    query episodes -> table, plot of reward per episode by method
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from metagrad.evaluation import mean_ci95
from metagrad.experiments import experiment
from metagrad.rl import MAMLRL, Bandit, SoftmaxPolicy
from metagrad.rl import bandits as B
from metagrad.runs import Run

# Mishra et al. 2018 (SNAIL), table 3, N-armed bandits: (N, K) -> mean reward per episode.
PUBLISHED = {"Gittins": {(5, 10): 6.6, (10, 10): 6.6, (50, 10): 6.5, (5, 100): 78.3, (10, 100): 82.8, (50, 100): 85.2},
             "MAML": {(5, 10): 6.5, (10, 10): 6.6, (50, 10): 6.6, (5, 100): 67.1, (10, 100): 70.1, (50, 100): 70.3},
             "random": {(n, k): {10: 5.0, 100: 49.9}[k] for n in (5, 10, 50) for k in (10, 100)}}


@dataclass
class BanditsConfig:
    arms: tuple[int, ...] = (5, 10, 50)     # N
    horizons: tuple[int, ...] = (10, 100)   # K: pulls per episode
    episodes: int = 1                       # support (and query) episodes per task and policy-gradient step
    inner_lr: float = 30.0                  # per-pull mean of standardised rewards: a large step in logits
    iterations: int = 100
    meta_batch: int = 20
    outer_lr: float = 0.1                   # Adam
    init_scale: float = 1.0                 # the random initial logits' standard deviation
    eval_tasks: int = 1000
    exact_max_arms: int = 50                # Bayes-optimal DP for K <= 10 (cheap there), arms up to this
    seed: int = 0


def uniform_tasks(n: int, arms: int, generator: torch.Generator) -> torch.Tensor:
    """Arm probabilities `[n, arms]`, independent U[0, 1]."""
    return torch.rand(n, arms, generator=generator, dtype=torch.float64)


def dependent_tasks(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """The dependent two-armed bandit: `[n, 2]` rows (p, 1 - p), p ~ U[0, 1]."""
    p = torch.rand(n, 1, generator=generator, dtype=torch.float64)
    return torch.cat([p, 1 - p], 1)


def maml(env: Bandit, cfg: BanditsConfig | DependentConfig, settings: torch.Tensor, run: Run, name: str) -> dict:
    """Meta-train MAML on `env`'s tasks, then its support and query episodes on `settings [tasks, arms]`."""
    gen = torch.Generator().manual_seed(cfg.seed)
    init = torch.randn(env.arms, generator=gen, dtype=torch.float64) * cfg.init_scale
    policy = SoftmaxPolicy(env.arms, init)
    alg = MAMLRL(policy, env, episodes=cfg.episodes, inner_lr=cfg.inner_lr, order=2, gamma=0.0, baseline=None,
                 normalize_advantages=True, sampling_term="dice", path="vmap", seed=cfg.seed)
    opt = torch.optim.Adam(alg.meta_parameters().values(), lr=cfg.outer_lr)
    for it in range(cfg.iterations):
        metrics = alg.train_step(env.sample_tasks(cfg.meta_batch, gen), opt, it)
        run.log(it, {"cell": name, **metrics})
    spread = float(policy.logits.detach().max() - policy.logits.detach().min())
    ret = alg.returns_after_steps(settings, 1, seed=cfg.seed + 30_000)       # [tasks, 2]
    return {"support": ret[:, 0], "query": ret[:, 1], "both": ret.mean(1),
            "logit_spread": {"init": float(init.max() - init.min()), "learned": spread}}


def fmt(x: tuple[float, float]) -> str:
    return f"{x[0]:.2f} ± {x[1]:.2f}"


def run_bandits(cfg: BanditsConfig, run: Run) -> dict:
    rows, cells = [], {}
    for K in cfg.horizons:
        gittins = B.gittins_scorer(K)
        for N in cfg.arms:
            name = f"N={N} K={K}"
            gen = torch.Generator().manual_seed(cfg.seed + 10_000)
            settings = uniform_tasks(cfg.eval_tasks, N, gen)
            env = Bandit(arms=N, horizon=K, sampler=lambda n, g, N=N: uniform_tasks(n, N, g), dtype=torch.float64)
            per = {"random": B.play(B.random_scorer, settings, K, cfg.seed),
                   "UCB1": B.play(B.ucb1_scorer, settings, K, cfg.seed),
                   "Thompson": B.play(B.thompson_scorer, settings, K, cfg.seed),
                   "Gittins": B.play(gittins, settings, K, cfg.seed)}
            m = maml(env, cfg, settings, run, name)
            per |= {"MAML support episode": m["support"], "MAML query episode (after 1 step)": m["query"],
                    "MAML mean of both episodes": m["both"]}
            stats = {k: mean_ci95(v) for k, v in per.items()}
            exact = B.bayes_optimal_value(N, K) if K <= 10 and N <= cfg.exact_max_arms else None
            cells[name] = {"stats": stats, "bayes_optimal": exact, "logit_spread": m["logit_spread"],
                           "gittins_minus_thompson": mean_ci95(per["Gittins"] - per["Thompson"])}
            rows.append({"N": N, "K": K, **{k: fmt(v) for k, v in stats.items()},
                         "Bayes-optimal (exact DP)": None if exact is None else round(exact, 3),
                         **{f"{k} (Mishra et al.)": PUBLISHED[k].get((N, K)) for k in ("random", "Gittins", "MAML")}})
    plot(run, cells)
    return {"table": rows, "cells": cells,
            "note": (f"{cfg.eval_tasks} held-out tasks per cell, the same for every method; MAML: {cfg.iterations} "
                     f"Adam iterations of {cfg.meta_batch} tasks, {cfg.episodes} support episode(s) of K pulls per "
                     f"policy-gradient step at inner_lr {cfg.inner_lr}, then a query episode of K pulls (see the "
                     "module doc: the query episode has K extra pulls of information).")}


def plot(run: Run, cells: dict) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.5))
    names = list(cells)
    methods = list(next(iter(cells.values()))["stats"])
    width = 0.8 / len(methods)
    for j, meth in enumerate(methods):
        K = [float(n.split("K=")[1]) for n in names]
        vals = [cells[n]["stats"][meth][0] / k for n, k in zip(names, K)]
        err = [cells[n]["stats"][meth][1] / k for n, k in zip(names, K)]
        ax.bar([i + j * width for i in range(len(names))], vals, width, yerr=err, label=meth)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))], names)
    ax.set(ylabel="mean reward per pull (95% CI)", title="Bernoulli bandits, held-out tasks")
    ax.legend(fontsize=6)
    run.save_figure(fig, "bandits")


@dataclass
class DependentConfig:
    horizons: tuple[int, ...] = (10, 100)   # K: pulls per episode
    episodes: int = 1
    inner_lr: float = 30.0
    iterations: int = 100
    meta_batch: int = 20
    outer_lr: float = 0.1
    init_scale: float = 1.0
    eval_tasks: int = 2000
    seed: int = 0


def run_dependent(cfg: DependentConfig, run: Run) -> dict:
    rows, cells = [], {}
    for K in cfg.horizons:
        settings = dependent_tasks(cfg.eval_tasks, torch.Generator().manual_seed(cfg.seed + 10_000))
        env = Bandit(arms=2, horizon=K, sampler=dependent_tasks, dtype=torch.float64)
        per = {"random": B.play(B.random_scorer, settings, K, cfg.seed),
               "Thompson (dependent posterior)": B.play(B.dependent_thompson_scorer, settings, K, cfg.seed),
               "Gittins (independent arms, misspecified)": B.play(B.gittins_scorer(K), settings, K, cfg.seed),
               "Bayes-optimal (greedy on the dependent posterior)": B.play(B.dependent_greedy_scorer, settings, K,
                                                                            cfg.seed)}
        m = maml(env, cfg, settings, run, f"K={K}")
        per |= {"MAML support episode": m["support"], "MAML query episode (after 1 step)": m["query"],
                "MAML mean of both episodes": m["both"]}
        stats = {k: mean_ci95(v) for k, v in per.items()}
        exact, greedy_optimal = B.dependent_bayes_optimal(K)
        bayes = per["Bayes-optimal (greedy on the dependent posterior)"]
        cells[f"K={K}"] = {"stats": stats, "bayes_optimal_exact": exact, "greedy_is_optimal": greedy_optimal,
                           "bayes_minus_thompson": mean_ci95(bayes - per["Thompson (dependent posterior)"]),
                           "bayes_minus_gittins": mean_ci95(bayes - per["Gittins (independent arms, misspecified)"]),
                           "logit_spread": m["logit_spread"]}
        rows.append({"K": K, **{k: fmt(v) for k, v in stats.items()}, "Bayes-optimal exact (DP)": round(exact, 3)})
    plot(run, cells)
    return {"table": rows, "cells": cells,
            "note": (f"{cfg.eval_tasks} held-out tasks (p ~ U[0,1], arms p and 1-p), the same for every method; the "
                     "exact DP value is the Bayes-optimal expectation under the prior; every pull tells as much "
                     "about p whichever arm it is, so greedy on the posterior mean is optimal (checked by the DP).")}


experiment("rl-bandits", "N-armed Bernoulli bandits (N=5,10,50; K=10,100): MAML "
           "(adapting between episodes) vs exact Gittins index, Thompson, UCB1, random, Bayes-optimal DP, beside "
           "Mishra et al. table 3", BanditsConfig)(run_bandits)
experiment("rl-dependent-bandit", "the dependent two-armed bandit (p, 1-p): exact Bayes-optimal DP (greedy) vs "
           "Thompson sampling, the (misspecified) Gittins index, MAML and random", DependentConfig)(run_dependent)
