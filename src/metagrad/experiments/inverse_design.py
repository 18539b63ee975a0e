"""Inverse design (tasks/inverse_design.py): a generative model meta-learned so that a few steps on a few
known designs for a new target wavelength make it propose new designs that hit that target.

    train the flow (models/generator.py) with MAML, order 2 (exact) and order 1, on the NLL of designs;
        the pooled fit is the same flow fit to the designs of all targets (no inner steps)
    for each of >= 500 held-out targets: adapt from each start on `shots` designs for 0..k steps, draw
        `candidates` designs, report the hit rate (admissible and within 2% of the target) and query NLL
    cost of exactness: alternate order-2 and order-1 meta-steps on the same meta-batch, in this one run,
        and report the median seconds per meta-step and the bytes the autograd graph holds when the
        meta-loss is built (the peak, just before backward; on CPU torch keeps no allocator peak to read)
"""

from __future__ import annotations

import copy
import statistics
import time
import weakref
from dataclasses import asdict, dataclass

import torch
from torch import Tensor
from torch.func import functional_call

from metagrad.algorithms import MAML
from metagrad.evaluation import mean_ci95
from metagrad.experiments import experiment
from metagrad.experiments.starts import compare, maml_and_pooled, plot_curves
from metagrad.models.generator import CouplingFlow
from metagrad.paths import ExecPath
from metagrad.runs import Run
from metagrad.tasks.inverse_design import N_RANGE, InverseDesign, from_scaled, hits


@dataclass
class Config:
    """Hyper-parameters (MAML paper names); `candidates` designs are drawn per task to measure hits."""

    shots: int = 5
    query_shots: int = 50
    hidden: int = 32
    layers: int = 4
    # Small: a fitted density is thin across the target curve, so its NLL is steep (larger rates diverge).
    inner_lr: float = 0.002
    inner_steps: int = 3
    outer_lr: float = 1e-3
    meta_batch: int = 16
    iterations: int = 1500
    eval_steps: int = 10
    eval_tasks: int = 500
    candidates: int = 200
    hit_tolerance: float = 0.02
    timing_reps: int = 10
    seed: int = 0


def nll(log_p: Tensor, target: Tensor) -> Tensor:
    """Negative mean log-likelihood of the designs; the targets are not used by the loss."""
    return -log_p.mean()


@torch.no_grad()
def hit_curve(alg: MAML, test, steps: int, candidates: int, hit_tolerance: float, seed: int) -> Tensor:
    """Fraction of `candidates` generated designs that hit each task's target after 0..steps: `[tasks, steps+1]`."""
    z = torch.randn(len(test), candidates, alg.model.dim, generator=torch.Generator().manual_seed(seed))
    rates = []
    traj = alg.trajectories(test.support, steps)  # {name: [tasks, steps+1, ...]}
    for i in range(len(test)):
        designs = torch.stack([functional_call(alg.model, {n: t[i, k] for n, t in traj.items()}, (z[i],),
                                               {"reverse": True}) for k in range(steps + 1)])
        rates.append(hits(designs, test.support_y[i, 0, 0], hit_tolerance).float().mean(-1))
    return torch.stack(rates)


def graph_bytes(fn) -> tuple[Tensor, int]:
    """`fn()` and the bytes of the distinct storages its autograd graph still holds when it returns."""
    saved: list[weakref.ref] = []

    def pack(t: Tensor) -> Tensor:
        saved.append(weakref.ref(t))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    storages = {}
    for ref in saved:
        t = ref()
        if t is not None:  # tensors saved by graphs already freed (order 1's inner gradients) are gone
            s = t.untyped_storage()
            storages[s.data_ptr()] = s.nbytes()
    return out, sum(storages.values())


def cost_of_order(model: CouplingFlow, cfg: Config, batch) -> list[dict]:
    """Seconds per meta-step (median of `timing_reps`, orders alternated) and graph memory, order 2 vs 1."""
    algs = {o: MAML(copy.deepcopy(model), cfg.inner_lr, cfg.inner_steps, order=o, loss_fn=nll) for o in (2, 1)}
    opts = {o: torch.optim.SGD(a.parameters(), lr=0.0) for o, a in algs.items()}  # lr 0: same point every rep
    times: dict[int, list[float]] = {2: [], 1: []}
    for _ in range(cfg.timing_reps + 1):
        for o in (2, 1):
            t0 = time.perf_counter()
            algs[o].meta_step(batch, opts[o])
            times[o].append(time.perf_counter() - t0)
    rows = []
    for o, alg in algs.items():
        # The whole meta-batch's graph, built task by task (saved-tensor hooks cannot see inside vmap), from
        # the objective itself: meta_loss and meta_step hold one task's graph at a time.
        looped = MAML(alg.model, cfg.inner_lr, cfg.inner_steps, order=o, loss_fn=nll, path="loop")
        _, nbytes = graph_bytes(lambda looped=looped: looped.objective(batch, 0, ExecPath("loop"))[0])
        rows.append({"order": o, "path": alg.exec_path(), "s_per_meta_step": round(statistics.median(times[o][1:]), 4),
                     "graph_MB": round(nbytes / 2**20, 3)})
    return rows


@experiment("inverse-design", "generative model adapted in a few steps to propose coatings for a new target "
            "wavelength: hit rate, and the cost of order 2 vs order 1", Config)
def run(cfg: Config, run: Run) -> dict:
    """Train the starts, compare hit rates and NLL on held-out targets, measure the cost of second order."""
    torch.manual_seed(cfg.seed)
    tasks = InverseDesign(shots=cfg.shots, query_shots=cfg.query_shots)
    test = tasks.sample(cfg.eval_tasks, torch.Generator().manual_seed(cfg.seed + 10_000))
    init = CouplingFlow(2, cfg.hidden, cfg.layers)
    starts, seconds = maml_and_pooled(lambda: copy.deepcopy(init), tasks, cfg, run, loss_fn=nll)
    starts["untrained flow (N(0, I))"] = MAML(copy.deepcopy(init), cfg.inner_lr, cfg.inner_steps, loss_fn=nll)
    nll_results = compare(starts, test, cfg.eval_steps)
    hit = {n: hit_curve(a, test, cfg.eval_steps, cfg.candidates, cfg.hit_tolerance, cfg.seed + 20_000)
           for n, a in starts.items()}
    hit_stats = {n: [mean_ci95(h[:, k]) for k in range(h.shape[1])] for n, h in hit.items()}
    rows = []
    for name in starts:
        r, h = nll_results[name], hit_stats[name]
        rows.append({"start": name, "hit@0": "{:.3f} ± {:.3f}".format(*h[0]),
                     f"hit@{cfg.inner_steps}": "{:.3f} ± {:.3f}".format(*h[cfg.inner_steps]),
                     f"hit@{cfg.eval_steps}": "{:.3f} ± {:.3f}".format(*h[cfg.eval_steps]),
                     f"nll@{cfg.eval_steps}": f"{r.curve[-1]:.3f} ± {r.curve_ci95[-1]:.3f}",
                     "train_s": round(seconds.get(name, 0.0), 1)})
    cost = cost_of_order(starts["MAML (order 2)"].model, cfg, tasks.sample(cfg.meta_batch,
                                                                            torch.Generator().manual_seed(cfg.seed)))
    plot_curves({n: ([m for m, _ in h], [c for _, c in h]) for n, h in hit_stats.items()}, run, "hit_rate",
                f"new target wavelength, {cfg.shots} known designs", "hit rate of generated designs")
    run.save_figure(_samples_plot(starts, test, cfg), "candidates")
    return {"config": asdict(cfg), "table": rows, "cost_of_order": cost,
            "hit_curves": {n: [list(p) for p in h] for n, h in hit_stats.items()},
            "nll": {n: r.as_dict() for n, r in nll_results.items()}}


def _samples_plot(starts: dict[str, MAML], test, cfg: Config):
    """Candidates of each start for one held-out target after `inner_steps` steps, on the target curve."""
    import matplotlib.pyplot as plt

    task = test[0]
    target = float(task.support_y[0, 0, 0])
    fig, axes = plt.subplots(1, len(starts), figsize=(3.2 * len(starts), 3.2), sharex=True, sharey=True)
    z = torch.randn(cfg.candidates, 2, generator=torch.Generator().manual_seed(cfg.seed))
    idx = torch.linspace(*N_RANGE, 100)
    for ax, (name, alg) in zip(axes, starts.items()):
        adapted = {k: v[0] for k, v in alg.adapt(task, cfg.inner_steps).items()}
        with torch.no_grad():
            u = functional_call(alg.model, adapted, (z,), {"reverse": True})
        n, d = from_scaled(u)
        ok = hits(u, target, cfg.hit_tolerance)
        ax.scatter(n[~ok], d[~ok], s=4, c="tab:gray", label="miss")
        ax.scatter(n[ok], d[ok], s=4, c="tab:green", label="hit")
        ax.plot(idx, target / (4 * idx), "k--", lw=1, label="n d = λ*/4")
        sn, sd = from_scaled(task.support_x[0])
        ax.scatter(sn, sd, marker="x", c="r", s=30, label="support")
        ax.set_title(f"{name}\nhit {float(ok.float().mean()):.2f}", fontsize=8)
        ax.set_xlabel("refractive index n")
        ax.set_xlim(1.0, 2.8)
        ax.set_ylim(0, 300)
    axes[0].set_ylabel("thickness d (nm)")
    axes[0].legend(fontsize=6)
    fig.suptitle(f"λ* = {target:.0f} nm, after {cfg.inner_steps} steps", fontsize=9, y=1.06)
    return fig
