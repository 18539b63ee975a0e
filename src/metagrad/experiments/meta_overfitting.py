"""meta-overfitting: a meta-learner trained on a narrow task family fails on shifted families.

Claim. Meta-training learns the training family's prior: its centre (the start) and, when the inner
rates are learned (Meta-SGD: `inner.per_parameter_lr`), its width (how far adaptation may move: a narrow
family teaches small rates, a strong prior). On linear-Gaussian tasks w ~ N(0, tau^2 I) we meta-train
on widths tau in `train_widths` and test on families of the same width shifted to mean delta.
The gap (meta-test minus meta-train-family query loss) grows with the shift, and faster the narrower
the training family: the narrow meta-learner is confidently wrong. MAML with a fixed inner rate learns
only the centre, so its gap depends much less on the width: the narrowness is memorised in the rates.

The diagnostic, in any run: `metagrad.train.meta_train(..., val_tasks=..., val_every=N)` logs the
query loss on fixed meta-train tasks and on held-out tasks every N iterations; here the held-out tasks
are the family shifted by `val_shift`: for the narrowest family the logged gap grows during training
as the learned rates shrink (for the wider ones it falls as the rates grow), while MAML's stays flat.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from metagrad.algorithms import MAML
from metagrad.core import named_params
from metagrad.evaluation import evaluate
from metagrad.experiments import experiment
from metagrad.inner import per_parameter_lr
from metagrad.runs import Run
from metagrad.tasks.quadratic import LinearGaussian
from metagrad.train import meta_train


@dataclass
class Config:
    dim: int = 5
    shots: int = 5
    query_shots: int = 20
    noise: float = 0.5
    train_widths: tuple[float, ...] = (0.1, 0.3, 1.0)
    shifts: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0)
    val_shift: float = 1.0
    inner_lr: float = 0.1        # fixed rate of MAML; initial rate of Meta-SGD
    inner_steps: int = 2
    meta_batch: int = 25
    outer_lr: float = 0.003
    iterations: int = 400
    val_every: int = 20
    test_tasks: int = 1000
    seed: int = 0


def family(cfg: Config, width: float, shift: float) -> LinearGaussian:
    """Linear-Gaussian tasks w ~ N(shift, width^2 I)."""
    return LinearGaussian(cfg.dim, cfg.shots, cfg.query_shots, shift, width, cfg.noise)


def make(cfg: Config, learned_rates: bool, seed: int) -> MAML:
    """MAML with a fixed inner rate, or Meta-SGD (MAML with learned per-parameter rates)."""
    torch.manual_seed(seed)
    model = nn.Linear(cfg.dim, 1, bias=False).double()
    nn.init.zeros_(model.weight)
    opt = per_parameter_lr(named_params(model), cfg.inner_lr) if learned_rates else None
    return MAML(model, inner_lr=cfg.inner_lr, inner_steps=cfg.inner_steps, inner_opt=opt)


@experiment("meta-overfitting", "meta-train on a narrow task family, test on shifted ones: the gap grows with "
            "narrowness and shift", Config)
def run(cfg: Config, run: Run) -> dict:
    table, logs = [], {}
    for learned in (True, False):
        name = "Meta-SGD" if learned else "MAML"
        for width in cfg.train_widths:
            alg = make(cfg, learned, cfg.seed)
            sub = Run(run.dir / f"{name}_width{width:g}", {"width": width, "algorithm": name})
            meta_train(alg, family(cfg, width, 0.0), cfg.iterations, cfg.meta_batch, cfg.outer_lr, run=sub,
                       seed=cfg.seed, val_tasks=family(cfg, width, cfg.val_shift), val_every=cfg.val_every,
                       val_n_tasks=200, log_every=cfg.val_every, progress=False, desc=f"{name} width {width:g}")
            logs[(name, width)] = [m for m in sub.metrics() if "gap" in m]
            rate = float(torch.cat([p.detach().flatten() for p in alg.inner_meta_params.values()]).mean()) if learned \
                else cfg.inner_lr
            base = None
            for shift in cfg.shifts:
                gen = torch.Generator().manual_seed(cfg.seed + 1000)
                res = evaluate(alg, family(cfg, width, shift), cfg.test_tasks, generator=gen)
                base = res.mean if base is None else base
                table.append({"algorithm": name, "train_width": width, "test_shift": shift,
                              "mean_inner_rate": rate, "query_mse": res.mean, "ci95": res.ci95,
                              "gap": res.mean - base})

    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, style in (("Meta-SGD", "-"), ("MAML", "--")):
        for i, width in enumerate(cfg.train_widths):
            rows = [r for r in table if r["algorithm"] == name and r["train_width"] == width]
            axes[0].errorbar([r["test_shift"] for r in rows], [r["gap"] for r in rows],
                             yerr=[r["ci95"] for r in rows], ls=style, color=f"C{i}", marker="o",
                             label=f"{name}, train width {width:g}")
            log = logs[(name, width)]
            axes[1].plot([m["step"] for m in log], [m["gap"] for m in log], ls=style, color=f"C{i}", marker=".",
                         label=f"{name}, train width {width:g}")
    axes[0].set(xlabel="test family shift delta", ylabel="query MSE gap to the training family",
                title="meta-test gap vs shift (95% CI of the shifted loss)")
    axes[1].set(xlabel="meta-iteration", ylabel=f"logged gap (held-out shift {cfg.val_shift:g})",
                title="the trainer's meta-train vs meta-test gap over training")
    axes[0].legend(fontsize=7)
    run.save_figure(fig, "meta_overfitting")
    return {"table": table}
