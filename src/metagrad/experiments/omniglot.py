"""Few-shot Omniglot (Finn et al. 2017, section 5.2, table 1): N-way K-shot with the paper's CNN and settings.

Claim: MAML meta-trained on 1,200 characters (x 4 rotations) classifies new characters from one or five
drawings: 98.7% (5-way 1-shot), 99.9% (5-way 5-shot), 95.8% (20-way 1-shot), 98.9% (20-way 5-shot);
MAML++ (Antoniou et al. 2019): 99.47% (5-way 1-shot), 97.65% (20-way 1-shot).

One experiment per cell of table 1, `omniglot-{5,20}w{1,5}s`, each with `algorithm` as a config key
(maml, fomaml, reptile, anil, metasgd, maml++). Defaults are the paper's: the Conv4 with stride-2
convolutions and 64 filters; 5-way: inner_lr 0.4, 1 inner step at meta-train and 3 at meta-test,
meta_batch 32; 20-way: inner_lr 0.1, 5 steps and 5, meta_batch 16; Adam with outer_lr 1e-3;
60,000 iterations (`budget_minutes` stops earlier, cleanly); K query drawings per class at
meta-train and meta-test, as in the reference code (`query_shots`; `eval_query_shots` sets meta-test's and
validation's apart; `train_ways` meta-trains on tasks of more classes, the head's first `ways` outputs
testing on `ways`). Meta-test: 600 episodes on the 423 held-out characters, mean accuracy, 95% CI and the
adaptation curve.

`omniglot-5w1s-maml++` and `omniglot-20w1s-maml++` take the MAML++ code's Omniglot settings
(experiment_config/omniglot_maml++-* of HowToTrainYourMAMLPytorch): Conv4 with max-pooling, 5 inner
steps at meta-train and meta-test, learned per-layer per-step inner rates starting at 0.1, the
multi-step loss for the first 10 (5-way) or 20 (20-way) epochs of 500 iterations, second order from
the start, Adam 1e-3 cosine-annealed to 1e-5 over 100 (5-way, meta-batch 8) or 250 (20-way,
meta-batch 16) epochs, one query drawing per class; per-step batch-norm weights and biases (`per_step_bn`:
set k for params after k inner updates, learned in the outer loop only) and, as an option, per-step
running statistics (`running_stats`; each batch's own statistics normalise at meta-test, as in the
MAML++ code, unless `bn_statistics="running"`), and the ensemble of the five best validation checkpoints
at test time (`ensemble`: mean of their class probabilities), reported beside the last model.

    tasks = Omniglot(ways, shots, split="train"); test = Omniglot(..., split="test")
    algorithm = build(spec)                                  # Conv4 + MAML (or another algorithm)
    meta_train(algorithm, tasks, iterations, meta_batch, outer_lr, run, val_tasks=Omniglot(split="val"))
    evaluate(algorithm, test, 600 episodes, eval_steps)      -> table beside the published numbers
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from metagrad.algorithms import MAML_PLUS_PLUS
from metagrad.algorithms.base import Algorithm
from metagrad.evaluation import EvalResult, evaluate, evaluate_ensemble, rotation_views, shift_views, tta_views
from metagrad.experiments import experiment
from metagrad.runs import Run
from metagrad.tasks.omniglot import Omniglot
from metagrad.train import build, meta_train, narrowed

# Published mean accuracy (%), (algorithm, ways, shots) -> value.
PUBLISHED = {
    ("maml", 5, 1): ("MAML paper, table 1", 98.7), ("maml", 5, 5): ("MAML paper, table 1", 99.9),
    ("maml", 20, 1): ("MAML paper, table 1", 95.8), ("maml", 20, 5): ("MAML paper, table 1", 98.9),
    ("maml++", 5, 1): ("MAML++ paper", 99.47), ("maml++", 20, 1): ("MAML++ paper", 97.65),
}
FIRST_ORDER = ("fomaml", "reptile")  # fixed at order 1: no `order` argument


@dataclass
class OmniglotConfig:
    ways: int = 5
    shots: int = 1
    query_shots: int = 1            # per class; the reference code uses K (= shots)
    # Per class at validation and meta-test; None: query_shots. More query drawings at meta-train with the
    # papers' test protocol (K per class) unchanged: query_shots=3 eval_query_shots=1.
    eval_query_shots: int | None = None
    # Classes per meta-training task; None: ways. Tested on `ways`-way tasks with the first `ways` outputs of the
    # head (higher-way training, as Prototypical Networks train 5-way Omniglot on 60-way tasks).
    train_ways: int | None = None
    algorithm: str = "maml"         # maml | fomaml | reptile | anil | metasgd | maml++
    order: int = 2                  # for maml, anil, metasgd, maml++ (fomaml and reptile are first order)
    inner_lr: float = 0.4
    inner_steps: int = 1            # at meta-train
    eval_steps: int = 3             # at meta-test
    meta_batch: int = 32
    outer_lr: float = 1e-3
    iterations: int = 60000
    budget_minutes: float = 0.0     # wall-time limit of meta-training; 0: none
    protocol: str = "maml"          # maml: 1,200 random characters train / 423 test; lake: background / evaluation
    rotations: bool = True          # each character x 4 rotations is a class
    val_characters: int = 100       # held out of the meta-training characters for validation curves
    hidden: int = 64
    pool: str = "stride"            # stride: the MAML paper's Omniglot net; max: 2x2 max-pooling (MAML++'s)
    lr_schedule: str = "constant"   # constant | cosine (to min_outer_lr over the iterations, MAML++)
    min_outer_lr: float = 0.0
    lslr: bool | None = None        # maml/maml++/anil: learned per-layer per-step inner rates; None: the default
    multi_step_loss_iters: int | None = None  # maml/maml++/anil; None: the algorithm's default
    order_anneal_iters: int | None = None     # maml/maml++/anil; None: the algorithm's default
    zero_head: bool = False         # maml, fomaml, anil, maml++: each adaptation starts with the head at zero
    per_step_bn: bool = False       # MAML++: batch-norm weights and biases per inner step (outer loop only)
    running_stats: bool = False     # MAML++: per-step running statistics (the loop path: no vmap, no parallel)
    bn_statistics: str = "batch"    # meta-test normalisation: batch (each task's own, as MAML) | running
    # (running: chance level, 5.75%, in the 20-way ablation of benchmarks/README.md: the inner rates were learned
    # under batch statistics, and the MAML++ code itself always normalises with the batch's)
    ensemble: int = 0               # MAML++: test the ensemble of this many best validation checkpoints too
    # Test-time augmentation, also tested on the same episodes: the mean prediction over the query images shifted
    # by up to `tta_shift` pixels along each axis (1: 9 views), after adapting on the support images in every
    # shift of up to `support_shift` pixels (1: 9 copies of each); 0 and 0: none. `tta_rotations` views of each
    # whole task (2: also turned upside down; 4: every quarter-turn), each adapted and predicted on its own: the
    # MAML split's classes include every rotation of a character, so a turned task is a task of the same kind.
    tta_shift: int = 0
    support_shift: int = 0
    tta_rotations: int = 1
    eval_tasks: int = 600
    curve_steps: int = 10           # the adaptation curve is measured over 0..max(curve_steps, eval_steps) steps
    val_every: int = 1000           # 0: no validation during training
    val_tasks: int = 100
    log_every: int = 50
    checkpoint_every: int = 500
    data: str = ""                  # folder holding omniglot/ (or the omniglot folder); "": $METAGRAD_DATA
    device: str = "cpu"
    path: str = "auto"              # execution path (core.choose_path): auto times loop and vmap; parallel, +bf16
    seed: int = 0


@dataclass
class Omniglot5w5sConfig(OmniglotConfig):
    shots: int = 5
    query_shots: int = 5


@dataclass
class Omniglot20w1sConfig(OmniglotConfig):
    ways: int = 20
    inner_lr: float = 0.1
    inner_steps: int = 5
    eval_steps: int = 5
    meta_batch: int = 16


@dataclass
class Omniglot20w5sConfig(Omniglot20w1sConfig):
    shots: int = 5
    query_shots: int = 5


@dataclass
class OmniglotMAMLPlusPlusConfig(OmniglotConfig):
    algorithm: str = "maml++"
    pool: str = "max"
    inner_lr: float = 0.1           # the initial value of every learned per-layer per-step rate
    inner_steps: int = 5
    eval_steps: int = 5
    meta_batch: int = 8
    iterations: int = 50000         # 100 epochs of 500 iterations
    multi_step_loss_iters: int | None = 5000  # 10 epochs
    order_anneal_iters: int | None = 0        # first_order_to_second_order_epoch = -1: second order throughout
    lr_schedule: str = "cosine"
    min_outer_lr: float = 1e-5
    per_step_bn: bool = True
    # Off: in the MAML++ code the per-step running statistics never change an output (its batch norm always
    # normalises with batch statistics), and keeping them rules out vmap and parallel. On: `running_stats=true`
    # (with `bn_statistics=running` they normalise at meta-test).
    running_stats: bool = False
    ensemble: int = 5


@dataclass
class Omniglot20wMAMLPlusPlusConfig(OmniglotMAMLPlusPlusConfig):
    ways: int = 20
    meta_batch: int = 16
    iterations: int = 125000        # 250 epochs
    multi_step_loss_iters: int | None = 10000  # 20 epochs


def task_args(cfg: OmniglotConfig) -> dict:
    """Arguments of the meta-training task family for this config (stored in the checkpoint's spec)."""
    return {"ways": cfg.train_ways or cfg.ways, "shots": cfg.shots, "query_shots": cfg.query_shots,
            "protocol": cfg.protocol, "rotations": cfg.rotations, "val_characters": cfg.val_characters,
            "root": cfg.data or None, "device": cfg.device}


def spec(cfg: OmniglotConfig) -> dict:
    """How to build the algorithm, model and tasks of this config (also what `metagrad eval` rebuilds)."""
    args = {"inner_lr": cfg.inner_lr, "inner_steps": cfg.inner_steps, "eval_steps": cfg.eval_steps, "path": cfg.path}
    if cfg.algorithm not in FIRST_ORDER:
        args["order"] = cfg.order
    for key in ("lslr", "multi_step_loss_iters", "order_anneal_iters"):
        if getattr(cfg, key) is not None:
            args[key] = getattr(cfg, key)
    if cfg.zero_head:
        args["zero_head"] = True
    model_args = {"ways": cfg.train_ways or cfg.ways, "hidden": cfg.hidden, "pool": cfg.pool}
    if cfg.per_step_bn:  # one set per number of inner updates, 0..inner_steps (more at meta-test reuse the last)
        model_args.update(per_step_bn=cfg.inner_steps + 1, running_stats=cfg.running_stats)
    return {"algorithm": cfg.algorithm, "algorithm_args": args, "model": "conv4", "model_args": model_args,
            "tasks": "omniglot", "task_args": task_args(cfg)}


def fitted_schedule(cfg: OmniglotConfig, iterations: int, validations: int = 0) -> dict:
    """The config changes that scale `cfg`'s schedule to `iterations`: its length (the cosine's), the multi-step
    loss's and the first-order warm-up's shares of it, and `validations` evenly spaced validations (0: as set)."""
    # A wall-time budget holds far fewer iterations than the papers' schedules (125,000 for 20-way MAML++): left
    # at their absolute counts, an hour's run would have the multi-step loss throughout, a cosine that never
    # leaves its start, and a warm-up that never ends.
    out: dict = {"iterations": iterations}
    for key in ("multi_step_loss_iters", "order_anneal_iters"):
        value = getattr(cfg, key)
        if value is None and cfg.algorithm == "maml++":  # None: the algorithm's default
            value = MAML_PLUS_PLUS[key]
        if value:
            out[key] = max(1, round(value * iterations / cfg.iterations))
    if validations:
        out["val_every"] = max(1, iterations // validations)
    return out


def eval_task_args(cfg: OmniglotConfig) -> dict:
    """Arguments of the validation and meta-test task families: task_args with `ways` (not train_ways) and
    eval_query_shots where set."""
    args = {**task_args(cfg), "ways": cfg.ways}
    if cfg.eval_query_shots is not None:
        args["query_shots"] = cfg.eval_query_shots
    return args


def test_tasks(cfg: OmniglotConfig) -> Omniglot:
    """The meta-test characters of the protocol (never seen in training or validation)."""
    return Omniglot(split="test", **eval_task_args(cfg))


def val_tasks(cfg: OmniglotConfig) -> Omniglot:
    """The validation characters, in tasks of the meta-trained classifier's classes (train_ways)."""
    return Omniglot(split="val", **{**eval_task_args(cfg), "ways": cfg.train_ways or cfg.ways})


def tested(algorithm: Algorithm, cfg: OmniglotConfig) -> Algorithm:
    """The algorithm meta-test runs: `algorithm`, or trained on more classes (train_ways), its `ways`-way copy."""
    return narrowed(algorithm, spec(cfg), cfg.ways) if (cfg.train_ways or cfg.ways) != cfg.ways else algorithm


def plot_curve(run: Run, result: EvalResult, cfg: OmniglotConfig) -> None:
    import matplotlib.pyplot as plt

    steps = list(range(len(result.curve)))
    mean = [100 * m for m in result.curve]
    ci = [100 * c for c in result.curve_ci95]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(steps, mean, marker="o", ms=3, label=cfg.algorithm)
    ax.fill_between(steps, [m - c for m, c in zip(mean, ci)], [m + c for m, c in zip(mean, ci)], alpha=0.25)
    ax.axvline(cfg.eval_steps, color="grey", ls=":", lw=1, label=f"eval_steps={cfg.eval_steps}")
    ax.set(xlabel="gradient steps at meta-test", ylabel="query accuracy (%)",
           title=f"Omniglot {cfg.ways}-way {cfg.shots}-shot, {result.n_tasks} test episodes (95% CI)")
    ax.legend()
    run.save_figure(fig, "adaptation_curve")


def check(cfg: OmniglotConfig) -> None:
    """Clear errors for settings that do not go together."""
    if cfg.bn_statistics not in ("batch", "running"):
        raise ValueError(f"bn_statistics must be 'batch' or 'running', got {cfg.bn_statistics!r}")
    if cfg.running_stats and not cfg.per_step_bn:
        raise ValueError("running_stats keeps per-step running statistics: it needs per_step_bn=true")
    if cfg.bn_statistics == "running" and not cfg.running_stats:
        raise ValueError("bn_statistics='running' normalises with the running statistics: it needs running_stats=true")
    if cfg.train_ways is not None and cfg.train_ways < cfg.ways:
        raise ValueError(f"train_ways={cfg.train_ways} is fewer than the {cfg.ways} classes of a test task: the "
                         "head must have an output for each")
    for key in ("tta_shift", "support_shift"):
        if getattr(cfg, key) < 0:
            raise ValueError(f"{key} is a number of pixels, >= 0; got {getattr(cfg, key)}")
    rotation_views(cfg.tta_rotations)  # 1, 2 or 4: fails here, before training, not at the test
    if cfg.tta_rotations > 1 and not cfg.rotations:
        raise ValueError("tta_rotations turns whole tasks, which training saw only with rotations=true (each "
                         "character in 4 rotations is a class)")
    if cfg.ensemble and not (cfg.val_every > 0 and cfg.val_characters > 0):
        raise ValueError("ensemble ranks checkpoints by validation accuracy: it needs val_every > 0 and "
                         "val_characters > 0")


def tta(cfg: OmniglotConfig) -> dict[str, int]:
    """The config's test-time augmentation settings by name; empty where it has none."""
    views = {"tta_shift": cfg.tta_shift, "support_shift": cfg.support_shift, "tta_rotations": cfg.tta_rotations}
    return views if cfg.tta_shift or cfg.support_shift or cfg.tta_rotations > 1 else {}


def tta_label(cfg: OmniglotConfig) -> str:
    """Test-time augmentation in words, for a table row."""
    parts = []
    if cfg.tta_rotations > 1:
        parts.append(f"each task in {cfg.tta_rotations} rotations" if cfg.tta_rotations == 4
                     else "each task as it is and upside down")
    if cfg.support_shift:
        parts.append(f"the support images in {len(shift_views(cfg.support_shift))} shifts of up to "
                     f"{cfg.support_shift} px")
    if cfg.tta_shift:
        parts.append(f"the mean over {len(shift_views(cfg.tta_shift))} query views shifted up to {cfg.tta_shift} px")
    return "test-time augmentation: " + ", ".join(parts)


def ensemble_members(run: Run, device: str) -> list:
    """The algorithms of the run's kept best validation checkpoints, best first."""
    from metagrad.runs import read_checkpoint
    from metagrad.train import load_checkpoint

    members = []
    for path in run.best_paths():
        state = read_checkpoint(path)
        algorithm, _ = build(state["spec"], seed=int(state.get("seed", 0)))
        load_checkpoint(algorithm, state)
        members.append(algorithm.to(device))
    return members


def run_omniglot(cfg: OmniglotConfig, run: Run) -> dict:
    """Meta-train on the training characters, evaluate on 600 episodes of the test characters."""
    check(cfg)
    s = spec(cfg)
    algorithm, tasks = build(s, seed=cfg.seed)
    test = test_tasks(cfg)  # before training, as `metagrad train`: a bad test setting fails now, not hours later
    val = val_tasks(cfg) if cfg.val_every > 0 and cfg.val_characters > 0 else None
    trained = meta_train(
        algorithm, tasks, cfg.iterations, cfg.meta_batch, cfg.outer_lr, run=run, seed=cfg.seed,
        val_tasks=val, val_every=cfg.val_every, val_n_tasks=cfg.val_tasks, log_every=cfg.log_every,
        checkpoint_every=cfg.checkpoint_every, time_budget=cfg.budget_minutes * 60 or None,
        device=cfg.device, spec=s, desc=f"{cfg.algorithm} omniglot {cfg.ways}w{cfg.shots}s",
        lr_schedule=cfg.lr_schedule, min_outer_lr=cfg.min_outer_lr, keep_best=cfg.ensemble,
    )
    if cfg.bn_statistics == "running":
        algorithm.eval()  # per-step batch norm normalises with its running statistics
    # Test episodes from a generator no training stage uses (training: seed, seed+1, seed+2).
    result = evaluate(tested(algorithm, cfg), test, cfg.eval_tasks, max(cfg.curve_steps, cfg.eval_steps),
                      torch.Generator().manual_seed(cfg.seed + 10_000), progress=True)  # minutes on a CPU
    acc, ci = result.curve[cfg.eval_steps], result.curve_ci95[cfg.eval_steps]
    plot_curve(run, result, cfg)
    source, published = PUBLISHED.get((cfg.algorithm, cfg.ways, cfg.shots), ("", ""))
    row = {
        "algorithm": cfg.algorithm, "task": f"{cfg.ways}-way {cfg.shots}-shot", "protocol": cfg.protocol,
        "iterations": trained.iteration, "train minutes": round(trained.seconds / 60, 1),
        "test accuracy % (ours, 95% CI)": f"{100 * acc:.2f} ± {100 * ci:.2f}", "published %": published,
        "source": source, "eval steps": cfg.eval_steps, "episodes": result.n_tasks,
    }
    full = type(cfg)().iterations  # the experiment's default: the published run's length
    note = "" if trained.iteration >= full else (
        f"Trained {trained.iteration} of the published run's {full:,} iterations ({trained.stopped}); the "
        "published number is for full training.")
    table, out = [row], {}
    members = [tested(m, cfg) for m in ensemble_members(run, cfg.device)] if cfg.ensemble else []
    if cfg.ensemble and not members:
        note = (note + " " if note else "") + "No validation point was reached, so no ensemble was tested."
    if members:
        for m in members:
            m.train(cfg.bn_statistics != "running")
        # The same test episodes as the single model (the same generator seed).
        ens = evaluate_ensemble(members, test, cfg.eval_tasks,
                                torch.Generator().manual_seed(cfg.seed + 10_000))
        table.append({**row, "algorithm": f"{cfg.algorithm}, ensemble of {len(members)} best validation checkpoints",
                      "test accuracy % (ours, 95% CI)": f"{100 * ens.mean:.2f} ± {100 * ens.ci95:.2f}"})
        out = {"ensemble": {**ens.as_dict(), "iterations": [e["iteration"] for e in run.best()]}}
    augmentation = tta(cfg)
    if augmentation:
        augmented = evaluate_ensemble([tested(algorithm, cfg)], test, cfg.eval_tasks,
                                      torch.Generator().manual_seed(cfg.seed + 10_000),
                                      **tta_views(cfg.tta_shift, cfg.support_shift, cfg.tta_rotations))
        table.append({**row, "algorithm": f"{cfg.algorithm}, {tta_label(cfg)}",
                      "test accuracy % (ours, 95% CI)": f"{100 * augmented.mean:.2f} ± {100 * augmented.ci95:.2f}"})
        out["tta"] = {**augmented.as_dict(), **augmentation}
    return {"accuracy": acc, "ci95": ci, "iterations": trained.iteration, "stopped": trained.stopped,
            "train_seconds": trained.seconds, "evaluation": result.as_dict(), "spec": s, "table": table,
            "note": note, **out}


experiment("omniglot-5w1s", "Omniglot 5-way 1-shot (MAML table 1: 98.7%); --set algorithm=...",
           OmniglotConfig)(run_omniglot)
experiment("omniglot-5w5s", "Omniglot 5-way 5-shot (MAML table 1: 99.9%)", Omniglot5w5sConfig)(run_omniglot)
experiment("omniglot-20w1s", "Omniglot 20-way 1-shot (MAML table 1: 95.8%)", Omniglot20w1sConfig)(run_omniglot)
experiment("omniglot-20w5s", "Omniglot 20-way 5-shot (MAML table 1: 98.9%)", Omniglot20w5sConfig)(run_omniglot)
experiment("omniglot-5w1s-maml++", "Omniglot 5-way 1-shot with the MAML++ code's settings (MAML++: 99.47%)",
           OmniglotMAMLPlusPlusConfig)(run_omniglot)
experiment("omniglot-20w1s-maml++", "Omniglot 20-way 1-shot with the MAML++ code's settings (MAML++: 97.65%)",
           Omniglot20wMAMLPlusPlusConfig)(run_omniglot)
