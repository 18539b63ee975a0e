"""l2o: a learned optimizer (coordinate-wise LSTM, Andrychowicz et al. 2016) against SGD, MAML and Adam.

Claim. On ill-conditioned problems a fixed-rate SGD inner loop (MAML's) is limited by the largest
curvature (rate < 2 / lambda_max), so low-curvature directions barely move in a few steps. A
coordinate-wise LSTM that reads each coordinate's gradient history can learn per-coordinate step sizes
and wins by a margin that grows with the condition number kappa. Adam at its best grid rate does no
better than SGD here (its normalised steps have a size set by the rate, not by the distance to the
optimum, and the noisy gradient keeps them from settling). Where the LSTM does not win: for kappa <= 10
SGD at its best rate reaches the noise floor within the step budget, so at the end there is nothing
left to win (the LSTM only gets there in fewer steps: see the loss after `inner_steps // 4` steps); and
an LSTM trained on one kappa does not transfer: it diverges on a larger kappa and is worse than SGD on
smaller ones.

Part 1, quadratic bowls 1/2 (theta - c)^T A (theta - c) with diagonal A (eigenvalues log-uniform in
[1, kappa]), optima c ~ N(0, I), and structured gradient noise: noisy support targets, so the support
gradient is A (theta - c) + A^(1/2) eps (noise covariance proportional to the curvature, like minibatch
noise); the query loss is the noise-free bowl. Every optimizer starts at 0 and takes `inner_steps` steps;
rates of SGD and Adam are the best of a grid on validation tasks; MAML learns the start with the best
SGD rate; the LSTM (`inner.learned_lstm`, initialised as SGD at that best rate) is meta-trained by
truncated BPTT (`algorithms.L2O`).

Part 2, the sinusoid tasks (MLP 1-40-40-1): here the task family shares structure that a start can
hold and an optimizer cannot, so the learned optimizer from a fixed start loses to MAML; MAML with the
learned optimizer as its inner loop, `MAML(model, inner_opt=learned_lstm(...))`, trains both.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from metagrad.algorithms import MAML
from metagrad.algorithms.l2o import L2O
from metagrad.evaluation import evaluate
from metagrad.experiments import experiment
from metagrad.inner import adam, learned_lstm, sgd
from metagrad.models import MLP
from metagrad.runs import Run
from metagrad.tasks import Sinusoid
from metagrad.tasks.quadratic import Quadratic


@dataclass
class Config:
    dim: int = 10
    kappas: tuple[float, ...] = (1.0, 10.0, 100.0, 1000.0)
    transfer_train_kappa: float = 100.0   # also test the LSTM trained here on the other kappas
    noise: float = 0.3
    inner_steps: int = 20
    unroll: int = 5
    hidden: int = 20
    layers: int = 2
    order: int = 1                        # the paper drops second derivatives
    l2o_iterations: int = 200
    maml_iterations: int = 100
    meta_batch: int = 16
    outer_lr: float = 3e-3
    lr_grid: tuple[float, ...] = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)
    val_tasks: int = 200
    test_tasks: int = 500
    sinusoid: bool = True
    sin_shots: int = 10
    sin_inner_steps: int = 5
    sin_inner_lr: float = 0.01
    sin_hidden: int = 10
    sin_layers: int = 1
    sin_iterations: int = 300
    sin_meta_batch: int = 10
    sin_outer_lr: float = 3e-3
    seed: int = 0


def bowl_family(cfg: Config, kappa: float) -> Quadratic:
    """Diagonal bowls with eigenvalues in [1, kappa], noisy support targets, in float32."""
    return Quadratic(cfg.dim, 0.0, 1.0, (1.0, kappa), rotate=False, noise=cfg.noise, dtype=torch.float32)


def zero_start(dim: int) -> nn.Module:
    """theta = 0: the start every optimizer shares on the bowls (MAML learns its own)."""
    model = nn.Linear(dim, 1, bias=False)
    nn.init.zeros_(model.weight)
    return model


def final_loss(alg, batch, steps: int) -> tuple[float, float, list[float]]:
    """Mean and 95% CI of the query loss after `steps` inner steps, and the mean curve over 0..steps."""
    res = evaluate(alg, batch, steps=steps)
    return res.mean, res.ci95, res.curve


def best_rate(model: nn.Module, make_opt, val, cfg: Config) -> float:
    """The rate of the grid with the lowest mean validation loss after `inner_steps` (diverged: inf)."""
    scores = {}
    for lr in cfg.lr_grid:
        loss = final_loss(MAML(model, inner_opt=make_opt(lr)), val, cfg.inner_steps)[0]
        scores[lr] = loss if loss == loss else float("inf")  # NaN -> inf
    return min(scores, key=scores.get)


def train(alg, tasks, iterations: int, meta_batch: int, outer_lr: float, gen: torch.Generator) -> None:
    """Outer loop with Adam (L2O's meta_step does its own truncations)."""
    opt = torch.optim.Adam(alg.parameters(), lr=outer_lr)
    for _ in range(iterations):
        alg.meta_step(tasks.sample(meta_batch, gen), opt)


def quadratics(cfg: Config, gen: torch.Generator) -> tuple[list[dict], dict]:
    """Part 1: every optimizer on bowls of each condition number."""
    rows, curves, lstms = [], {}, {}
    for kappa in cfg.kappas:
        fam = bowl_family(cfg, kappa)
        val, test = fam.sample(cfg.val_tasks, gen), fam.sample(cfg.test_tasks, gen)
        model = zero_start(cfg.dim)
        lr_sgd = best_rate(model, sgd, val, cfg)
        lr_adam = best_rate(model, adam, val, cfg)
        maml = MAML(zero_start(cfg.dim), inner_lr=lr_sgd, inner_steps=cfg.inner_steps)
        train(maml, fam, cfg.maml_iterations, cfg.meta_batch, cfg.outer_lr, gen)
        lstm = learned_lstm(lr_sgd, cfg.hidden, cfg.layers, seed=cfg.seed)
        l2o = L2O(model, inner_opt=lstm, inner_steps=cfg.inner_steps, unroll=cfg.unroll, order=cfg.order)
        train(l2o, fam, cfg.l2o_iterations, cfg.meta_batch, cfg.outer_lr, gen)
        lstms[kappa] = lstm
        methods = {f"SGD (best rate {lr_sgd:g})": MAML(model, inner_opt=sgd(lr_sgd)),
                   f"MAML (learned start, SGD {lr_sgd:g})": maml,
                   f"Adam (best rate {lr_adam:g})": MAML(model, inner_opt=adam(lr_adam)),
                   "learned LSTM (L2O)": l2o}
        results = {name: final_loss(alg, test, cfg.inner_steps) for name, alg in methods.items()}
        best_hand = min(v[0] for k, v in results.items() if not k.startswith("learned"))
        early = cfg.inner_steps // 4
        for name, (m, ci, curve) in results.items():
            rows.append({"tasks": f"bowls kappa={kappa:g}", "optimizer": name, "query_loss": m, "ci95": ci,
                         "loss / best hand-designed": m / best_hand, "initial_loss": curve[0],
                         f"loss_after_{early}_steps": curve[early]})
            curves[(kappa, name)] = curve
    # Transfer: the LSTM trained at one kappa, tested on the others.
    source = cfg.transfer_train_kappa
    if source in lstms:
        for kappa in cfg.kappas:
            if kappa == source:
                continue
            test = bowl_family(cfg, kappa).sample(cfg.test_tasks, gen)
            m, ci, _ = final_loss(MAML(zero_start(cfg.dim), inner_opt=lstms[source]), test, cfg.inner_steps)
            same = next(r for r in rows
                        if r["tasks"] == f"bowls kappa={kappa:g}" and r["optimizer"].startswith("learned"))
            rows.append({"tasks": f"bowls kappa={kappa:g}", "optimizer": f"learned LSTM trained at kappa={source:g}",
                         "query_loss": m, "ci95": ci,
                         "loss / best hand-designed": m * same["loss / best hand-designed"] / same["query_loss"],
                         "initial_loss": same["initial_loss"]})
    return rows, curves


def sinusoids(cfg: Config, gen: torch.Generator) -> tuple[list[dict], dict]:
    """Part 2: MAML (SGD inner loop), L2O from a fixed start, and MAML with the learned optimizer."""
    tasks = Sinusoid(shots=cfg.sin_shots, query_shots=cfg.sin_shots)
    test = tasks.sample(cfg.test_tasks, gen)

    def mlp() -> nn.Module:
        torch.manual_seed(cfg.seed)
        return MLP((1, 40, 40, 1))

    def lstm():
        return learned_lstm(cfg.sin_inner_lr, cfg.sin_hidden, cfg.sin_layers, seed=cfg.seed)

    steps = cfg.sin_inner_steps
    methods = {
        f"MAML (SGD {cfg.sin_inner_lr:g})": MAML(mlp(), inner_lr=cfg.sin_inner_lr, inner_steps=steps, order=1),
        "learned LSTM from a fixed start (L2O)": L2O(mlp(), inner_opt=lstm(), inner_steps=steps, unroll=steps,
                                                      order=1),
        "MAML with the learned LSTM": MAML(mlp(), inner_steps=steps, order=1, inner_opt=lstm()),
    }
    untrained = final_loss(MAML(mlp(), inner_lr=cfg.sin_inner_lr), test, steps)[0]
    rows, curves = [], {}
    for name, alg in methods.items():
        train(alg, tasks, cfg.sin_iterations, cfg.sin_meta_batch, cfg.sin_outer_lr, gen)
        m, ci, curve = final_loss(alg, test, steps)
        rows.append({"tasks": f"sinusoid K={cfg.sin_shots}", "optimizer": name, "query_loss": m, "ci95": ci,
                     "initial_loss": untrained})
        curves[name] = curve
    best = min(r["query_loss"] for r in rows if not r["optimizer"].startswith(("learned", "MAML with")))
    for r in rows:
        r["loss / best hand-designed"] = r["query_loss"] / best
    return rows, curves


@experiment("l2o", "a learned LSTM optimizer vs SGD/MAML/Adam: wins on ill-conditioned bowls, not on sinusoids "
            "from a fixed start", Config)
def run(cfg: Config, run: Run) -> dict:
    gen = torch.Generator().manual_seed(cfg.seed)
    rows, curves = quadratics(cfg, gen)
    sin_rows, sin_curves = sinusoids(cfg, gen) if cfg.sinusoid else ([], {})

    import matplotlib.pyplot as plt

    n = len(cfg.kappas) + (1 if cfg.sinusoid else 0)
    fig, axes = plt.subplots(1, n, figsize=(4 * n, 3.8))
    for ax, kappa in zip(axes, cfg.kappas):
        for (k, name), curve in curves.items():
            if k == kappa:
                ax.semilogy(curve, label=name)
        ax.set(title=f"bowls, kappa = {kappa:g}", xlabel="inner step", ylabel="query loss")
        ax.legend(fontsize=6)
    if cfg.sinusoid:
        for name, curve in sin_curves.items():
            axes[-1].semilogy(curve, label=name)
        axes[-1].set(title=f"sinusoid, K = {cfg.sin_shots}", xlabel="inner step", ylabel="query MSE")
        axes[-1].legend(fontsize=6)
    run.save_figure(fig, "l2o")
    return {"table": rows + sin_rows}
