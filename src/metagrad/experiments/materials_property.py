"""Few-shot band-gap prediction for a new alloy family (tasks/materials_property.py).

    train the MAML start (order 2 and order 1) and the pooled fit on families sampled from the prior
    for each of >= 500 held-out families: adapt from each start on `shots` measurements for 0..k steps,
        report the query MSE (eV^2), mean and 95% CI over families
Starts: MAML (order 2), first-order MAML, the pooled fit (one network for all families), random init.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import torch

from metagrad.algorithms import MAML
from metagrad.experiments import experiment
from metagrad.experiments.starts import compare, maml_and_pooled, plot_curves, table
from metagrad.models import MLP
from metagrad.runs import Run
from metagrad.tasks.materials_property import MaterialsProperty, band_gap


@dataclass
class Config:
    """Hyper-parameters (MAML paper names)."""

    shots: int = 5
    query_shots: int = 20
    hidden: int = 40
    inner_lr: float = 0.05
    inner_steps: int = 3
    outer_lr: float = 1e-3
    meta_batch: int = 16
    iterations: int = 1500
    eval_steps: int = 10
    eval_tasks: int = 500
    seed: int = 0


@experiment("materials-property", "band gap of a new alloy family from 5 measurements: MAML vs pooled vs random",
            Config)
def run(cfg: Config, run: Run) -> dict:
    """Train the starts, compare them on held-out alloy families, plot the curves and one fitted family."""
    torch.manual_seed(cfg.seed)
    tasks = MaterialsProperty(shots=cfg.shots, query_shots=cfg.query_shots)
    test = tasks.sample(cfg.eval_tasks, torch.Generator().manual_seed(cfg.seed + 10_000))
    init = MLP((3, cfg.hidden, cfg.hidden, 1))
    starts, seconds = maml_and_pooled(lambda: copy.deepcopy(init), tasks, cfg, run)
    starts["random init"] = MAML(copy.deepcopy(init), cfg.inner_lr, cfg.inner_steps)
    results = compare(starts, test, cfg.eval_steps)
    shown = sorted({0, 1, cfg.inner_steps, cfg.eval_steps})
    rows = table(results, shown)
    for row in rows:
        row["train_s"] = round(seconds.get(row["start"], 0.0), 1)
    plot_curves(results, run, "curves", f"new alloy family, {cfg.shots} measurements", "query MSE (eV$^2$)",
                log=True)
    # The test batch's first draw from its generator is the families' laws: the truth to plot.
    law = tasks.sample_laws(cfg.eval_tasks, torch.Generator().manual_seed(cfg.seed + 10_000))
    run.save_figure(_fitted_example(starts, test, {k: v[:1] for k, v in law.items()}, cfg), "fitted_family")
    return {"config": asdict(cfg), "table": rows, "eval": {n: r.as_dict() for n, r in results.items()}}


def _fitted_example(starts: dict[str, MAML], test, law: dict[str, torch.Tensor], cfg: Config):
    """Band gap against composition (T = 300 K, P = 0) of one held-out family after `inner_steps` steps."""
    import matplotlib.pyplot as plt

    task = test[0]
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    xs = torch.linspace(0, 1, 101)
    grid = torch.stack([xs, torch.full_like(xs, 300 / 600), torch.zeros_like(xs)], -1)[None]
    truth = band_gap(law, xs[None], torch.full((1, 101), 300.0), torch.zeros(1, 101))[0]
    ax.plot(xs, truth, "k--", lw=1.5, label="true law")
    for name, alg in starts.items():
        adapted = alg.adapt(task, cfg.inner_steps)
        with torch.no_grad():
            ax.plot(xs, alg.predict(adapted, grid)[0, :, 0], label=name)
    ax.scatter(task.support_x[0, :, 0], task.support_y[0, :, 0], c="k", s=15, zorder=5,
               label="support (any T, P)")
    ax.set_xlabel("composition x")
    ax.set_ylabel("band gap at 300 K, 0 GPa (eV)")
    ax.set_title(f"one held-out family after {cfg.inner_steps} steps")
    ax.legend(fontsize=7)
    return fig
