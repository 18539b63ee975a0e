"""task-center: the start closest (in expected squared distance) to the task optima is their mean.

Claim. For task optima c ~ p with mean mu and covariance Sigma, and any start theta,

    E ||theta - c||^2 = ||theta - mu||^2 + tr Sigma,

(expand the square; the cross term E[mu - c] is zero), so the mean is the unique minimiser and every
other start pays exactly ||theta - mu||^2 extra. By optimisation: metagrad's MAML with
`inner_steps=0` on bowls 1/2 ||theta - c_i||^2 (the `quadratic` family with A_i = I) minimises the
empirical version by gradient descent and lands on the sample mean of the training optima.

Where it is false: for another distance the best start changes. The optima here are a skewed
mixture (a big cluster and a far small one), so the mean sits between the clusters; the geometric
median minimises the expected *Euclidean* (unsquared) distance and beats the mean there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from metagrad.algorithms import MAML, OptimumAverage
from metagrad.evaluation import mean_ci95
from metagrad.experiments import experiment
from metagrad.runs import Run
from metagrad.tasks.quadratic import Quadratic


@dataclass
class Config:
    dim: int = 2
    n_train_tasks: int = 200
    n_test_tasks: int = 20000
    far_fraction: float = 0.2      # share of tasks in the far cluster
    far_offset: float = 4.0        # the far cluster's centre is far_offset * (1, ..., 1)
    spread: float = 1.0            # std of the optima around their cluster centre
    outer_lr: float = 0.1
    iterations: int = 200
    seed: int = 0


def sample_optima(cfg: Config, n: int, generator: torch.Generator) -> Tensor:
    """Optima `[n, dim]` from the two-cluster mixture (unit Hessians: bowls 1/2 ||theta - c||^2)."""
    near = Quadratic(cfg.dim, 0.0, cfg.spread, (1.0, 1.0), rotate=False)
    far = Quadratic(cfg.dim, cfg.far_offset, cfg.spread, (1.0, 1.0), rotate=False)
    is_far = torch.rand(n, generator=generator) < cfg.far_fraction
    return torch.where(is_far[:, None], far.sample_params(n, generator)[0], near.sample_params(n, generator)[0])


def population_moments(cfg: Config) -> tuple[Tensor, float]:
    """Mean `[dim]` and tr(covariance) of the mixture, in closed form."""
    p, far = cfg.far_fraction, torch.full((cfg.dim,), cfg.far_offset, dtype=torch.float64)
    return p * far, cfg.dim * cfg.spread ** 2 + p * (1 - p) * float(far @ far)


def geometric_median(points: Tensor, iterations: int = 500) -> Tensor:
    """Weiszfeld's iteration: the point minimising the sum of Euclidean distances to `points [n, d]`."""
    m = points.mean(0)
    for _ in range(iterations):
        w = 1.0 / (points - m).norm(dim=1).clamp_min(1e-12)
        m = (w[:, None] * points).sum(0) / w.sum()
    return m


def descend_to_center(train: Tensor, cfg: Config) -> tuple[Tensor, list[Tensor], list[float]]:
    """MAML with no inner step on the bowls of `train [n, d]`: start, trajectory, meta-loss per iteration."""
    fam = Quadratic(cfg.dim, 0.0, 0.0, (1.0, 1.0), rotate=False)
    batch = fam.batch(train, torch.eye(cfg.dim, dtype=torch.float64).expand(len(train), -1, -1))
    model = nn.Linear(cfg.dim, 1, bias=False).double()
    nn.init.zeros_(model.weight)
    maml = MAML(model, inner_lr=1.0, inner_steps=0)
    opt = torch.optim.SGD(maml.parameters(), lr=cfg.outer_lr)
    path, losses = [model.weight.detach()[0].clone()], []
    for _ in range(cfg.iterations):
        losses.append(maml.meta_step(batch, opt)["meta_loss"])
        path.append(model.weight.detach()[0].clone())
    return path[-1], path, losses


def optimum_average(train: Tensor, cfg: Config) -> Tensor:
    """metagrad's OptimumAverage on the bowls of `train`: one outer SGD step of rate 1 from the origin."""
    fam = Quadratic(cfg.dim, 0.0, 0.0, (1.0, 1.0), rotate=False)
    batch = fam.batch(train, torch.eye(cfg.dim, dtype=torch.float64).expand(len(train), -1, -1))
    model = nn.Linear(cfg.dim, 1, bias=False).double()
    nn.init.zeros_(model.weight)
    algo = OptimumAverage(model, inner_lr=0.5, fit_steps=60)  # each fit: 60 halvings of the distance to c_i
    algo.meta_step(batch, torch.optim.SGD(algo.parameters(), lr=1.0))
    return model.weight.detach()[0].clone()


def compare_starts(cfg: Config) -> dict:
    """Expected squared and Euclidean distance to held-out optima for the candidate starts."""
    g = torch.Generator().manual_seed(cfg.seed)
    train, test = sample_optima(cfg, cfg.n_train_tasks, g), sample_optima(cfg, cfg.n_test_tasks, g)
    mu, tr_cov = population_moments(cfg)
    learned, path, losses = descend_to_center(train, cfg)
    starts = {
        "population mean (analytic)": mu,
        "sample mean of train optima": train.mean(0),
        "MAML inner_steps=0, gradient descent": learned,
        "OptimumAverage (metagrad)": optimum_average(train, cfg),
        "coordinate-wise median": train.median(0).values,
        "geometric median": geometric_median(train),
        "origin (centre of big cluster)": torch.zeros(cfg.dim, dtype=torch.float64),
    }
    sq_mean = ((test - mu) ** 2).sum(1)
    rows = []
    for name, theta in starts.items():
        sq = ((test - theta) ** 2).sum(1)
        e_sq, ci_sq = mean_ci95(sq)
        excess, ci_ex = mean_ci95(sq - sq_mean)  # paired with the mean's distances: same test tasks
        e_d, ci_d = mean_ci95(sq.sqrt())
        rows.append({"start": name, "theta": [round(float(v), 4) for v in theta],
                     "E_sq_dist": e_sq, "ci95": ci_sq,
                     "predicted_trS_plus_gap": tr_cov + float(((theta - mu) ** 2).sum()),
                     "excess_vs_mean": excess, "excess_ci95": ci_ex,
                     "predicted_excess": float(((theta - mu) ** 2).sum()),
                     "E_dist": e_d, "E_dist_ci95": ci_d})
    return {"table": rows, "starts": starts, "train": train, "test": test, "path": torch.stack(path),
            "losses": losses, "min_meta_loss": 0.5 * float(((train - train.mean(0)) ** 2).sum(1).mean()),
            "gd_minus_sample_mean": float((learned - train.mean(0)).norm()), "tr_cov": tr_cov}


@experiment("task-center", "The start minimising expected squared distance to task optima is their mean", Config)
def run_task_center(cfg: Config, run: Run) -> dict:
    """Candidate starts vs held-out optima: table of expected distances, scatter and descent plots."""
    import matplotlib.pyplot as plt

    r = compare_starts(cfg)
    fig, ax = plt.subplots(1, 3, figsize=(18, 4.8), gridspec_kw={"wspace": 0.55})
    pts = r["test"][:2000]
    ax[0].scatter(pts[:, 0], pts[:, 1], s=3, alpha=0.25, color="gray", label="held-out task optima")
    ax[0].plot(r["path"][:, 0], r["path"][:, 1], "-", color="tab:blue", lw=1, label="MAML (0 inner steps) path")
    for (name, theta), m in zip(r["starts"].items(), "*ox+sDv"):
        ax[0].scatter(float(theta[0]), float(theta[1]), marker=m, s=90, label=name, zorder=3)
    ax[0].set(title="optima and candidate starts", xlabel="c[0]", ylabel="c[1]")
    ax[0].legend(fontsize=7)
    ax[1].semilogy((r["path"] - r["train"].mean(0)).norm(dim=1))
    ax[1].set(title="gradient descent reaches the sample mean", xlabel="iteration",
              ylabel="||theta_t - mean of train optima||")
    names = [row["start"] for row in r["table"]]
    y = range(len(names))
    best_sq, best_d = min(row["E_sq_dist"] for row in r["table"]), min(row["E_dist"] for row in r["table"])
    ax[2].barh([i + 0.2 for i in y], [row["E_sq_dist"] / best_sq for row in r["table"]], 0.4,
               label="E ||theta - c||^2 (relative to best)")
    ax[2].barh([i - 0.2 for i in y], [row["E_dist"] / best_d for row in r["table"]], 0.4,
               label="E ||theta - c|| (relative to best)")
    ax[2].set_yticks(list(y), names, fontsize=7)
    ax[2].set_xlim(0.95, None)
    ax[2].legend(fontsize=7)
    ax[2].set_title("held-out tasks: squared distance favours\nthe mean, plain distance the median")
    run.save_figure(fig, "task_center")
    table = [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()} for row in r["table"]]
    return {"table": table, "tr_cov": r["tr_cov"], "gd_minus_sample_mean": r["gd_minus_sample_mean"]}
