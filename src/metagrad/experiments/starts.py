"""What the application experiments share: train a start, compare starts by their adaptation curves.

A "start" is a model whose parameters are where adaptation begins, wrapped in an `Algorithm` that
adapts it with SGD at `inner_lr`: the MAML start (meta-trained), the pooled fit
(`metagrad.algorithms.baselines.Pretrain`: the same outer loop on the loss of the un-adapted model over
support and query of all tasks), a zero or random start, a domain guess. Every start is scored by
`metagrad.evaluate` on the same held-out tasks after 0..steps inner steps (mean and 95% CI over tasks).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from metagrad import core
from metagrad.algorithms.base import Algorithm
from metagrad.core import LossFn, TaskBatch
from metagrad.evaluation import EvalResult, evaluate, mean_ci95
from metagrad.runs import Run
from metagrad.tasks.base import TaskDistribution


def seeded(build: Callable[[], nn.Module], seed: int) -> nn.Module:
    """`build()` with torch's default initialisation drawn from `seed` (the global RNG is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def meta_train(alg: Algorithm, tasks: TaskDistribution, iterations: int, meta_batch: int, outer_lr: float,
               generator: torch.Generator, run: Run | None = None, label: str = "maml") -> list[float]:
    """`iterations` outer Adam steps on fresh meta-batches; returns the meta-loss of every iteration.

    Several starts are trained into one run folder, so metrics are logged under `label/` and no checkpoint
    is written (`metagrad.train.meta_train` keeps one checkpoint per run folder).
    """
    opt = torch.optim.Adam(alg.parameters(), lr=outer_lr)
    losses = []
    for it in range(iterations):
        metrics = alg.meta_step(tasks.sample(meta_batch, generator), opt)
        losses.append(metrics["meta_loss"])
        if run is not None and (it % 50 == 0 or it == iterations - 1):
            run.log(it, {f"{label}/{k}": v for k, v in metrics.items()})
    return losses


def start(model: nn.Module, inner_lr: float, loss_fn: LossFn | None = None) -> Algorithm:
    """A fixed start (never trained here) adapted with SGD at `inner_lr`."""
    return Algorithm(model, inner_lr=inner_lr, inner_steps=0, loss_fn=loss_fn)


def compare(starts: dict[str, Algorithm], test: TaskBatch, steps: int) -> dict[str, EvalResult]:
    """Every start's metric after 0..steps inner steps on the same held-out tasks."""
    return {name: evaluate(alg, test, steps=steps) for name, alg in starts.items()}


@torch.no_grad()
def trajectories(alg: Algorithm, batch: TaskBatch, steps: int) -> dict[str, torch.Tensor]:
    """Each task's parameters after 0..steps inner steps: `{name: [tasks, steps + 1, *param.shape]}`."""
    per_task = [core.inner_loop(alg.f, alg.loss_fn, alg.params(), batch.support_x[i], batch.support_y[i],
                                alg.inner_opt, steps, order=0, names=alg.adapt_names) for i in range(len(batch))]
    return {n: torch.stack([torch.stack([p[n] for p in traj]) for traj in per_task]) for n in alg.params()}


def curve_result(metric: str, values: torch.Tensor) -> EvalResult:
    """Any per-task metric after 0..steps steps `[tasks, steps + 1]` as an `EvalResult` (mean, 95% CI per step)."""
    stats = [mean_ci95(values[:, k]) for k in range(values.shape[1])]
    return EvalResult(metric, stats[-1][0], stats[-1][1], values.shape[0], values.shape[1] - 1,
                      [m for m, _ in stats], [c for _, c in stats])


def table(results: dict[str, EvalResult], show: list[int], extra: dict[str, dict] | None = None) -> list[dict]:
    """Rows `{"start", "k=0", "k=1", ...}` with "mean ± 95% CI" at the steps in `show`, plus `extra[start]`."""
    rows = []
    for name, r in results.items():
        scale = 100.0 if r.metric == "accuracy" else 1.0
        row = {"start": name}
        for k in show:
            row[f"k={k}"] = f"{r.curve[k] * scale:.4g} ± {r.curve_ci95[k] * scale:.2g}"
        row.update((extra or {}).get(name, {}))
        rows.append(row)
    return rows


def plot_curves(results: dict[str, EvalResult], run: Run, name: str, title: str, ylabel: str | None = None,
                log: bool = False) -> None:
    """The adaptation curves with their 95% CI bands, saved as `<name>.png` in the run folder."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, r in results.items():
        scale = 100.0 if r.metric == "accuracy" else 1.0
        k = list(range(len(r.curve)))
        m = torch.tensor(r.curve) * scale
        c = torch.tensor(r.curve_ci95) * scale
        ax.plot(k, m, marker="o", ms=3, label=label)
        ax.fill_between(k, m - c, m + c, alpha=0.2)
    ax.set_xlabel("inner steps on the support set")
    r0 = next(iter(results.values()))
    ax.set_ylabel(ylabel or ("query accuracy (%)" if r0.metric == "accuracy" else "query MSE"))
    if log:
        ax.set_yscale("log")
    ax.set_title(f"{title}\n(mean and 95% CI over {r0.n_tasks} held-out tasks)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))  # outside: curves often meet
    run.save_figure(fig, name)
