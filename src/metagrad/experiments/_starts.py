"""Pieces shared by the application experiments (materials_property, inverse_design, continual_learning,
fairness): train a start, evaluate starts on the same held-out tasks, plot their adaptation curves.

A "start" is an `Algorithm` whose model parameters are the point adaptation begins from: the MAML
start (meta-trained), the pooled fit (the same loop with `inner_steps=0`: the loss at the start itself,
averaged over tasks) and a random start (the network as initialised, before any training).
"""

from __future__ import annotations

import torch

from metagrad.algorithms.base import Algorithm
from metagrad.core import TaskBatch
from metagrad.evaluation import EvalResult, evaluate
from metagrad.runs import Run
from metagrad.tasks.base import TaskDistribution
from metagrad.train import meta_train


def train(
    alg: Algorithm, tasks: TaskDistribution, iterations: int, meta_batch: int, outer_lr: float, seed: int,
    run: Run | None = None, tag: str = "",
) -> float:
    """`metagrad.train.meta_train` without a checkpoint (several starts share one run folder); logs the last
    metrics under `tag` and returns the seconds taken."""
    result = meta_train(alg, tasks, iterations, meta_batch, outer_lr, run=None, seed=seed, progress=False,
                        log_every=max(1, min(50, iterations)))
    if run is not None:
        run.log(result.iteration, {f"{tag}/{k}": v for k, v in result.metrics.items()})
    return result.seconds


def compare(starts: dict[str, Algorithm], test: TaskBatch, steps: int) -> dict[str, EvalResult]:
    """Each start's query metric after 0..steps inner steps on the same held-out tasks."""
    return {name: evaluate(alg, test, steps=steps) for name, alg in starts.items()}


def plot_curves(curves: dict[str, tuple[list[float], list[float]]], xlabel: str, ylabel: str, title: str,
                log_y: bool = False, x: list[int] | None = None):
    """One line per start with its 95% CI band: `curves[name] = (means, ci95)` at `x` (default 0..k)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for name, (mean, ci) in curves.items():
        k = list(range(len(mean))) if x is None else x
        m, c = torch.tensor(mean), torch.tensor(ci)
        ax.plot(k, m, marker="o", ms=3, label=name)
        ax.fill_between(k, m - c, m + c, alpha=0.2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if log_y:
        ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps and class counts
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def loss_rows(results: dict[str, EvalResult], shown: list[int]) -> list[dict]:
    """Table rows: each start's query loss (mean ± 95% CI) after the inner-step counts in `shown`."""
    rows = []
    for name, r in results.items():
        row = {"start": name}
        for k in shown:
            row[f"loss@{k}"] = f"{r.curve[k]:.4f} ± {r.curve_ci95[k]:.4f}"
        rows.append(row)
    return rows
