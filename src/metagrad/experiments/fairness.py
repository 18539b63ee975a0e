"""Protected groups as tasks (tasks/fairness.py): a start meta-learned to be easy to de-bias.

    loss(theta; set) = BCE + lam * soft equalised-odds gap between the group and the reference   (metrics.py)
    train the MAML start on this loss (order 2 and 1), and the pooled fits (plain BCE; BCE + lam * gap)
    for each of >= 500 held-out groups: from each start take 0..k steps of that loss on the support
        (`shots` records of the group and as many of the reference group); on the query report
        accuracy, equalised-odds gap and demographic-parity difference of the decision 1[p > 0.5]
Starts: MAML (order 2, order 1), pooled fit (BCE), pooled fair fit (BCE + lam * gap), random init.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from metagrad import metrics
from metagrad.algorithms import MAML
from metagrad.evaluation import mean_ci95
from metagrad.experiments import experiment
from metagrad.experiments.starts import plot_curves, train
from metagrad.models import MLP
from metagrad.runs import Run
from metagrad.tasks.fairness import Fairness


@dataclass
class Config:
    """Hyper-parameters (MAML paper names); `lam` weighs the fairness term of the loss."""

    shots: int = 20
    query_shots: int = 500
    hidden: int = 32
    lam: float = 0.5
    inner_lr: float = 0.1
    inner_steps: int = 3
    outer_lr: float = 1e-3
    meta_batch: int = 16
    iterations: int = 1500
    eval_steps: int = 5
    eval_tasks: int = 500
    seed: int = 0


def fair_loss(lam: float):
    """BCE on the labels plus `lam` times the soft equalised-odds gap; out `[n, 1]` logits, target `[n, 2]` = (y, a)."""
    def loss(out: Tensor, target: Tensor) -> Tensor:
        y, a = target[..., 0], target[..., 1]
        bce = F.binary_cross_entropy_with_logits(out[..., 0], y)
        return bce + lam * metrics.soft_equalized_odds_gap(torch.sigmoid(out[..., 0]), y, a) if lam else bce

    return loss


@torch.no_grad()
def fairness_curves(alg: MAML, test, steps: int) -> dict[str, Tensor]:
    """Query accuracy, equalised-odds gap and demographic-parity difference after 0..steps: each `[tasks, steps+1]`."""
    out: dict[str, list[Tensor]] = {"accuracy": [], "eo_gap": [], "dp_diff": []}
    # The algorithm's own adapter: an ANIL start adapts its head only, as in its meta-training.
    traj = alg.trajectories(test.support, steps)  # {name: [tasks, steps+1, ...]}
    for i in range(len(test)):
        qx, qy = test.query_x[i], test.query_y[i]
        pred = torch.stack([(alg.f({n: t[i, k] for n, t in traj.items()}, qx)[:, 0] > 0).double()
                            for k in range(steps + 1)])  # [steps+1, query]
        y, a = qy[:, 0].expand_as(pred), qy[:, 1].expand_as(pred)
        out["accuracy"].append(metrics.accuracy(pred, y))
        out["eo_gap"].append(metrics.equalized_odds_gap(pred, y, a))
        out["dp_diff"].append(metrics.demographic_parity_difference(pred, a))
    return {k: torch.stack(v) for k, v in out.items()}


@experiment("fairness", "protected groups as tasks: equalised-odds gap after a few de-biasing steps, MAML vs pooled",
            Config)
def run(cfg: Config, run: Run) -> dict:
    """Train the starts, then compare accuracy and fairness after 0..k de-biasing steps on held-out groups."""
    torch.manual_seed(cfg.seed)
    tasks = Fairness(shots=cfg.shots, query_shots=cfg.query_shots)
    train_tasks = Fairness(shots=cfg.shots, query_shots=50)
    test = tasks.sample(cfg.eval_tasks, torch.Generator().manual_seed(cfg.seed + 10_000))
    init = MLP((3, cfg.hidden, cfg.hidden, 1))
    fair = fair_loss(cfg.lam)
    trained = {}
    for name, order, steps, lam in (("MAML (order 2)", 2, cfg.inner_steps, cfg.lam),
                                    ("MAML (order 1)", 1, cfg.inner_steps, cfg.lam),
                                    ("pooled fit (BCE)", 2, 0, 0.0), ("pooled fair fit", 2, 0, cfg.lam)):
        alg = MAML(copy.deepcopy(init), cfg.inner_lr, steps, order=order, loss_fn=fair_loss(lam))
        train(alg, train_tasks, cfg.iterations, cfg.meta_batch, cfg.outer_lr,
              cfg.seed + 1, run, name)
        trained[name] = alg.model
    trained["random init"] = copy.deepcopy(init)
    # Every start is adapted with the same de-biasing steps: gradient descent on the fair loss.
    curves = {name: fairness_curves(MAML(model, cfg.inner_lr, cfg.eval_steps, loss_fn=fair), test, cfg.eval_steps)
              for name, model in trained.items()}
    stats = {name: {m: [mean_ci95(v[:, k]) for k in range(v.shape[1])] for m, v in c.items()}
             for name, c in curves.items()}
    # Paired over the same held-out groups: how much worse each start ends than the MAML start.
    ref = curves["MAML (order 2)"]
    paired = {name: {m: mean_ci95(sign * (c[m][:, -1] - ref[m][:, -1]))
                     for m, sign in (("eo_gap", 1.0), ("accuracy", -1.0))}
              for name, c in curves.items() if name != "MAML (order 2)"}
    rows = []
    for name, s in stats.items():
        row = {"start": name}
        for k in sorted({0, cfg.inner_steps, cfg.eval_steps}):
            for m in ("accuracy", "eo_gap", "dp_diff"):
                row[f"{m}@{k}"] = "{:.3f} ± {:.3f}".format(*s[m][k])
        if name in paired:
            row["eo_gap_excess_vs_MAML"] = "{:+.3f} ± {:.3f}".format(*paired[name]["eo_gap"])
        rows.append(row)
    title = f"new group: {cfg.shots} records (+ {cfg.shots} reference)"
    for m, label in (("eo_gap", "equalised-odds gap"), ("accuracy", "accuracy")):
        curves_m = {n: ([a for a, _ in s[m]], [c for _, c in s[m]]) for n, s in stats.items()}
        plot_curves(curves_m, run, m, title, f"query {label}", "de-biasing steps")
    return {"config": asdict(cfg), "table": rows, "paired_vs_maml": paired,
            "curves": {n: {m: [list(p) for p in v] for m, v in s.items()} for n, s in stats.items()}}
