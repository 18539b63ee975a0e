"""pool-vs-average: estimating the population of tasks from imbalanced tasks, pooled or averaged.

Setting. Tasks i = 1..m are linear regressions y = x . w_i + sigma_i eps (the `linear-gaussian`
family), w_i ~ N(mu, tau^2 I): tau is the task diversity. One task is big (shots * imbalance
points), the others have `shots` points; noise levels sigma_i are log-uniform in `noise_range`.
The goal is mu, the centre of the task population (what a new task is expected to be).

Estimators.
  pool:     least squares on all points together. Each task counts by its number of points, so
            with imbalance the estimate is pulled toward the big task's w_big:
            error ~ tau^2 sum_i (n_i/N)^2 + noise / N.
  average:  the mean of the per-task least-squares estimates: every task counts once,
            error ~ tau^2 / m + mean_i sigma_i^2 E tr (X_i^T X_i)^-1 / m.
  oracle:   precision-weighted average, weights (tau^2 I + sigma_i^2 (X_i^T X_i)^-1)^-1 (the
            random-effects estimator with the true tau and sigma_i): the best of both, for reference.
So pooling wins when tasks are alike (tau small: it uses every point) and averaging wins when they
differ and the sizes are imbalanced. The grid over (tau, imbalance) shows which wins where, with a
paired 95% CI over repeats; "tie" where it includes zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from metagrad.evaluation import mean_ci95
from metagrad.experiments import experiment
from metagrad.runs import Run
from metagrad.tasks.quadratic import LinearGaussian


@dataclass
class Config:
    dim: int = 2
    n_tasks: int = 10
    shots: int = 8                                  # points of each small task
    imbalances: tuple[int, ...] = (1, 4, 16, 64, 256)  # big task has shots * imbalance points
    diversities: tuple[float, ...] = (0.0, 0.1, 0.3, 1.0, 3.0)  # tau, std of the true task weights
    noise_range: tuple[float, float] = (0.25, 2.0)  # per-task noise std, log-uniform
    repeats: int = 1000
    seed: int = 0


def estimate_errors(cfg: Config, tau: float, imbalance: int, generator: torch.Generator) -> dict[str, Tensor]:
    """Squared error ||estimate - mu||^2 `[repeats]` of pool, average and oracle for one grid cell."""
    fam = LinearGaussian(dim=cfg.dim, mean=1.0, prior_std=tau)
    mu = fam.mean_vector()
    r, m, d = cfg.repeats, cfg.n_tasks, cfg.dim
    w = fam.sample_params(r * m, generator).view(r, m, d)
    lo, hi = cfg.noise_range
    sigma = torch.exp(math.log(lo) + (math.log(hi) - math.log(lo)) * torch.rand(r, m, generator=generator,
                                                                                 dtype=fam.dtype))
    # Task 0 is the big one; only the sufficient statistics X^T X `[r, m, d, d]` and X^T y `[r, m, d]` are kept.
    xb, yb = fam.points(w[:, 0], cfg.shots * imbalance, generator, noise=sigma[:, 0])
    xs, ys = fam.points(w[:, 1:].reshape(-1, d), cfg.shots, generator, noise=sigma[:, 1:].reshape(-1))
    xtx = torch.cat([(xb.mT @ xb)[:, None], (xs.mT @ xs).view(r, m - 1, d, d)], 1)
    xty = torch.cat([(xb.mT @ yb)[:, None], (xs.mT @ ys).view(r, m - 1, d, 1)], 1)
    per_task = torch.linalg.solve(xtx, xty).squeeze(-1)  # [r, m, d]
    pool = torch.linalg.solve(xtx.sum(1), xty.sum(1)).squeeze(-1)
    average = per_task.mean(1)
    cov = tau ** 2 * torch.eye(d, dtype=fam.dtype) + sigma[..., None, None] ** 2 * torch.linalg.inv(xtx)
    prec = torch.linalg.inv(cov)
    oracle = torch.linalg.solve(prec.sum(1), (prec @ per_task.unsqueeze(-1)).sum(1)).squeeze(-1)
    return {name: ((est - mu) ** 2).sum(-1) for name, est in
            (("pool", pool), ("average", average), ("oracle", oracle))}


def grid(cfg: Config) -> list[dict]:
    """One row per (diversity, imbalance): mean squared errors, the paired pool-minus-average CI, the winner."""
    if cfg.n_tasks < 2 or cfg.shots <= cfg.dim + 1:
        raise ValueError(f"need n_tasks >= 2 and shots > dim + 1 (finite least-squares variance); got "
                         f"n_tasks={cfg.n_tasks}, shots={cfg.shots}, dim={cfg.dim}")
    g = torch.Generator().manual_seed(cfg.seed)
    rows = []
    for tau in cfg.diversities:
        for imb in cfg.imbalances:
            err = estimate_errors(cfg, tau, imb, g)
            diff, ci = mean_ci95(err["pool"] - err["average"])
            winner = "tie" if abs(diff) <= ci else ("pool" if diff < 0 else "average")
            rows.append({"diversity": tau, "imbalance": imb,
                         "mse_pool": mean_ci95(err["pool"])[0], "mse_average": mean_ci95(err["average"])[0],
                         "mse_oracle": mean_ci95(err["oracle"])[0],
                         "pool_minus_average": diff, "ci95": ci, "winner": winner})
    return rows


@experiment("pool-vs-average", "Pooling all data vs averaging per-task estimates: which wins where", Config)
def run_pool_vs_average(cfg: Config, run: Run) -> dict:
    """The (diversity x imbalance) grid as a table and a heat map of log10(MSE pool / MSE average)."""
    import matplotlib.pyplot as plt

    rows = grid(cfg)
    ratio = torch.tensor([math.log10(r["mse_pool"] / r["mse_average"]) for r in rows]).view(
        len(cfg.diversities), len(cfg.imbalances))
    fig, ax = plt.subplots(1, 2, figsize=(13, 4.8))
    lim = float(ratio.abs().max())
    im = ax[0].imshow(ratio.numpy(), cmap="coolwarm", vmin=-lim, vmax=lim, origin="lower", aspect="auto")
    for k, r in enumerate(rows):
        i, j = divmod(k, len(cfg.imbalances))
        ax[0].text(j, i, f"{r['winner']}\n{r['mse_pool'] / r['mse_average']:.2g}x", ha="center", va="center",
                   fontsize=7)
    ax[0].set_xticks(range(len(cfg.imbalances)), [str(v) for v in cfg.imbalances])
    ax[0].set_yticks(range(len(cfg.diversities)), [str(v) for v in cfg.diversities])
    ax[0].set(xlabel="imbalance (big task's points / small task's)", ylabel="task diversity tau",
              title="log10 MSE(pool) / MSE(average): blue = pool wins, red = average wins")
    fig.colorbar(im, ax=ax[0])
    big = [r for r in rows if r["imbalance"] == max(cfg.imbalances)]
    for key, label in (("mse_pool", "pool"), ("mse_average", "average"), ("mse_oracle", "precision-weighted (oracle)")):
        ax[1].loglog([max(r["diversity"], 1e-2) for r in big], [r[key] for r in big], "o-", label=label)
    ax[1].set(xlabel="task diversity tau (0 drawn at 0.01)", ylabel="E ||estimate - mu||^2",
              title=f"imbalance {max(cfg.imbalances)}")
    ax[1].legend()
    run.save_figure(fig, "pool_vs_average")
    table = [{k: (round(v, 5) if isinstance(v, float) else v) for k, v in r.items()} for r in rows]
    return {"table": table}
