"""quadratic-maml: on quadratic tasks the MAML start is a curvature-weighted average of the optima.

Derivation. Task i: L_i(theta) = 1/2 (theta - c_i)^T A_i (theta - c_i). One inner step of rate alpha,
    theta_i' = theta - alpha A_i (theta - c_i)   =>   theta_i' - c_i = B_i (theta - c_i),  B_i = I - alpha A_i,
and after k steps theta_i' - c_i = B_i^k (theta - c_i). The post-adaptation loss is
    L_i(theta_i') = 1/2 (theta - c_i)^T M_i (theta - c_i),   M_i = (B_i^k)^T A_i B_i^k,
a quadratic in theta again, so the MAML objective sum_i L_i(theta_i') is minimised where
sum_i M_i (theta - c_i) = 0:
    theta*_MAML = (sum_i M_i)^-1 sum_i M_i c_i.
It is a weighted average of the optima. Along an eigen-direction of curvature lambda the weight is
lambda (1 - alpha lambda)^(2k) instead of the pooled (pre-adaptation, k = 0) weight lambda: a task whose
inner step lands near its optimum (alpha lambda near 1) hardly cares where it starts and weighs little;
a step that overshoots (1 < alpha lambda < 2) weighs less than pooled too, and only unstable steps
(alpha lambda > 2) weigh more.

The experiment compares the closed form, metagrad's MAML (second order, `nn.Linear(dim, 1, bias=False)`
on the `quadratic` family) trained by full-batch gradient descent (it must land on the closed form),
the pooled optimum and the plain mean of the optima: post-adaptation loss on the training tasks and
on held-out tasks, including held-out tasks whose Hessians come from another range, and one where the
link between curvature and optimum is reversed (the regime where the learned weighting hurts).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from metagrad.algorithms import MAML
from metagrad.evaluation import mean_ci95
from metagrad.experiments import experiment
from metagrad.runs import Run
from metagrad.tasks.quadratic import Quadratic, adapt_quadratic, maml_optimum, quadratic_loss


@dataclass
class Config:
    dim: int = 2
    inner_lr: float = 0.5
    inner_steps: int = 1
    eigen_range: tuple[float, float] = (0.1, 3.0)  # alpha * lambda up to 1.5: the stiffest steps overshoot
    spread: float = 0.3
    curvature_shift: float = 2.0                  # optima move along e_1 with the log-curvature
    n_train_tasks: int = 256
    n_test_tasks: int = 4000
    outer_lr: float = 1.0
    iterations: int = 400
    seed: int = 0


def held_out_families(cfg: Config) -> dict[str, Quadratic]:
    """The training family and held-out families with other Hessians or another curvature-optimum link."""
    train = Quadratic(cfg.dim, 0.0, cfg.spread, cfg.eigen_range, True, cfg.curvature_shift)
    lo, hi = cfg.eigen_range
    return {
        "same family (fresh tasks)": train,
        "softer Hessians": replace(train, eigen_range=(lo / 2, hi / 2)),
        "stiffer Hessians (alpha*lambda<2)": replace(train, eigen_range=(lo * 2, min(hi * 1.25, 1.95 / cfg.inner_lr))),
        "axis-aligned Hessians": replace(train, rotate=False),
        "reversed curvature-optimum link": replace(train, curvature_shift=-cfg.curvature_shift),
    }


def train_maml(cfg: Config, c: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """metagrad's second-order MAML, full batch on the training bowls; final start and trajectory."""
    fam = Quadratic(cfg.dim)
    batch = fam.batch(c, a)
    model = nn.Linear(cfg.dim, 1, bias=False).double()
    nn.init.zeros_(model.weight)
    maml = MAML(model, inner_lr=cfg.inner_lr, inner_steps=cfg.inner_steps, order=2)
    opt = torch.optim.SGD(maml.parameters(), lr=cfg.outer_lr)
    path = [model.weight.detach()[0].clone()]
    for _ in range(cfg.iterations):
        maml.meta_step(batch, opt)
        path.append(model.weight.detach()[0].clone())
    return path[-1], path


def compare(cfg: Config) -> dict:
    """Closed form vs trained MAML vs pooled vs mean; post-adaptation losses on train and held-out tasks."""
    g = torch.Generator().manual_seed(cfg.seed)
    families = held_out_families(cfg)
    c, a = families["same family (fresh tasks)"].sample_params(cfg.n_train_tasks, g)
    closed = maml_optimum(c, a, cfg.inner_lr, cfg.inner_steps)
    trained, path = train_maml(cfg, c, a)
    starts = {"MAML closed form": closed, "MAML trained (metagrad)": trained,
              "pooled optimum": maml_optimum(c, a, cfg.inner_lr, 0), "mean of optima": c.mean(0)}
    sets = {"train tasks": (c, a), **{name: fam.sample_params(cfg.n_test_tasks, g) for name, fam in families.items()}}
    rows = []
    for set_name, (tc, ta) in sets.items():
        post = {name: quadratic_loss(adapt_quadratic(th, tc, ta, cfg.inner_lr, cfg.inner_steps), tc, ta)
                for name, th in starts.items()}
        diff, ci = mean_ci95(post["MAML trained (metagrad)"] - post["pooled optimum"])
        row = {"tasks": set_name}
        for name, v in post.items():
            row[f"loss: {name}"] = mean_ci95(v)[0]
        rows.append({**row, "maml_minus_pooled": diff, "ci95": ci,
                     "winner": "tie" if abs(diff) <= ci else ("MAML" if diff < 0 else "pooled")})
    return {"table": rows, "starts": starts, "c": c, "a": a, "path": torch.stack(path),
            "trained_vs_closed": float((trained - closed).norm() / closed.norm())}


@experiment("quadratic-maml", "On quadratic tasks MAML's start is a curvature-weighted average of the optima", Config)
def run_quadratic_maml(cfg: Config, run: Run) -> dict:
    """Table of post-adaptation losses; plots of optima and starts, and of the closed-form task weights."""
    import matplotlib.pyplot as plt

    r = compare(cfg)
    fig, ax = plt.subplots(1, 2, figsize=(13, 5))
    logc = torch.linalg.eigvalsh(r["a"]).log().mean(1)
    sc = ax[0].scatter(r["c"][:, 0], r["c"][:, 1], c=logc, cmap="viridis", s=25)
    fig.colorbar(sc, ax=ax[0], label="mean log eigenvalue of A_i")
    ax[0].plot(r["path"][:, 0], r["path"][:, 1], "-", color="gray", lw=1, label="MAML training path")
    for (name, th), m in zip(r["starts"].items(), "*xos"):
        ax[0].scatter(float(th[0]), float(th[1]), marker=m, s=120, label=name, zorder=3)
    ax[0].set(title="training optima c_i and starts", xlabel="theta[0]", ylabel="theta[1]")
    ax[0].legend(fontsize=8)
    lam = torch.linspace(1e-3, 2.2 / cfg.inner_lr, 400, dtype=torch.float64)
    for k in sorted({1, cfg.inner_steps, 3}):
        ax[1].plot(lam, (1 - cfg.inner_lr * lam) ** (2 * k),
                   label=f"MAML / pooled weight, k={k}: (1-alpha lambda)^{2 * k}")
    ax[1].axvline(1 / cfg.inner_lr, ls="--", color="gray", label="alpha lambda = 1 (one step lands on c_i)")
    ax[1].axvspan(1 / cfg.inner_lr, 2 / cfg.inner_lr, color="orange", alpha=0.15, label="overshoot, stable")
    ax[1].axvspan(*cfg.eigen_range, color="green", alpha=0.08, label="training eigenvalues")
    ax[1].set(ylim=(0, 1.5), xlabel="curvature lambda", ylabel="weight relative to pooled (lambda)",
              title=f"closed-form weight of a direction of curvature lambda (alpha={cfg.inner_lr})")
    ax[1].legend(fontsize=7)
    run.save_figure(fig, "quadratic_maml")
    table = [{k: (round(v, 5) if isinstance(v, float) else v) for k, v in row.items()} for row in r["table"]]
    return {"table": table, "trained_vs_closed_rel_err": r["trained_vs_closed"],
            "starts": {k: v.tolist() for k, v in r["starts"].items()}}
