"""What the application experiments share: train the starts, compare them by their adaptation curves.

A "start" is a model whose parameters are where adaptation begins, wrapped in an `Algorithm` that
adapts it with SGD at `inner_lr`: the MAML start (meta-trained), the pooled fit
(`metagrad.algorithms.baselines.Pretrain`: the same outer loop on the loss of the un-adapted model over
support and query of all tasks), a zero or random start, a domain guess. Every trained start runs the
library's loop (`metagrad.train.meta_train`) on the same meta-batches (one seed), logging into the
experiment's run folder under its own label. Every start is scored by `metagrad.evaluate` on the same
held-out tasks after 0..steps inner steps (mean and 95% CI over tasks).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from metagrad.algorithms.base import Algorithm
from metagrad.algorithms.baselines import Pretrain
from metagrad.algorithms.maml import MAML
from metagrad.core import LossFn, TaskBatch
from metagrad.evaluation import EvalResult, evaluate, mean_ci95
from metagrad.runs import Run
from metagrad.tasks.base import TaskDistribution
from metagrad.train import TrainResult, meta_train


def seeded(build: Callable[[], nn.Module], seed: int) -> nn.Module:
    """`build()` with torch's default initialisation drawn from `seed` (the global RNG is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


class _Labelled:
    """A shared run folder as `metagrad.train.meta_train` sees it for one start: metrics under `label/`, no
    checkpoint (the trainer keeps one checkpoint per folder, and several starts are trained into one)."""

    resume = False

    def __init__(self, run: Run, label: str) -> None:
        self.run, self.label, self.dir = run, label, run.dir

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(step, {f"{self.label}/{k}": v for k, v in metrics.items()})

    def save_checkpoint(self, state: dict) -> None:
        pass


def train(alg: Algorithm, tasks: TaskDistribution, iterations: int, meta_batch: int, outer_lr: float, seed: int,
          run: Run | None = None, label: str = "maml") -> TrainResult:
    """`metagrad.train.meta_train` (Adam, meta-batches from `seed`) logging into `run` under `label/`, no checkpoint."""
    return meta_train(alg, tasks, iterations, meta_batch, outer_lr, run=_Labelled(run, label) if run else None,
                      seed=seed, progress=False, log_every=max(1, min(50, iterations)))


def maml_and_pooled(build: Callable[[], nn.Module], tasks: TaskDistribution, cfg: Any, run: Run | None = None,
                    label: str = "", loss_fn: LossFn | None = None) -> tuple[dict[str, Algorithm], dict[str, float]]:
    """The trained starts "MAML (order 2)", "MAML (order 1)" and "pooled fit" (`Pretrain`), each from `build()`,
    and each one's training seconds; `cfg` gives inner_lr, inner_steps, iterations, meta_batch, outer_lr, seed."""
    algs = {f"MAML (order {order})": MAML(build(), cfg.inner_lr, cfg.inner_steps, order=order, loss_fn=loss_fn)
            for order in (2, 1)}
    algs["pooled fit"] = Pretrain(build(), inner_lr=cfg.inner_lr, loss_fn=loss_fn)
    tags = dict(zip(algs, ("maml2", "maml1", "pooled")))
    seconds = {name: train(alg, tasks, cfg.iterations, cfg.meta_batch, cfg.outer_lr, cfg.seed, run,
                           label + tags[name]).seconds for name, alg in algs.items()}
    return algs, seconds


def start(model: nn.Module, inner_lr: float, loss_fn: LossFn | None = None) -> Algorithm:
    """A fixed start (never trained here) adapted with SGD at `inner_lr`."""
    return Algorithm(model, inner_lr=inner_lr, inner_steps=0, loss_fn=loss_fn)


def compare(starts: dict[str, Algorithm], test: TaskBatch, steps: int) -> dict[str, EvalResult]:
    """Every start's metric after 0..steps inner steps on the same held-out tasks."""
    return {name: evaluate(alg, test, steps=steps) for name, alg in starts.items()}


@torch.no_grad()
def trajectories(alg: Algorithm, batch: TaskBatch, steps: int) -> dict[str, torch.Tensor]:
    """Each task's parameters after 0..steps inner steps: `{name: [tasks, steps + 1, *param.shape]}`."""
    return alg.trajectories(batch.support, steps)


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


def plot_curves(curves: dict[str, EvalResult | tuple[list[float], list[float]]], run: Run, name: str, title: str,
                ylabel: str | None = None, xlabel: str = "inner steps on the support set", log: bool = False,
                x: list[int] | None = None) -> None:
    """One line per start with its 95% CI band, saved as `<name>.png` in the run folder.

    `curves[start]` is an `EvalResult` (its curve over 0..steps; accuracy in %) or `(means, ci95)` at `x`.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, r in curves.items():
        mean, ci = (r.curve, r.curve_ci95) if isinstance(r, EvalResult) else r
        scale = 100.0 if isinstance(r, EvalResult) and r.metric == "accuracy" else 1.0
        k = list(range(len(mean))) if x is None else x
        m, c = torch.tensor(mean) * scale, torch.tensor(ci) * scale
        ax.plot(k, m, marker="o", ms=3, label=label)
        ax.fill_between(k, m - c, m + c, alpha=0.2)
    ax.set_xlabel(xlabel)
    r0 = next(iter(curves.values()))
    if isinstance(r0, EvalResult):
        ylabel = ylabel or ("query accuracy (%)" if r0.metric == "accuracy" else "query MSE")
        title = f"{title}\n(mean and 95% CI over {r0.n_tasks} held-out tasks)"
    ax.set_ylabel(ylabel or "")
    if log:
        ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps and class counts
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))  # outside: curves often meet
    run.save_figure(fig, name)
