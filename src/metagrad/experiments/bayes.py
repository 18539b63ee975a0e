"""bayes: k steps of gradient descent from a start are a Bayesian posterior mean under a prior centred there.

Claim (Santos 1996; Grant et al. 2018). A linear-Gaussian task y = X w + eps, eps ~ N(0, sigma^2 I), with
n support points and metagrad's loss L(w) = mean (X w - y)^2 = 1/2 (w - w_ls)^T H (w - w_ls) + const,
H = 2 X^T X / n. Gradient descent at rate alpha from theta_0 gives, after k steps,

    theta_k - w_ls = B^k (theta_0 - w_ls),        B = I - alpha H.

The MAP (= posterior mean) under the prior N(theta_0, S) minimises L(w) + 1/2 (w - theta_0)^T Lam (w - theta_0)
with Lam = (2 sigma^2 / n) S^-1, so  w_MAP - w_ls = (H + Lam)^-1 Lam (theta_0 - w_ls).  The two agree for

    Lam = H B^k (I - B^k)^-1        (in H's eigenbasis: lam_j = h_j r_j / (1 - r_j), r_j = (1 - alpha h_j)^k),

so early-stopped GD is Bayesian inference with prior covariance S = (2 sigma^2 / n) Lam^-1. For alpha h << 1,
lam_j ~ 1 / (alpha k) - h_j (k + 1) / (2k): the effective prior strength is about 1 / (alpha k), weaker
with more steps or a larger rate. Where it fails: a Gaussian prior needs 0 < r_j < 1. When a step
overshoots (alpha h_j > 1) and k is odd, r_j < 0 and Lam has negative eigenvalues: GD still equals the
formula, but no prior reproduces it; alpha h_j > 2 diverges.

Meta-learning the start: MAML with these k steps on tasks w ~ N(mu, tau^2 I) drives theta_0 to mu (the
task weights are independent of the inputs, so the expected post-adaptation loss is minimised at E w),
and k steps from the learned start are then close to the Bayes-optimal posterior mean of the true prior.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from metagrad.algorithms import MAML
from metagrad.core import TaskBatch
from metagrad.evaluation import mean_ci95
from metagrad.experiments import experiment
from metagrad.runs import Run
from metagrad.tasks.quadratic import LinearGaussian, least_squares


@dataclass
class Config:
    dim: int = 4
    shots: int = 8
    query_shots: int = 20
    mean: float = 1.5            # population mean of the task weights (every coordinate)
    prior_std: float = 1.0
    noise: float = 1.5
    check_lrs: tuple[float, ...] = (0.05, 0.15, 0.3)
    check_steps: tuple[int, ...] = (1, 2, 5, 20)
    check_tasks: int = 200
    # MAML's inner loop; at alpha = 0.08, k = 10 the implied prior precision (mean over these tasks) is about the
    # true prior's 2 sigma^2 / (n tau^2) = 0.5625, so k steps from mu are nearly the Bayes posterior mean.
    inner_lr: float = 0.08
    inner_steps: int = 10
    outer_lr: float = 0.05
    meta_batch: int = 25
    iterations: int = 300
    test_tasks: int = 2000
    seed: int = 0


def hessian(x: Tensor) -> Tensor:
    """Hessian of the mean squared error of each task, 2 X^T X / n: `[tasks, dim, dim]`."""
    return 2 * x.transpose(-1, -2) @ x / x.shape[-2]


def gd_prior_precision(h: Tensor, inner_lr: float, inner_steps: int) -> Tensor:
    """Lam = H B^k (I - B^k)^-1, B = I - alpha H: the prior precision (loss units) that k GD steps implement."""
    evals, evecs = torch.linalg.eigh(h)
    r = (1 - inner_lr * evals) ** inner_steps
    return evecs @ torch.diag_embed(evals * r / (1 - r)) @ evecs.transpose(-1, -2)


def map_estimate(x: Tensor, y: Tensor, start: Tensor, precision: Tensor) -> Tensor:
    """argmin_w L(w) + 1/2 (w - start)^T Lam (w - start) for every task: `[tasks, dim]`."""
    n = x.shape[-2]
    rhs = 2 * x.transpose(-1, -2) @ y / n + precision @ start.unsqueeze(-1)
    return torch.linalg.solve(hessian(x) + precision, rhs).squeeze(-1)


def posterior_mean(x: Tensor, y: Tensor, prior_mean: Tensor, prior_precision: Tensor, noise: float) -> Tensor:
    """E[w | X, y] for y = X w + N(0, noise^2), w ~ N(prior_mean, prior_precision^-1): `[tasks, dim]`."""
    # The precision form: GD's implied prior can have a huge covariance (precision ~ 0) in converged directions.
    s_inv = prior_precision
    a = x.transpose(-1, -2) @ x / noise ** 2 + s_inv
    b = x.transpose(-1, -2) @ y / noise ** 2 + s_inv @ prior_mean.unsqueeze(-1)
    return torch.linalg.solve(a, b).squeeze(-1)


def gradient_descent(x: Tensor, y: Tensor, start: Tensor, inner_lr: float, inner_steps: int) -> Tensor:
    """metagrad's own inner loop (SGD on the MSE of nn.Linear) from `start [dim]` on each task: `[tasks, dim]`."""
    model = nn.Linear(x.shape[-1], 1, bias=False).to(x.dtype)
    with torch.no_grad():
        model.weight.copy_(start[None])
    alg = MAML(model, inner_lr=inner_lr, inner_steps=inner_steps)
    return alg.adapt(TaskBatch(x, y, x, y), inner_steps)["weight"][:, 0]


def check_equivalence(cfg: Config, gen: torch.Generator) -> list[dict]:
    """GD vs the MAP under the implied prior, over a grid of rates and step counts."""
    fam = LinearGaussian(cfg.dim, cfg.shots, cfg.query_shots, cfg.mean, cfg.prior_std, cfg.noise)
    batch = fam.sample(cfg.check_tasks, gen)
    x, y = batch.support_x, batch.support_y
    start = torch.full((cfg.dim,), cfg.mean, dtype=x.dtype) + 0.5 * torch.randn(cfg.dim, generator=gen,
                                                                                   dtype=x.dtype)
    h = hessian(x)
    h_max = torch.linalg.eigvalsh(h)[:, -1]
    rows = []
    for lr in cfg.check_lrs:
        for k in cfg.check_steps:
            gd = gradient_descent(x, y, start, lr, k)
            lam = gd_prior_precision(h, lr, k)
            lam_evals = torch.linalg.eigvalsh(lam)
            valid = lam_evals.min(-1).values > 0
            # The posterior with prior covariance S = (2 sigma^2 / n) Lam^-1, where Lam is a precision.
            post = posterior_mean(x[valid], y[valid], start, cfg.shots / (2 * cfg.noise ** 2) * lam[valid], cfg.noise)
            scale = gd.abs().max(-1, keepdim=True).values.clamp_min(1.0)
            rows.append({
                "inner_lr": lr, "inner_steps": k,
                "max_rel_|GD-MAP|": float(((gd - map_estimate(x, y, start, lam)) / scale).abs().max()),
                "max_|GD-posterior|": float((gd[valid] - post).abs().max()) if valid.any() else float("nan"),
                "overshoot_tasks": float((lr * h_max > 1).float().mean()),
                "diverging_tasks": float((lr * h_max > 2).float().mean()),
                "valid_prior_tasks": float(valid.float().mean()),
                "mean_prior_precision": float(lam_evals[valid].mean()) if valid.any() else float("nan"),
                "1/(alpha*k)": 1.0 / (lr * k),
            })
    return rows


def meta_learn_start(cfg: Config, gen: torch.Generator) -> tuple[Tensor, list[float]]:
    """MAML from theta_0 = 0 on linear-Gaussian tasks: the learned start and ||theta_0 - mu|| per iteration."""
    fam = LinearGaussian(cfg.dim, cfg.shots, cfg.query_shots, cfg.mean, cfg.prior_std, cfg.noise)
    model = nn.Linear(cfg.dim, 1, bias=False).double()
    nn.init.zeros_(model.weight)
    alg = MAML(model, inner_lr=cfg.inner_lr, inner_steps=cfg.inner_steps)
    opt = torch.optim.Adam(alg.parameters(), lr=cfg.outer_lr)
    mu = fam.mean_vector()
    dist = [float((model.weight[0].detach() - mu).norm())]
    for _ in range(cfg.iterations):
        alg.meta_step(fam.sample(cfg.meta_batch, gen), opt)
        dist.append(float((model.weight[0].detach() - mu).norm()))
    return model.weight[0].detach().clone(), dist


def compare_estimators(cfg: Config, start: Tensor, gen: torch.Generator) -> list[dict]:
    """Query MSE (mean, 95% CI over test tasks) of k GD steps from several starts and of the Bayes posterior."""
    fam = LinearGaussian(cfg.dim, cfg.shots, cfg.query_shots, cfg.mean, cfg.prior_std, cfg.noise)
    test = fam.sample(cfg.test_tasks, gen)
    x, y = test.support_x, test.support_y
    mu = fam.mean_vector()
    zero = torch.zeros(cfg.dim, dtype=x.dtype)
    estimates = {
        "least squares (no prior)": least_squares(x, y),
        "k GD steps from 0": gradient_descent(x, y, zero, cfg.inner_lr, cfg.inner_steps),
        "k GD steps from the MAML start": gradient_descent(x, y, start, cfg.inner_lr, cfg.inner_steps),
        "k GD steps from mu (oracle start)": gradient_descent(x, y, mu, cfg.inner_lr, cfg.inner_steps),
        "posterior mean, true prior (Bayes)": posterior_mean(
            x, y, mu, torch.eye(cfg.dim, dtype=x.dtype) / cfg.prior_std ** 2, cfg.noise),
    }
    rows = []
    for name, w in estimates.items():
        per_task = ((test.query_x @ w.unsqueeze(-1) - test.query_y) ** 2).mean((1, 2))
        m, ci = mean_ci95(per_task)
        rows.append({"estimator": name, "query_mse": m, "ci95": ci})
    # Prior strength in loss units: what k steps imply on these tasks, and what the true prior has.
    implied = torch.linalg.eigvalsh(gd_prior_precision(hessian(x), cfg.inner_lr, cfg.inner_steps)).mean()
    rows.append({"estimator": "prior precision (loss units): mean implied by k GD steps",
                 "precision": float(implied)})
    rows.append({"estimator": "prior precision (loss units): true prior, 2 sigma^2 / (n tau^2)",
                 "precision": 2 * cfg.noise ** 2 / (cfg.shots * cfg.prior_std ** 2)})
    return rows


@experiment("bayes", "k GD steps from a start = posterior mean under a prior centred there; MAML's start -> mu",
            Config)
def run(cfg: Config, run: Run) -> dict:
    gen = torch.Generator().manual_seed(cfg.seed)
    check = check_equivalence(cfg, gen)
    start, dist = meta_learn_start(cfg, gen)
    estimators = compare_estimators(cfg, start, gen)
    mu = torch.full((cfg.dim,), cfg.mean, dtype=torch.float64)
    table = [{"part": "GD = MAP", **r} for r in check] + [{"part": "estimators", **r} for r in estimators]

    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.5))
    h = torch.linspace(0.01, 13, 600, dtype=torch.float64)
    for k in (1, 2, 5, 20):
        r = (1 - 0.15 * h) ** k
        axes[0].plot(h, h * r / (1 - r), label=f"k={k}")
        axes[0].axhline(1 / (0.15 * k), ls=":", color=axes[0].lines[-1].get_color())
    axes[0].axvline(1 / 0.15, color="k", lw=0.8)
    axes[0].set(ylim=(-8, 10), xlabel="Hessian eigenvalue h", ylabel="implied prior precision",
                title="k GD steps at alpha = 0.15 as a prior\ndotted: 1/(alpha k); black: alpha h = 1")
    axes[0].legend()
    axes[1].semilogy(dist)
    axes[1].set(xlabel="meta-iteration", ylabel="||theta_0 - mu||", title="MAML's start -> population mean")
    bars = [r for r in estimators if "query_mse" in r]
    axes[2].barh([r["estimator"] for r in bars], [r["query_mse"] for r in bars], xerr=[r["ci95"] for r in bars])
    axes[2].set(xlabel="query MSE (95% CI)", title=f"{cfg.test_tasks} test tasks")
    run.save_figure(fig, "bayes")
    return {"table": table, "final_distance_to_mu": dist[-1], "initial_distance_to_mu": dist[0],
            "learned_start": start.tolist(), "mu": mu.tolist()}
