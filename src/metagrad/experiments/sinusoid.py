"""Sinusoid regression of the MAML paper (Finn et al. 2017, section 5.1 and appendix), with Meta-SGD.

Claim: a model meta-trained with MAML fits a new sinusoid from K points after ONE gradient step better
than a model pre-trained on all tasks jointly does after TEN fine-tuning steps.

Setup as in the paper: y = A sin(x - phase), A ~ U[0.1, 5], phase ~ U[0, pi], x ~ U[-5, 5]; an MLP
1-40-40-1 with ReLU; K support points; one inner step with inner_lr 0.01 at meta-training; meta_batch
25; Adam with outer_lr 1e-3. The pre-trained baseline minimises the loss on all tasks' points without
adaptation and is fine-tuned with SGD at test time; the paper tunes that step size automatically, here
it is the best of `pretrain_lrs` on 200 validation tasks (never the test tasks). Meta-test: query MSE
after 0..10 steps on 1,000 held-out tasks, mean and 95% CI.

    for algorithm in algorithms:  build (same seed), meta_train, time it
    pretrain: choose the fine-tuning rate on validation tasks
    evaluate every algorithm on the same 1,000 test tasks -> adaptation curves, fitted curves, table
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from metagrad import inner
from metagrad.core import TaskBatch
from metagrad.evaluation import EvalResult, evaluate
from metagrad.experiments import experiment
from metagrad.runs import Run, atomic_write_json
from metagrad.tasks import Sinusoid
from metagrad.train import build, meta_train

# Published query MSE, (K, algorithm, steps) -> value.
MAML_PAPER = {  # Finn et al. 2017, appendix (K=5)
    (5, "maml", 1): 0.67, (5, "maml", 5): 0.38, (5, "maml", 10): 0.35,
    (5, "pretrain", 1): 2.41, (5, "pretrain", 5): 2.23, (5, "pretrain", 10): 2.19,
}
METASGD_PAPER = {  # Li et al. 2017, table 1 (one step)
    (5, "maml", 1): 1.13, (10, "maml", 1): 0.85, (20, "maml", 1): 0.71,
    (5, "metasgd", 1): 0.90, (10, "metasgd", 1): 0.53, (20, "metasgd", 1): 0.31,
}
NAMES = {"maml": "MAML", "pretrain": "pretrained", "metasgd": "Meta-SGD"}


@dataclass
class SinusoidConfig:
    shots: int = 10                 # K: support points per task, at meta-train and meta-test
    query_shots: int = 10           # query points per task at meta-train
    iterations: int = 4000          # SHORT: the paper trains 70,000 (experiment sinusoid-paper)
    meta_batch: int = 25
    inner_lr: float = 0.01
    inner_steps: int = 1
    order: int = 2
    outer_lr: float = 1e-3
    algorithms: tuple[str, ...] = ("maml", "pretrain")
    eval_tasks: int = 1000
    eval_steps: int = 10
    eval_query_shots: int = 100     # more query points than at training: a tighter per-task MSE, same mean
    pretrain_lrs: tuple[float, ...] = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1)
    val_every: int = 1000
    seed: int = 0


@dataclass
class SinusoidPaperConfig(SinusoidConfig):
    shots: int = 5
    iterations: int = 70000
    algorithms: tuple[str, ...] = ("maml", "pretrain", "metasgd")
    val_every: int = 5000


def spec(cfg: SinusoidConfig, algorithm: str) -> dict:
    """How to build `algorithm` for this config (also stored in its checkpoint for `metagrad eval`)."""
    args = {"inner_lr": cfg.inner_lr, "inner_steps": cfg.inner_steps}
    if algorithm != "pretrain":
        args["order"] = cfg.order
    return {"algorithm": algorithm, "algorithm_args": args, "model": "mlp", "model_args": {"sizes": [1, 40, 40, 1]},
            "tasks": "sinusoid", "task_args": {"shots": cfg.shots, "query_shots": cfg.query_shots}}


def choose_finetune_lr(algorithm, cfg: SinusoidConfig) -> float:
    """The fine-tuning step size with the lowest validation MSE after `eval_steps` steps (the paper's tuning)."""
    val = Sinusoid(cfg.shots, cfg.eval_query_shots).sample(200, torch.Generator().manual_seed(cfg.seed + 3))
    scores = {}
    for lr in cfg.pretrain_lrs:
        algorithm.inner_opt = inner.sgd(lr)
        scores[lr] = evaluate(algorithm, val, steps=cfg.eval_steps).mean
    best = min(scores, key=scores.get)
    algorithm.inner_opt, algorithm.inner_lr = inner.sgd(best), best
    return best


def test_tasks(cfg: SinusoidConfig, n: int):
    """The held-out test tasks, the same for every algorithm (their own generator)."""
    return Sinusoid(cfg.shots, cfg.eval_query_shots).sample(n, torch.Generator().manual_seed(cfg.seed + 10_000))


def plot_curves(run: Run, results: dict[str, EvalResult], cfg: SinusoidConfig) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, r in results.items():
        steps = list(range(len(r.curve)))
        lo = [m - c for m, c in zip(r.curve, r.curve_ci95)]
        hi = [m + c for m, c in zip(r.curve, r.curve_ci95)]
        ax.plot(steps, r.curve, marker="o", ms=3, label=NAMES.get(name, name))
        ax.fill_between(steps, lo, hi, alpha=0.25)
    ax.set(xlabel="gradient steps at meta-test", ylabel="query MSE", yscale="log",
           title=f"sinusoid, K={cfg.shots}, {cfg.iterations} iterations, {cfg.eval_tasks} tasks (95% CI)")
    ax.legend()
    run.save_figure(fig, "adaptation_curve")


def plot_fits(run: Run, trained: dict, cfg: SinusoidConfig, n_tasks: int = 3) -> None:
    import matplotlib.pyplot as plt

    tasks = Sinusoid(cfg.shots, 1)
    amp, phase = tasks.sample_params(n_tasks, torch.Generator().manual_seed(cfg.seed + 20_000))
    sx, sy = tasks.points(amp, phase, cfg.shots, torch.Generator().manual_seed(cfg.seed + 20_001))
    grid = torch.linspace(-5, 5, 200).view(1, -1, 1).expand(n_tasks, -1, -1)
    batch = TaskBatch(sx, sy, grid, Sinusoid.function(amp, phase, grid))
    fig, axes = plt.subplots(1, n_tasks, figsize=(4 * n_tasks, 3), sharey=True)
    for i, ax in enumerate(axes):
        ax.plot(grid[i, :, 0], batch.query_y[i, :, 0], "k-", lw=2, label="true")
        ax.plot(sx[i, :, 0], sy[i, :, 0], "k^", label=f"{cfg.shots} support points")
        for color, (name, alg) in zip(("C0", "C1", "C2", "C3"), trained.items()):
            for steps, style in ((0, ":"), (1, "--"), (cfg.eval_steps, "-")):
                with torch.no_grad():
                    pred = alg.predict(alg.adapt(batch[i], steps), grid[i:i + 1], steps)
                ax.plot(grid[i, :, 0], pred[0, :, 0], style, color=color, lw=1,
                        label=f"{NAMES.get(name, name)}, {steps} steps")
        ax.set(xlabel="x", title=f"A={float(amp[i]):.2f}, phase={float(phase[i]):.2f}")
    axes[0].legend(fontsize=6)
    run.save_figure(fig, "fitted_curves")


def table(results: dict[str, EvalResult], cfg: SinusoidConfig, seconds: dict[str, float]) -> list[dict]:
    """Rows: algorithm, K, steps, ours (mean ± 95% CI), the published numbers beside them."""
    rows = []
    for name, r in results.items():
        for steps in (1, 5, 10):
            if steps > cfg.eval_steps:
                continue
            key = (cfg.shots, name, steps)
            rows.append({
                "algorithm": NAMES.get(name, name), "K": cfg.shots, "steps": steps,
                # Learned rates (Meta-SGD) applied for more steps than trained can diverge on some tasks.
                "query MSE (ours, 95% CI)": f"{r.curve[steps]:.3f} ± {r.curve_ci95[steps]:.3f}"
                if math.isfinite(r.curve[steps]) else "diverged (inf/nan on some tasks)",
                "MAML paper": MAML_PAPER.get(key, ""), "Meta-SGD paper": METASGD_PAPER.get(key, ""),
                "iterations": cfg.iterations, "train seconds": round(seconds[name], 1),
            })
    return rows


def run_sinusoid(cfg: SinusoidConfig, run: Run) -> dict:
    trained, seconds, children = {}, {}, {}
    # How the table evaluates each model, kept beside its checkpoint: `metagrad eval runs/sinusoid/maml`
    # reproduces the table's numbers (the same 1,000 tasks, sampled at once, with eval_query_shots points).
    evaluation = {"n_tasks": cfg.eval_tasks, "steps": cfg.eval_steps, "one_batch": True,
                  "task_args": {"query_shots": cfg.eval_query_shots}}
    for name in cfg.algorithms:
        s = spec(cfg, name)
        algorithm, tasks = build(s, seed=cfg.seed)
        children[name] = run.child(name, {**s, "evaluation": evaluation})
        result = meta_train(algorithm, tasks, cfg.iterations, cfg.meta_batch, cfg.outer_lr, run=children[name],
                            seed=cfg.seed, val_tasks=tasks, val_every=cfg.val_every, spec=s, desc=name)
        seconds[name] = result.seconds  # over all sessions of a resumed run
        trained[name] = algorithm

    finetune_lr = choose_finetune_lr(trained["pretrain"], cfg) if "pretrain" in trained else None
    if finetune_lr is not None:  # the baseline is evaluated at the fine-tuning rate chosen on validation tasks
        child = children["pretrain"]
        child.config = {**child.config, "evaluation": {**evaluation, "inner_lr": finetune_lr}}
        atomic_write_json(child.dir / "config.json", child.config)
    test = test_tasks(cfg, cfg.eval_tasks)
    results = {name: evaluate(alg, test, steps=cfg.eval_steps) for name, alg in trained.items()}
    plot_curves(run, results, cfg)
    plot_fits(run, trained, cfg)

    out = {"table": table(results, cfg, seconds), "finetune_lr_pretrain": finetune_lr,
           "curves": {n: r.as_dict() for n, r in results.items()}, "train_seconds": seconds,
           "note": (f"{cfg.iterations} meta-iterations per algorithm (the paper: 70,000); "
                    f"K={cfg.shots}; query MSE on {cfg.eval_tasks} held-out tasks with {cfg.eval_query_shots} "
                    "query points each."
                    + (f" Pretrained baseline fine-tuned with SGD at step size {finetune_lr} (best of "
                       f"{cfg.pretrain_lrs} on 200 validation tasks)." if finetune_lr else ""))}
    if {"maml", "pretrain"} <= set(results):
        m, p = results["maml"], results["pretrain"]
        out["claim"] = {
            "maml_1_step": [m.curve[1], m.curve_ci95[1]],
            "pretrain_10_steps": [p.curve[cfg.eval_steps], p.curve_ci95[cfg.eval_steps]],
            "holds": m.curve[1] + m.curve_ci95[1] < p.curve[cfg.eval_steps] - p.curve_ci95[cfg.eval_steps],
        }
    return out


experiment("sinusoid", "MAML vs pre-trained baseline on sinusoids (short: 4,000 iterations, ~20 s on 2 cores)",
           SinusoidConfig)(run_sinusoid)
experiment("sinusoid-paper", "sinusoid at the paper's 70,000 iterations, K=5 (config key shots), with Meta-SGD",
           SinusoidPaperConfig)(run_sinusoid)
