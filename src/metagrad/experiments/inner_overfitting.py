"""inner-overfitting: on tiny noisy support sets the query loss is U-shaped in the number of inner steps.

Claim. With as many support points as parameters (linear-Gaussian tasks, dim = shots) and label noise,
gradient descent from a good start first fits the signal (the query loss falls), then, along the
low-curvature directions of X^T X, fits the noise (the query loss rises toward the least-squares fit,
whose error blows up as X^T X is ill-conditioned). Remedies, each shown on the same tasks from the same
meta-learned (MAML) start:

- a smaller inner rate: the walk toward the interpolating solution is slower, so the curve is flatter
  over the same step budget (the same path, reached later: it delays rather than removes the rise);
- early stopping chosen on validation tasks (`Algorithm.select_eval_steps`): stop at the step count
  with the lowest mean validation query loss;
- L2 toward the start (`inner.with_l2`): GD converges to the ridge solution centred at the start
  instead of least squares, so the curve flattens at the ridge error.

The rise is loss(after max_steps) - min over steps of the mean curve, with a 95% CI from the
per-task differences (paired on the same tasks); "last - SGD best" compares the loss after the whole
budget with plain SGD stopped (by an oracle) at its best step, also paired.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from metagrad.algorithms import MAML
from metagrad.evaluation import mean_ci95
from metagrad.experiments import experiment
from metagrad.inner import sgd, with_l2
from metagrad.runs import Run
from metagrad.tasks.quadratic import LinearGaussian


@dataclass
class Config:
    dim: int = 10
    shots: int = 10
    query_shots: int = 50
    mean: float = 1.0
    prior_std: float = 0.5
    noise: float = 1.0
    inner_lr: float = 0.1
    inner_steps: int = 5         # MAML's meta-training inner loop (the start is learned with these)
    meta_batch: int = 25
    outer_lr: float = 0.05
    iterations: int = 200
    max_steps: int = 300         # the step budget of the curves
    small_lr_factor: float = 0.1
    l2_strength: float = 0.5     # loss units; the true prior's is 2 sigma^2 / (n tau^2) = 0.8
    val_tasks: int = 300
    test_tasks: int = 1000
    seed: int = 0


def curves(alg: MAML, batch, steps: int) -> torch.Tensor:
    """Query MSE of every task after 0..steps inner steps: `[tasks, steps + 1]`."""
    return alg.adaptation_curve(batch, steps)[0].double()


def rise(curve: torch.Tensor) -> tuple[float, float, int]:
    """Mean rise from the best step of the mean curve to the last step, its 95% CI, and the best step."""
    best = int(curve.mean(0).argmin())
    m, ci = mean_ci95(curve[:, -1] - curve[:, best])
    return m, ci, best


def meta_train_start(cfg: Config, fam: LinearGaussian, gen: torch.Generator) -> nn.Module:
    """The MAML start for these tasks (order 2, inner_steps at inner_lr)."""
    model = nn.Linear(cfg.dim, 1, bias=False).double()
    nn.init.zeros_(model.weight)
    alg = MAML(model, inner_lr=cfg.inner_lr, inner_steps=cfg.inner_steps)
    opt = torch.optim.Adam(alg.parameters(), lr=cfg.outer_lr)
    for _ in range(cfg.iterations):
        alg.meta_step(fam.sample(cfg.meta_batch, gen), opt)
    return model


@experiment("inner-overfitting", "U-shaped query loss over inner steps on tiny noisy support sets, and three "
            "remedies that flatten it", Config)
def run(cfg: Config, run: Run) -> dict:
    gen = torch.Generator().manual_seed(cfg.seed)
    fam = LinearGaussian(cfg.dim, cfg.shots, cfg.query_shots, cfg.mean, cfg.prior_std, cfg.noise)
    model = meta_train_start(cfg, fam, gen)
    val, test = fam.sample(cfg.val_tasks, gen), fam.sample(cfg.test_tasks, gen)
    small = cfg.inner_lr * cfg.small_lr_factor
    variants = {
        f"SGD, inner_lr {cfg.inner_lr:g}": MAML(model, inner_lr=cfg.inner_lr),
        f"smaller rate, inner_lr {small:g}": MAML(model, inner_lr=small),
        f"L2 toward the start, strength {cfg.l2_strength:g}": MAML(
            model, inner_opt=with_l2(sgd(cfg.inner_lr), cfg.l2_strength)),
    }
    results = {name: curves(alg, test, cfg.max_steps) for name, alg in variants.items()}
    # Early stopping: the step count chosen on validation tasks, then the curve stays there.
    baseline = variants[f"SGD, inner_lr {cfg.inner_lr:g}"]
    chosen = baseline.select_eval_steps(val, cfg.max_steps)
    base_curve = results[f"SGD, inner_lr {cfg.inner_lr:g}"]
    stop = torch.arange(cfg.max_steps + 1).clamp_max(chosen)
    results[f"early stopping at {chosen} (chosen on validation tasks)"] = base_curve[:, stop]

    table = []
    base_rise, _, base_best = rise(base_curve)
    for name, c in results.items():
        r, ci, best = rise(c)
        m_best, _ = mean_ci95(c[:, best])
        m_last, ci_last = mean_ci95(c[:, -1])
        # What the budget's last step costs against plain SGD stopped at its best step (paired, same tasks).
        excess, excess_ci = mean_ci95(c[:, -1] - base_curve[:, base_best])
        table.append({"inner loop": name, "best_step": best, "query_mse_best": m_best, "query_mse_last": m_last,
                      "ci95_last": ci_last, "rise": r, "rise_ci95": ci, "rise / SGD rise": r / base_rise,
                      "last - SGD best": excess, "excess_ci95": excess_ci})

    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    steps = torch.arange(cfg.max_steps + 1)
    for name, c in results.items():
        m = c.mean(0)
        ci = 1.96 * c.std(0) / c.shape[0] ** 0.5
        ax.plot(steps, m, label=name)
        ax.fill_between(steps, m - ci, m + ci, alpha=0.2)
    ax.set(xscale="symlog", xlabel="inner steps", ylabel=f"query MSE ({cfg.test_tasks} test tasks, 95% CI)",
           title=f"{cfg.shots} noisy shots, {cfg.dim} parameters: the U and its remedies")
    ax.legend(fontsize=8)
    run.save_figure(fig, "inner_overfitting")
    return {"table": table, "chosen_eval_steps": chosen}
