"""Materials kinetics: a new material system's JMAK parameters (k, n) from a few sparse measurements.

    tasks   = material systems with X(t) = 1 - exp(-(k t)^n), k log-uniform in [0.03, 0.3] 1/h,
              n uniform in [1, 4] (metagrad.tasks.jmak); `shots` noisy measurements at random times
    model   = the JMAK equation itself with parameters log k and log n (positive by construction,
              metagrad.models.physical.JMAK)
    MAML    = the start (log k, log n) meta-trained (order 2 and order 1) for `inner_steps` SGD steps
    pooled  = the single (k, n) that fits all systems' measurements best
    guesses = the uninformed k = 1/h, n = 1 (log-parameters 0), and the middle of the ranges
              (k = 0.095/h, n = 2.5)
    score every start on held-out systems after 0..eval_steps SGD steps at inner_lr: query MSE of X(t),
    |n_hat - n| and |k_hat - k| / k

The pooled fit of a sigmoid law is the average curve, flatter than any real one (small n); the MAML start
is chosen for where a few steps lead instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from metagrad.algorithms.base import Algorithm
from metagrad.core import TaskBatch
from metagrad.experiments import experiment
from metagrad.experiments.starts import (
    compare,
    curve_result,
    maml_and_pooled,
    plot_curves,
    start,
    table,
    trajectories,
)
from metagrad.models.physical import JMAK, jmak_fraction
from metagrad.runs import Run
from metagrad.tasks.jmak import JMAKKinetics


@dataclass
class Config:
    """Hyper-parameters of the JMAK comparison."""

    seed: int = 0
    shots: int = 4
    query_shots: int = 20
    inner_lr: float = 3.0
    inner_steps: int = 3
    eval_steps: int = 10
    iterations: int = 300
    meta_batch: int = 25
    outer_lr: float = 0.05
    test_tasks: int = 1000
    examples: int = 3


def plot_examples(starts: dict[str, Algorithm], test: TaskBatch, k: Tensor, n: Tensor, family: JMAKKinetics,
                  steps: int, count: int, run: Run) -> None:
    """Measured points, true curve and each start's fitted curve after `steps` steps, for `count` test systems."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = torch.linspace(family.t_min, family.t_max, 200)[:, None]
    fig, axes = plt.subplots(1, count, figsize=(4 * count, 3.2), squeeze=False)
    for i, ax in enumerate(axes[0]):
        ax.plot(t, jmak_fraction(t, k[i], n[i]), "k-", lw=2, label="true law")
        ax.set_title(f"true k = {float(k[i]):.3f}/h, n = {float(n[i]):.2f}", fontsize=9)
        ax.plot(test.support_x[i, :, 0], test.support_y[i, :, 0], "ko", ms=6, label="measured (support)")
        for name, alg in starts.items():
            adapted = {a: b[0] for a, b in alg.adapt(test[i], steps).items()}
            ax.plot(t, alg.f(adapted, t).detach(), "--", label=f"{name}, {steps} steps")
        ax.set_xlabel("time (h)")
        ax.set_ylabel("transformed fraction X")
        ax.grid(alpha=0.3)
        if i == 0:
            ax.legend(fontsize=7)
    fig.suptitle(f"JMAK fits from {family.shots} measurements", y=1.03)
    run.save_figure(fig, "examples")


@experiment("materials-kinetics", "a material system's JMAK kinetics (k, n) from a few measurements: MAML start "
            "vs pooled fit vs guesses", Config)
def materials_kinetics(cfg: Config, run: Run) -> dict:
    """Compare the starts of the two-parameter JMAK law on held-out material systems."""
    family = JMAKKinetics(shots=cfg.shots, query_shots=cfg.query_shots)
    test, (k, n) = family.sample_with_params(cfg.test_tasks, torch.Generator().manual_seed(cfg.seed + 1))

    starts, _ = maml_and_pooled(JMAK, family, cfg, run)
    starts["guess k=1/h, n=1"] = start(JMAK(1.0, 1.0), cfg.inner_lr)
    mid_k = math.sqrt(family.rate[0] * family.rate[1])
    mid_n = sum(family.exponent) / 2
    starts[f"guess k={mid_k:.3f}/h, n={mid_n:g}"] = start(JMAK(mid_k, mid_n), cfg.inner_lr)

    mse = compare(starts, test, cfg.eval_steps)
    n_error, k_error = {}, {}
    for name, alg in starts.items():
        traj = trajectories(alg, test, cfg.eval_steps)
        n_error[name] = curve_result("|n_hat - n|", (traj["log_n"][..., 0].exp() - n[:, None]).abs())
        k_error[name] = curve_result("|k_hat - k| / k", (traj["log_k"][..., 0].exp() / k[:, None] - 1).abs())
    show = sorted({0, 1, cfg.inner_steps, cfg.eval_steps})
    params = {name: {"start k (1/h)": round(float(alg.model.log_k.detach().exp()), 4),
                     "start n": round(float(alg.model.log_n.detach().exp()), 3)} for name, alg in starts.items()}
    rows = [{**r, "metric": "query MSE"} for r in table(mse, show, params)]
    rows += [{**r, "metric": "|n_hat - n|"} for r in table(n_error, show)]
    rows += [{**r, "metric": "|k_hat - k| / k"} for r in table(k_error, show)]
    plot_curves(mse, run, "curves", f"materials kinetics (JMAK) from {cfg.shots} measurements",
                "query MSE of transformed fraction", log=True)
    plot_curves(n_error, run, "exponent_error", "JMAK: identified Avrami exponent", "|n_hat - n|")
    plot_examples({n_: starts[n_] for n_ in ("MAML (order 2)", "pooled fit")}, test, k, n, family,
                  cfg.inner_steps, cfg.examples, run)
    return {"table": rows, "query_mse": {a: r.as_dict() for a, r in mse.items()},
            "n_error": {a: r.as_dict() for a, r in n_error.items()},
            "k_error": {a: r.as_dict() for a, r in k_error.items()}, "start_params": params}
