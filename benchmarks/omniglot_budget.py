"""Omniglot accuracy within a wall-time budget: metagrad's MAML against learn2learn's and higher's.

The question a user with one machine and one hour asks: how accurate a 5-way 1-shot (and 20-way
1-shot) Omniglot model does each library give me in that time? Every implementation trains the same
MAML (the paper's Conv4 with stride-2 convolutions, exact second order, the paper's inner_lr,
inner_steps and meta_batch, Adam with outer_lr 1e-3) from the same initial weights on the same
sequence of task batches from `metagrad.tasks.Omniglot` (MAML protocol, training characters); only
the meta-gradient computation differs (the peers' step functions of benchmarks/speed.py). Only the
time spent in meta-iterations counts against the budget. At `--evals` evenly spaced points of the
budget the model is evaluated, by the same code for everyone (`metagrad.evaluate` on the same
`--eval-tasks` episodes of the 423 held-out characters, `eval_steps` inner steps): accuracy after
15, 30, 45, 60 minutes with the default budget. Each evaluation also measures the adaptation curve of the
same episodes to `--curve-steps` steps (10, as the MAML reference code tests Omniglot): printed and in --json.

Peers are used where they import (they live in .venv-bench, built by `make bench-deps`); missing
ones are named and skipped, so the script always runs ours (unless `--no-ours`: the peers alone):

    python benchmarks/omniglot_budget.py                                # 60 min per cell: ~6 h with both peers
    .venv-bench/bin/python benchmarks/omniglot_budget.py --minutes 10 --tasks 5w1s
    python benchmarks/omniglot_budget.py --minutes 1 --eval-tasks 100   # a smoke run

`--recipe paper|maml++` trains ours with an experiment's documented config on metagrad's own trainer
instead of the peers' step: `omniglot-CELL` (the paper's settings) or `omniglot-CELL-maml++` (max-pool
Conv4, 5 inner steps, learned per-layer per-step rates, multi-step loss, per-step batch norm, cosine-
annealed outer rate), changed with `--set KEY=VALUE` as `metagrad run` takes them. A schedule (a cosine, the
multi-step loss, a first-order warm-up) is scaled to the iterations that fit the budget, as in
benchmarks/maml_pp_ablation.py (`experiments.omniglot.fitted_schedule`; the iterations: timed on 20 of a
throwaway run before the budget starts, or `--schedule-iterations`); what `--set` names stays as set. With
`ensemble=K` the model is validated every `val_every` iterations (10 times over a fitted schedule; outside the
budget) and the last point also tests the ensemble of the K best validation checkpoints. With `tta_shift=S`
(and `support_shift=S`) every point is also tested with test-time augmentation on the same episodes: the mean
prediction over the query images shifted by up to S pixels (after adapting on every such shift of the support
images); with `tta_rotations=2` (or 4) the mean over each whole task as it is and turned upside down (or by every
quarter-turn), each adapted on its own. The peers still run the paper's MAML; each gets `--threads` threads:

    .venv-bench/bin/python benchmarks/omniglot_budget.py --tasks 5w1s --minutes 30 --recipe paper \
        --set lr_schedule=cosine --set min_outer_lr=1e-5 --set ensemble=5 --set val_every=250 --path vmap \
        --peers learn2learn --eval-tasks 1000 --data ../shared/data --json runs/budget-5w1s-30.json

`--peers learn2learn-anil` is learn2learn's ANIL as its example writes it (the body once per task and set,
`l2l.algorithms.MAML` around the head), evaluated as ANIL, beside ours with `--set algorithm=anil`:

    .venv-bench/bin/python benchmarks/omniglot_budget.py --tasks 20w1s --minutes 60 --recipe paper \
        --set algorithm=anil --path vmap --peers learn2learn-anil --side-by-side --data ../shared/data

`--inner-lr` gives every implementation one inner rate in place of the paper's (ours: the recipe's `inner_lr`;
`--set inner_lr=` changes ours alone), e.g. ANIL at 20-way with the 5-way rate, 0.4, beside learn2learn's:

    .venv-bench/bin/python benchmarks/omniglot_budget.py --tasks 20w1s --minutes 10 --recipe paper \
        --set algorithm=anil --inner-lr 0.4 --path vmap --peers learn2learn-anil --side-by-side --data ../shared/data

`--val-characters 0` trains every implementation on all 1,200 meta-training characters instead of the MAML
reference code's 1,100 (it holds the other 100 out for validation); the 423 test characters stay the same:

    .venv-bench/bin/python benchmarks/omniglot_budget.py --tasks 5w1s --minutes 30 --recipe paper --val-characters 0 \
        --set lr_schedule=cosine --set min_outer_lr=1e-5 --set outer_lr=3e-3 --set lslr=true --set val_every=0 \
        --schedule-iterations 10000 --path vmap --threads 2 --peers learn2learn --outer-lr 3e-3 --eval-tasks 1000 \
        --data ../shared/data

`--set train_ways=10` meta-trains ours on 10-way tasks and tests it, as every row, on 5-way ones with the first
5 outputs of its head (higher-way training; `metagrad.train.narrowed`); validation (for an ensemble) is 10-way.

`--side-by-side` runs the implementations of a task at the same time, each in its own process pinned
to its own core with one thread: the same hardware for each, and half the wall time on 2 cores:

    .venv-bench/bin/python benchmarks/omniglot_budget.py --peers learn2learn --side-by-side --json runs/budget.json
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import multiprocessing
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch
from speed import PEER_STEPS, import_learn2learn, ours_step
from torch import nn

from metagrad import TaskBatch, distributed, experiments
from metagrad.algorithms import ANIL, MAML
from metagrad.algorithms.base import Algorithm
from metagrad.evaluation import evaluate, evaluate_ensemble, tta_views
from metagrad.experiments import omniglot as experiment
from metagrad.models import Conv4
from metagrad.tasks.omniglot import Omniglot
from metagrad.train import build, train_step

# The MAML paper's settings per cell: inner_lr, inner_steps (train), eval_steps, meta_batch.
CELLS = {"5w1s": (5, 1, 0.4, 1, 3, 32), "20w1s": (20, 1, 0.1, 5, 5, 16)}
PUBLISHED = {"5w1s": 98.7, "20w1s": 95.8}  # MAML paper, table 1, after 60,000 iterations
PEERS = ("learn2learn", "higher", "learn2learn-anil")  # the last: learn2learn's ANIL, beside `--set algorithm=anil`
DEFAULT_PEERS = ("learn2learn", "higher")  # their MAML: the paper's algorithm
RECIPES = {"paper": "omniglot-{cell}", "maml++": "omniglot-{cell}-maml++"}  # ours: an experiment's config
PROBE = 20  # iterations of a throwaway run timed to fit a schedule to the budget
VALIDATIONS = 10  # with an ensemble: validations spread over a fitted schedule, its checkpoints' candidates
VAL_CHARACTERS = experiment.OmniglotConfig.val_characters  # the MAML reference code's validation characters


def learn2learn_anil_step(model: Conv4, loss_fn: Callable, inner_lr: float, steps: int, order: int) -> Callable:
    """learn2learn's ANIL as its example (examples/vision/anil_fc100.py) writes it: the body once per task and set,
    `l2l.algorithms.MAML` around the head; the body is Conv4's forward up to the head."""
    head = import_learn2learn().algorithms.MAML(model.head, lr=inner_lr, first_order=order == 1)

    def body(x: torch.Tensor) -> torch.Tensor:
        return model.features(x).mean(dim=(2, 3))

    def step(batch: TaskBatch) -> None:
        for i in range(len(batch)):
            learner = head.clone()
            support, query = body(batch.support_x[i]), body(batch.query_x[i])
            for _ in range(steps):
                learner.adapt(loss_fn(learner(support), batch.support_y[i]))
            (loss_fn(learner(query), batch.query_y[i]) / len(batch)).backward()

    return step


STEPS = {**PEER_STEPS, "learn2learn-anil": learn2learn_anil_step}


def available(peer: str) -> str | None:
    """None if the peer can be used here, else why not."""
    try:
        if peer.startswith("learn2learn"):
            import_learn2learn()
        else:
            __import__(peer)
        return None
    except Exception as err:  # an ImportError, or a broken build of the peer
        return f"{type(err).__name__}: {err}"


def probe_iterations(cfg: experiment.OmniglotConfig, args: argparse.Namespace) -> int:
    """How many iterations of `cfg` fit the budget: the median time of PROBE iterations of a throwaway run."""
    algorithm, tasks = build(experiment.spec(cfg), seed=args.seed)
    algorithm.to(args.device)
    optimizer = torch.optim.Adam(algorithm.parameters(), lr=cfg.outer_lr)
    gen = torch.Generator().manual_seed(args.seed)
    times = [timed_step(algorithm, tasks.sample(cfg.meta_batch, gen), optimizer, it, cfg.iterations, cfg, args.device)
             for it in range(PROBE)]
    if hasattr(algorithm, "close"):
        algorithm.close()
    return max(PROBE, int(args.minutes * 60 / per_iteration(times)))


def timed_step(algorithm: Algorithm, batch: TaskBatch, optimizer: torch.optim.Optimizer, iteration: int,
               horizon: int, cfg: experiment.OmniglotConfig, device: str) -> float:
    """Seconds of one meta-training step of `cfg`'s schedule (the batch moved to `device` first, untimed)."""
    batch = batch.to(device)
    t0 = time.perf_counter()
    train_step(algorithm, batch, optimizer, iteration, horizon, cfg.outer_lr, cfg.lr_schedule, cfg.min_outer_lr)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def per_iteration(times: list[float]) -> float:
    """The median seconds of the first PROBE steps, past their warm-up quarter."""
    return statistics.median(times[PROBE // 4:PROBE])


def recipe_config(cell: str, args: argparse.Namespace) -> tuple[experiment.OmniglotConfig, int]:
    """The recipe's config for `cell` with --set applied and its schedule fitted to the budget; the schedule's
    length (0: nothing depends on one)."""
    sets = dict(args.set)
    # The driver's own options enter the config as overrides, so the recipe's config is the one value; --set wins.
    driver = {"path": args.path, "data": args.data, "device": args.device, "seed": args.seed,
              "curve_steps": args.curve_steps, "eval_tasks": args.eval_tasks, "val_characters": args.val_characters}
    if args.inner_lr is not None:
        driver["inner_lr"] = args.inner_lr
    overrides = {**driver, **sets}
    cfg = experiments.get(RECIPES[args.recipe].format(cell=cell)).make_config(overrides)
    experiment.check(cfg)
    # The schedule (the cosine, the multi-step loss's and the warm-up's shares, the ensemble's validations) is
    # scaled to the iterations that fit the budget; what --set names stays as set.
    horizon = args.schedule_iterations or int(sets.get("iterations", 0))
    validations = VALIDATIONS if cfg.ensemble and "val_every" not in sets else 0
    scheduled = set(experiment.fitted_schedule(cfg, 1, validations)) - {"iterations"} - set(sets)
    if not horizon and (cfg.lr_schedule == "cosine" or scheduled):
        horizon = probe_iterations(cfg, args)
    if horizon:
        fitted = experiment.fitted_schedule(cfg, horizon, validations)
        cfg = dataclasses.replace(cfg, **{k: v for k, v in fitted.items() if k not in sets or k == "iterations"})
        print(f"  metagrad {args.recipe} {cell}: scheduled over {horizon} iterations ("
              + ", ".join(f"{k}={getattr(cfg, k)}" for k in ("lr_schedule", "multi_step_loss_iters",
                                                             "order_anneal_iters", "val_every")) + ")", flush=True)
    return cfg, horizon


def driver_options(args: argparse.Namespace, sets: dict | None = None) -> list[tuple[str, object]]:
    """The driver's options a row's label names: those changed from the paper's, unless --set names them too."""
    changed = [("inner_lr", args.inner_lr)] if args.inner_lr is not None else []
    changed += [("val_characters", args.val_characters)] if args.val_characters != VAL_CHARACTERS else []
    return [(k, v) for k, v in changed if k not in (sets or {})]


def train_recipe(cell: str, args: argparse.Namespace) -> dict:
    """Meta-train ours with a documented recipe (an experiment's config) for the budget; evaluate at evenly spaced
    points of it, and the ensemble of the best validation checkpoints at the last."""
    cfg, horizon = recipe_config(cell, args)
    algorithm, tasks = build(experiment.spec(cfg), seed=args.seed)
    algorithm.to(args.device)
    test = experiment.test_tasks(cfg)
    augmentation = experiment.tta(cfg)  # test-time augmentation's settings; empty: none
    # The ensemble's candidates are ranked on meta_train's fixed validation tasks; without one none are drawn.
    fixed_val = experiment.val_tasks(cfg).sample(
        cfg.val_tasks, torch.Generator().manual_seed(args.seed + 1)) if cfg.ensemble else None
    optimizer = torch.optim.Adam(algorithm.parameters(), lr=cfg.outer_lr)
    gen = torch.Generator().manual_seed(args.seed)
    budget = args.minutes * 60
    marks = [budget * (k + 1) / args.evals for k in range(args.evals)]
    trained, iterations, points, curves, times, best = 0.0, 0, [], [], [], []
    while marks:
        # No horizon: nothing depends on one (a constant rate). Past a horizon: the cosine's floor.
        times.append(timed_step(algorithm, tasks.sample(cfg.meta_batch, gen), optimizer, iterations,
                                horizon or sys.maxsize, cfg, args.device))
        trained += times[-1]
        iterations += 1
        if iterations == PROBE:
            print(f"  metagrad {args.recipe} {cell}: {per_iteration(times):.3f} s per iteration", flush=True)
        if cfg.ensemble and iterations % cfg.val_every == 0:
            on_val = evaluate(algorithm, fixed_val).mean
            best = sorted(best + [(on_val, iterations, copy.deepcopy(algorithm.state_dict()))],
                          key=lambda b: (-b[0], b[1]))[: cfg.ensemble]
        if trained >= marks[0]:
            marks.pop(0)
            episodes = torch.Generator().manual_seed(args.seed + 10_000)
            point, curve = evaluated(experiment.tested(algorithm, cfg), test, cfg.eval_steps, cfg.curve_steps,
                                     cfg.eval_tasks, episodes, trained, iterations, f"metagrad {args.recipe} {cell}")
            if augmentation:  # the same episodes again, with test-time augmentation
                tta = evaluate_ensemble([experiment.tested(algorithm, cfg)], test, cfg.eval_tasks,
                                        torch.Generator().manual_seed(args.seed + 10_000),
                                        **tta_views(cfg.tta_shift, cfg.support_shift, cfg.tta_rotations))
                curve["tta"] = {"mean": tta.mean, "ci95": tta.ci95, **augmentation}
                print(f"  metagrad {args.recipe} {cell}: {experiment.tta_label(cfg)}: {100 * tta.mean:.2f} ± "
                      f"{100 * tta.ci95:.2f}%", flush=True)
            points.append(point)
            curves.append(curve)
    named = driver_options(args, dict(args.set))
    out = {"impl": f"metagrad ({args.recipe}{''.join(f', {k}={v}' for k, v in [*named, *args.set])})", "cell": cell,
           "points": points, "curves": curves, "schedule_iterations": horizon}
    if best:
        members, on_loop = [], dataclasses.replace(cfg, path="loop")
        for _, _, state in best:  # members run on the loop: forked workers are the trained algorithm's own
            member, _ = build(experiment.spec(on_loop), seed=args.seed)
            member.load_state_dict(state)
            member.to(args.device)
            members.append(experiment.tested(member, on_loop).train())  # narrowed, it stays on the loop
        ens = evaluate_ensemble(members, test, cfg.eval_tasks, torch.Generator().manual_seed(args.seed + 10_000))
        out["ensemble"] = {"iterations": [b[1] for b in best], "val": [b[0] for b in best],
                           "mean": ens.mean, "ci95": ens.ci95}
        print(f"  metagrad {args.recipe} {cell}: ensemble of the {len(best)} best validation checkpoints "
              f"(iterations {[b[1] for b in best]}): {100 * ens.mean:.2f} ± {100 * ens.ci95:.2f}%", flush=True)
    if hasattr(algorithm, "close"):
        algorithm.close()
    return out


def train_and_evaluate(impl: str, cell: str, args: argparse.Namespace) -> dict:
    """Meta-train with `impl` for the budget; evaluate at evenly spaced points of it."""
    if impl == "metagrad" and args.recipe:
        return train_recipe(cell, args)
    ways, shots, inner_lr, inner_steps, eval_steps, meta_batch = CELLS[cell]
    inner_lr = inner_lr if args.inner_lr is None else args.inner_lr
    task_args = dict(ways=ways, shots=shots, query_shots=shots, val_characters=args.val_characters,
                     root=args.data or None, device=args.device)
    tasks, test = Omniglot(**task_args), Omniglot(split="test", **task_args)
    torch.manual_seed(args.seed)
    model = Conv4(ways, 1, 64, pool="stride").to(args.device)
    loss_fn = nn.functional.cross_entropy
    if impl == "metagrad":
        step = ours_step(model, loss_fn, inner_lr, inner_steps, 2, args.path)
    else:
        step = STEPS[impl](model, loss_fn, inner_lr, inner_steps, 2)
    # The evaluator shares the model's parameters: the same protocol whatever trained them (ANIL's for ANIL).
    evaluator = (ANIL if impl.endswith("-anil") else MAML)(model, inner_lr=inner_lr, inner_steps=inner_steps,
                                                           loss_fn=loss_fn, eval_steps=eval_steps)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.outer_lr)
    gen = torch.Generator().manual_seed(args.seed)
    budget = args.minutes * 60
    marks = [budget * (k + 1) / args.evals for k in range(args.evals)]
    trained, iterations, points, curves = 0.0, 0, [], []
    while marks:
        batch = tasks.sample(meta_batch, gen).to(args.device)
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        step(batch)
        optimizer.step()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        trained += time.perf_counter() - t0
        iterations += 1
        if trained >= marks[0]:
            marks.pop(0)
            episodes = torch.Generator().manual_seed(args.seed + 10_000)  # the same test episodes for everyone
            point, curve = evaluated(evaluator, test, eval_steps, args.curve_steps, args.eval_tasks, episodes,
                                     trained, iterations, f"{impl:12s} {cell}")
            points.append(point)
            curves.append(curve)
    if args.path.startswith("parallel"):
        distributed.shutdown()
    changed = driver_options(args)
    label = f"{impl} ({', '.join(f'{k}={v}' for k, v in changed)})" if changed else impl
    return {"impl": label, "cell": cell, "points": points, "curves": curves}


def evaluated(algorithm: Algorithm, test: Omniglot, eval_steps: int, curve_steps: int, eval_tasks: int,
              episodes: torch.Generator, trained: float, iterations: int, label: str) -> tuple[tuple, dict]:
    """One evaluation point, (seconds, iterations, mean, ci95) after `eval_steps` inner steps, and the adaptation
    curve of the same episodes over 0..max(eval_steps, curve_steps) steps."""
    r = evaluate(algorithm, test, eval_tasks, max(eval_steps, curve_steps), episodes)
    mean, ci95 = r.curve[eval_steps], r.curve_ci95[eval_steps]
    curve = {"iterations": iterations, "eval_steps": eval_steps, "accuracy": r.curve, "ci95": r.curve_ci95}
    more = f"; after {r.steps} steps {100 * r.mean:.2f} ± {100 * r.ci95:.2f}%" if r.steps > eval_steps else ""
    print(f"  {label}: {trained / 60:6.1f} min, {iterations:6d} iterations, test accuracy {100 * mean:.2f} ± "
          f"{100 * ci95:.2f}% after {eval_steps} steps{more}", flush=True)
    return (trained, iterations, mean, ci95), curve


def pinned(core: int, impl: str, cell: str, args: argparse.Namespace) -> dict:
    """train_and_evaluate in this process, pinned to one core with one thread."""
    os.sched_setaffinity(0, {core})
    torch.set_num_threads(1)
    return train_and_evaluate(impl, cell, args) | {"core": core, "threads": 1}


def side_by_side(impls: list[str], cell: str, args: argparse.Namespace) -> list[dict]:
    """Every implementation of `cell` at once, one spawned process per core."""
    cores = sorted(os.sched_getaffinity(0))[: len(impls)]
    with multiprocessing.get_context("spawn").Pool(len(impls)) as pool:
        jobs = [pool.apply_async(pinned, (core, impl, cell, args)) for core, impl in zip(cores, impls)]
        return [job.get() for job in jobs]


def print_table(rows: list[dict], args: argparse.Namespace) -> None:
    heads = [f"{args.minutes * (k + 1) / args.evals:g} min" for k in range(args.evals)]
    print("\n| task | implementation | iterations | iterations/hour | " + " | ".join(heads)
          + " | MAML paper (60k it.) |")
    print("|" + "---|" * (5 + len(heads)))
    for r in rows:
        seconds, its = r["points"][-1][0], r["points"][-1][1]
        accs = [f"{100 * m:.2f} ± {100 * c:.2f}" for _, _, m, c in r["points"]]
        for k, c in enumerate(r.get("curves", [])):
            if "tta" in c:
                accs[k] += f" (test-time augmentation: {100 * c['tta']['mean']:.2f} ± {100 * c['tta']['ci95']:.2f})"
        if "ensemble" in r:
            accs[-1] += f" (ensemble of {len(r['ensemble']['iterations'])}: {100 * r['ensemble']['mean']:.2f} ± " \
                        f"{100 * r['ensemble']['ci95']:.2f})"
        print(f"| {r['cell']} | {r['impl']} | {its} | {3600 * its / seconds:.0f} | " + " | ".join(accs)
              + f" | {PUBLISHED[r['cell']]} |")
    for r in rows:  # the same evaluations after more inner steps, where --curve-steps asked for more
        longer = [c for c in r.get("curves", []) if len(c["accuracy"]) > c["eval_steps"] + 1]
        if longer:
            print(f"{r['cell']} {r['impl']}, after {len(longer[0]['accuracy']) - 1} inner steps: " + ", ".join(
                f"{100 * c['accuracy'][-1]:.2f} ± {100 * c['ci95'][-1]:.2f}" for c in longer))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=60.0, help="training budget per implementation and task")
    p.add_argument("--tasks", default="5w1s,20w1s", help=f"comma-separated, from {sorted(CELLS)}")
    p.add_argument("--peers", default=",".join(DEFAULT_PEERS),
                   help=f"comma-separated, from {list(PEERS)}; '' for ours alone")
    p.add_argument("--evals", type=int, default=4, help="evaluation points, evenly spaced over the budget")
    p.add_argument("--eval-tasks", type=int, default=600, help="test episodes per evaluation (the papers': 600)")
    p.add_argument("--path", default="auto",
                   help="metagrad's execution path (core.choose_path; 'auto' times loop and vmap on the first batches)")
    p.add_argument("--recipe", default="", choices=["", *RECIPES],
                   help="ours: '' the peers' MAML step; else the experiment omniglot-CELL (paper) or "
                        "omniglot-CELL-maml++ on metagrad's own trainer, with its documented config")
    p.add_argument("--set", action="append", default=[], type=lambda kv: tuple(kv.split("=", 1)),
                   metavar="KEY=VALUE", help="--recipe: a config override, as `metagrad run --set`")
    p.add_argument("--schedule-iterations", type=int, default=0,
                   help="--recipe: the schedule's length (the cosine, the multi-step loss's and warm-up's shares); "
                        "0: what fits the budget, timed on a short throwaway run")
    p.add_argument("--curve-steps", type=int, default=10,
                   help="also measure each evaluation's adaptation curve to this many inner steps (the MAML "
                        "reference code tests Omniglot with 10); the table's accuracy stays at eval_steps. "
                        "--recipe: the config's curve_steps")
    p.add_argument("--inner-lr", type=float, default=None,
                   help="the inner rate of every implementation (default: the MAML paper's for the task: 0.4 at "
                        "5-way, 0.1 at 20-way); --recipe: the config's inner_lr")
    p.add_argument("--outer-lr", type=float, default=1e-3,
                   help="every implementation's outer rate (Adam, constant); --recipe: ours takes the config's "
                        "outer_lr (--set outer_lr=) and schedule instead")
    p.add_argument("--val-characters", type=int, default=VAL_CHARACTERS,
                   help="meta-training characters every implementation holds out for validation (the MAML reference "
                        "code's 100 of the 1,200); 0: all 1,200 train. --recipe: the config's val_characters")
    p.add_argument("--no-ours", action="store_true",
                   help="run the peers alone, e.g. a peer at another --outer-lr beside an earlier run of ours")
    p.add_argument("--threads", type=int, default=0, help="torch threads for every implementation; 0: default")
    p.add_argument("--device", default="cpu")
    p.add_argument("--data", default="", help="folder holding omniglot/ (default: $METAGRAD_DATA)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--side-by-side", action="store_true",
                   help="run a task's implementations at once, one process per core, one thread each")
    p.add_argument("--json", default="", help="also write the results (every evaluation point) to this file")
    args = p.parse_args(argv)
    cells = [c for c in args.tasks.split(",") if c]
    unknown = sorted(set(cells) - set(CELLS))
    if unknown:
        p.error(f"--tasks: unknown {unknown}; choose from {sorted(CELLS)}")
    peers = [x for x in args.peers.split(",") if x]
    if sorted(set(peers) - set(PEERS)):
        p.error(f"--peers: unknown {sorted(set(peers) - set(PEERS))}; choose from {list(PEERS)}")
    if not args.minutes > 0 or args.evals < 1 or args.eval_tasks < 1:
        p.error("--minutes must be positive, --evals and --eval-tasks at least 1")
    if args.side_by_side and (args.threads or args.path.startswith("parallel") or args.device != "cpu"):
        p.error("--side-by-side pins one single-threaded CPU process per implementation: "
                "drop --threads, a 'parallel' --path and --device")
    if args.threads:
        torch.set_num_threads(args.threads)
    impls = [] if args.no_ours else ["metagrad"]
    for peer in peers:
        why = available(peer)
        if why:
            print(f"{peer}: not available here, skipped ({why}); run with .venv-bench/bin/python to include it")
        else:
            impls.append(peer)
    if not impls:
        p.error("--no-ours with no peer that imports here: nothing to run")
    if args.side_by_side and len(impls) > len(os.sched_getaffinity(0)):
        p.error(f"--side-by-side needs a core per implementation: {len(impls)} implementations, "
                f"{len(os.sched_getaffinity(0))} cores")
    threads = "1 thread and 1 core each, side by side" if args.side_by_side else f"{torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {threads}, device {args.device}; "
          f"{args.minutes:g} min of meta-training per implementation and task; running: {', '.join(impls)}")
    if args.side_by_side:
        rows = [row for cell in cells for row in side_by_side(impls, cell, args)]
    else:
        rows = [train_and_evaluate(impl, cell, args) for cell in cells for impl in impls]
    print_table(rows, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
