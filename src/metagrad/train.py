"""The meta-training loop: sample a meta-batch, take an outer step, log, checkpoint, resume.

    gen = Generator(seed)
    for iteration in start..iterations:
        batch = tasks.sample(meta_batch, gen)            # [meta_batch, shots, ...], the same on every rank
        metrics = train_step(algorithm, batch, ...)      # meta-gradient (all-reduced under torchrun), Adam step
        every log_every:        metrics.jsonl line (means over the window), progress bar
        every val_every:        query loss/accuracy on fixed meta-train and held-out tasks, and their gap
        every checkpoint_every: checkpoint (algorithm, optimizer, task generator, log window)
    Ctrl-C / SIGTERM: finish the iteration, save a checkpoint, raise TrainingInterrupted.
    torchrun: only rank 0 writes; the ranks stop together (metagrad.distributed).

A checkpoint holds everything the loop's future depends on, so a resumed run is bit-identical to
an uninterrupted one. It also holds a `spec` (names and arguments of algorithm, model and task
family) from which `build` makes the same objects again: `metagrad eval` and `--resume` use it.
"""

from __future__ import annotations

import inspect
import math
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from metagrad import distributed
from metagrad.algorithms.base import Algorithm
from metagrad.evaluation import evaluate, evaluate_ensemble, tta_views
from metagrad.models import MLP, Conv4
from metagrad.models.gnn import GCN
from metagrad.runs import CHECKPOINT, Run, find_checkpoint, read_checkpoint
from metagrad.tasks.base import TaskDistribution, get_family

MODELS: dict[str, Any] = {"mlp": MLP, "conv4": Conv4, "gcn": GCN}
LR_SCHEDULES = ("constant", "cosine")


def check_lr_schedule(outer_lr: float, schedule: str, min_outer_lr: float) -> None:
    """Raise a ValueError naming the argument if the outer-rate schedule is not one meta_train runs."""
    if not outer_lr > 0:
        raise ValueError(f"outer_lr must be positive, got {outer_lr!r}")
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {schedule!r}")
    if not 0 <= min_outer_lr <= outer_lr:
        raise ValueError(f"min_outer_lr must be in [0, outer_lr={outer_lr!r}], got {min_outer_lr!r}")


def outer_lr_at(iteration: int, iterations: int, outer_lr: float, schedule: str = "constant",
                min_outer_lr: float = 0.0) -> float:
    """The outer learning rate of (0-based) `iteration`: constant, or cosine-annealed to `min_outer_lr` (MAML++)."""
    if schedule == "constant":
        return outer_lr
    check_lr_schedule(outer_lr, schedule, min_outer_lr)
    # torch's CosineAnnealingLR with T_max = iterations, as a function of the iteration alone: a resumed
    # run needs no scheduler state to continue on the same curve. Past its end it stays at the floor (a run
    # timed to a budget may outlast the iterations it was scheduled for).
    progress = min(iteration / max(iterations, 1), 1.0)
    return min_outer_lr + (outer_lr - min_outer_lr) * (1 + math.cos(math.pi * progress)) / 2


class TrainingInterrupted(KeyboardInterrupt):
    """Raised after Ctrl-C or SIGTERM once the checkpoint is saved; resume continues the run."""


@dataclass
class TrainResult:
    """How the loop ended: iterations done, why it stopped, training seconds (all sessions), last logged metrics."""

    iteration: int
    stopped: str  # "done" | "time_budget"
    seconds: float
    metrics: dict[str, float] = field(default_factory=dict)


# -- building objects from a spec ---------------------------------------------------------------------
def algorithms() -> dict[str, type]:
    """The algorithm registry, name -> class."""
    import metagrad.algorithms as pkg

    return getattr(pkg, "ALGORITHMS", {"maml": pkg.MAML})


def _call(kind: str, name: str, fn: Any, args: dict[str, Any], **fixed: Any) -> Any:
    """`fn(**fixed, **args)` with a clear error for an argument `fn` does not take."""
    params = inspect.signature(fn).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(args) - set(params))
        if unknown:
            valid = sorted(set(params) - set(fixed) - {"self"})
            raise KeyError(f"{kind} {name!r} has no argument(s) {unknown}; it takes {valid}")
    return fn(**fixed, **args)


def _lookup(kind: str, registry: dict[str, Any], name: str) -> Any:
    if name not in registry:
        raise KeyError(f"unknown {kind} {name!r}; known: {', '.join(sorted(registry))}")
    return registry[name]


def build_tasks(spec: dict[str, Any], split: str | None = None) -> TaskDistribution:
    """The task family of `spec` (`tasks`, `task_args`), on `split` if the family has splits."""
    cls = get_family(spec["tasks"])
    args = dict(spec.get("task_args") or {})
    if split is not None and "split" in inspect.signature(cls).parameters:
        args["split"] = split
    return _call("task family", spec["tasks"], cls, args)


def build(spec: dict[str, Any], seed: int = 0) -> tuple[Algorithm, TaskDistribution]:
    """The algorithm (with a freshly initialised model, seeded) and the meta-training task family of `spec`.

    spec: {"algorithm": "maml", "algorithm_args": {...}, "model": "mlp"|"conv4"|"auto",
           "model_args": {...}, "tasks": "sinusoid", "task_args": {...}}
    """
    known = {"algorithm", "algorithm_args", "model", "model_args", "tasks", "task_args"}
    if set(spec) - known:
        raise KeyError(f"unknown spec key(s) {sorted(set(spec) - known)}; expected {sorted(known)}")
    alg_cls = _lookup("algorithm", algorithms(), spec["algorithm"])
    tasks = build_tasks(spec, split="train")
    example = tasks.sample(1, torch.Generator().manual_seed(seed))  # shapes and label type only
    classify = not example.query_y.is_floating_point()
    model_name = spec.get("model", "auto")
    model_args = dict(spec.get("model_args") or {})
    if model_name == "auto":
        # A family may name its model (graph-sbm: a GCN); else images [tasks, shots, C, H, W] get a Conv4.
        model_name = getattr(tasks, "default_model", None) or ("conv4" if example.support_x.dim() == 5 else "mlp")
    if model_name == "mlp" and "sizes" not in model_args:
        outputs = int(getattr(tasks, "ways", 0)) if classify else example.support_y.shape[-1]
        model_args["sizes"] = (example.support_x.shape[-1], 40, 40, outputs)
    if model_name == "conv4":
        model_args.setdefault("ways", int(tasks.ways))
        model_args.setdefault("in_channels", example.support_x.shape[2])
    if model_name == "gcn":
        model_args.setdefault("ways", int(tasks.ways))
        model_args.setdefault("features", int(tasks.features))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the model's initialisation is part of the run's seed
        model = _call("model", model_name, _lookup("model", MODELS, model_name), model_args)
    fixed = {"model": model}
    if classify:
        fixed["loss_fn"] = nn.functional.cross_entropy
    algorithm = _call("algorithm", spec["algorithm"], alg_cls, dict(spec.get("algorithm_args") or {}), **fixed)
    # The model computes in the data's precision (float64 families: linear-gaussian, quadratic), and so do the
    # algorithm's own meta-parameters (learned rates, a learned optimizer). Initialised in float32 first, so
    # the seed gives the same start whatever the precision.
    dtype = example.support_x.dtype if example.support_x.is_floating_point() else torch.get_default_dtype()
    if dtype != next(algorithm.parameters(), torch.empty(0)).dtype:
        algorithm.to(dtype)
    return algorithm, tasks


# -- checkpoints -------------------------------------------------------------------------------------
def identity(algorithm: nn.Module) -> dict[str, Any]:
    """What must match to load a checkpoint: the algorithm class and every state tensor's shape."""
    return {"class": type(algorithm).__name__,
            "shapes": {k: list(v.shape) for k, v in algorithm.state_dict().items()}}


def check_compatible(saved: dict[str, Any], algorithm: nn.Module, source: str) -> None:
    """A clear error naming what differs between a checkpoint and the algorithm it is loaded into."""
    now = identity(algorithm)
    problems = []
    if saved["class"] != now["class"]:
        problems.append(f"algorithm {saved['class']} vs {now['class']}")
    a, b = saved["shapes"], now["shapes"]
    if sorted(set(a) - set(b)):
        problems.append(f"tensors only in the checkpoint: {sorted(set(a) - set(b))}")
    if sorted(set(b) - set(a)):
        problems.append(f"tensors only in this model: {sorted(set(b) - set(a))}")
    problems += [f"{k} has shape {a[k]} in the checkpoint, {b[k]} in this model" for k in a if k in b and a[k] != b[k]]
    if problems:
        raise ValueError(f"checkpoint {source} is from another model: " + "; ".join(problems))


def load_checkpoint(algorithm: nn.Module, checkpoint: str | Path | dict[str, Any]) -> dict[str, Any]:
    """Load a checkpoint's algorithm state into `algorithm` (after checking it fits); returns the checkpoint."""
    source = "(dict)" if isinstance(checkpoint, dict) else str(checkpoint)
    if not isinstance(checkpoint, dict):
        checkpoint = read_checkpoint(checkpoint)  # data only: nothing in the file is run
    check_compatible(checkpoint["identity"], algorithm, source)
    algorithm.load_state_dict(checkpoint["algorithm"])
    if hasattr(algorithm, "load_path_state"):
        algorithm.load_path_state(checkpoint.get("paths") or {})
    return checkpoint


def narrowed(algorithm: Algorithm, spec: dict[str, Any], ways: int) -> Algorithm:
    """`spec`'s algorithm for tasks of `ways` classes with `algorithm`'s state (meta-trained on more): its
    classifier keeps the first `ways` of its outputs."""
    # Higher-way training (Snell et al. 2017 train 5-way Omniglot on 60-way tasks): every task's labels are a
    # random order of its classes, so the head's rows are exchangeable and its first `ways` are a `ways`-way
    # head. Every state tensor with a class dimension (the head; Meta-SGD's rates of it) is cut along it.
    trained = int((spec.get("model_args") or {}).get("ways", 0))
    if not 0 < ways <= trained:
        raise ValueError(f"a classifier with {trained} outputs cannot be narrowed to {ways} classes"
                         if trained else "spec's model_args hold no `ways`: not a classifier with a class per output")
    out, _ = build({**spec, "model_args": {**spec["model_args"], "ways": ways}})
    state, shapes = algorithm.state_dict(), {k: v.shape for k, v in out.state_dict().items()}
    cut = {}
    for k, v in state.items():
        if v.shape != shapes[k]:
            if shapes[k][1:] != v.shape[1:] or shapes[k][0] != ways:  # the class dimension comes first
                raise ValueError(f"{k}: shape {tuple(v.shape)} does not narrow to {tuple(shapes[k])}")
            v = v[:ways]
        cut[k] = v
    out.load_state_dict(cut)
    return out.to(algorithm.device()).train(algorithm.training)


# -- the loop ----------------------------------------------------------------------------------------
@contextmanager
def _deferred_interrupts() -> Iterator[list[int]]:
    """Turn the first SIGINT/SIGTERM into a flag checked between iterations, so no checkpoint is mid-step."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def handler(signum: int, frame: Any) -> None:
        if received:  # a second signal: stop at once
            raise KeyboardInterrupt
        received.append(signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for s, h in old.items():
            signal.signal(s, h)


class _BudgetBar:
    """The progress of a time-limited run, in seconds of its budget: its iteration count may be far out of
    reach (60,000 Omniglot iterations in a 60-minute budget), so a bar over iterations would mislead."""

    def __init__(self, budget: float, iterations: int, start: int, desc: str, disable: bool) -> None:
        from tqdm.auto import tqdm

        self.budget, self.iterations, self.i, self.t0 = budget, iterations, start, time.perf_counter()
        self.bar = tqdm(total=max(budget, 1.0), desc=f"{desc} (time budget)", disable=disable, dynamic_ncols=True,
                        mininterval=0.5, bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} s [{elapsed}<{remaining}"
                                                    "{postfix}]")
        self.postfix = ""

    def set_postfix(self, values: dict[str, str], refresh: bool = True) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def update(self, n: int = 1) -> None:
        self.i += n
        self.bar.set_postfix_str(f"iteration {self.i}/{self.iterations}" + (f", {self.postfix}" if self.postfix
                                                                            else ""), refresh=False)
        self.bar.update(min(time.perf_counter() - self.t0, self.budget) - self.bar.n)

    def __enter__(self) -> _BudgetBar:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.close()


def progress_bar(iterations: int, start: int, time_budget: float | None, desc: str, progress: bool) -> Any:
    """meta_train's bar: over iterations, or over the seconds of `time_budget` when there is one."""
    if time_budget is not None:
        return _BudgetBar(time_budget, iterations, start, desc, not progress)
    from tqdm.auto import tqdm

    return tqdm(total=iterations, initial=start, desc=desc, disable=not progress, dynamic_ncols=True, mininterval=0.5)


def train_step(algorithm: Algorithm, batch: Any, optimizer: torch.optim.Optimizer, iteration: int,
               iterations: int, outer_lr: float, lr_schedule: str = "constant",
               min_outer_lr: float = 0.0) -> dict[str, float]:
    """One meta-iteration: the outer rate of `iteration`, then the algorithm's train step (meta-gradient,
    all-reduced over the ranks of a torchrun job, and the optimizer step); returns its metrics."""
    lr = outer_lr_at(iteration, iterations, outer_lr, lr_schedule, min_outer_lr)
    if lr_schedule != "constant":
        for group in optimizer.param_groups:
            group["lr"] = lr
    metrics = algorithm.train_step(batch, optimizer, iteration)
    return {**metrics, "outer_lr": lr} if lr_schedule != "constant" else metrics


def _resume_state(run: Run | None, resume: bool) -> dict[str, Any] | None:
    """The checkpoint to resume from: rank 0 reads it and, in a torchrun job, sends its bytes to the
    other ranks (who may be on machines without the run folder), each of which reads them as data."""
    if not resume:
        return None
    if distributed.world() == 1:
        return run.load_checkpoint() if run is not None else None
    path = run.existing_checkpoint() if run is not None and distributed.is_writer() else None
    return distributed.broadcast_checkpoint(path)


def _checkpoint_state(algorithm: Algorithm, optimizer: torch.optim.Optimizer, gen: torch.Generator,
                      iteration: int, window: dict[str, float], seconds: float, **settings: Any) -> dict[str, Any]:
    """Everything the loop's future depends on, so that a resumed run is bit-identical to an uninterrupted one."""
    return {"iteration": iteration, "algorithm": algorithm.state_dict(), "identity": identity(algorithm),
            "optimizer": optimizer.state_dict(), "generator": gen.get_state(), "window": window,
            "seconds": seconds, **settings,
            # The execution paths `auto` chose by timing (and the timings so far): a resumed run takes
            # the same paths, so it is bit-identical to an uninterrupted one.
            "paths": algorithm.path_state() if hasattr(algorithm, "path_state") else {}}


def _window_mean(window: dict[str, float]) -> dict[str, float]:
    return {k: v / window["_n"] for k, v in window.items() if k != "_n"}


def meta_train(
    algorithm: Algorithm,
    tasks: TaskDistribution,
    iterations: int,
    meta_batch: int = 25,
    outer_lr: float = 1e-3,
    run: Run | None = None,
    seed: int = 0,
    optimizer: torch.optim.Optimizer | None = None,
    val_tasks: TaskDistribution | None = None,
    val_every: int = 0,
    val_n_tasks: int = 100,
    log_every: int = 50,
    checkpoint_every: int = 1000,
    time_budget: float | None = None,
    device: str | torch.device = "cpu",
    spec: dict[str, Any] | None = None,
    progress: bool = True,
    desc: str = "meta-train",
    lr_schedule: str = "constant",
    min_outer_lr: float = 0.0,
    resume: bool | None = None,
    keep_best: int = 0,
) -> TrainResult:
    """Meta-train `algorithm` on tasks from `tasks` for `iterations` outer steps of `meta_batch` tasks each.

    With `run`, writes metrics.jsonl and checkpoint.safetensors there, and if `run.resume` continues from its
    checkpoint. `val_tasks` (held-out) are compared every `val_every` iterations with as many fixed
    meta-training tasks: the meta-train vs meta-test gap. `time_budget` (seconds) stops early, cleanly.
    `lr_schedule="cosine"` anneals the outer rate from `outer_lr` to `min_outer_lr` over `iterations`.
    `keep_best=k` keeps the k checkpoints with the best validation metric in `run`'s `best/` folder (MAML++'s
    ensemble at meta-test: `evaluation.evaluate_ensemble`).

    In a torchrun job every rank calls this with the same arguments: every rank draws the same global
    meta-batch from `seed` and computes its shard of it (`metagrad.distributed`); only rank 0 writes to
    `run` (the others may pass `run=None` with `resume=True` to resume from rank 0's checkpoint), and
    the decisions to stop (time budget, Ctrl-C/SIGTERM) are taken together.
    """
    for name, value in (("iterations", iterations), ("meta_batch", meta_batch)):
        if int(value) != value or value < (0 if name == "iterations" else 1):
            raise ValueError(f"{name} must be a {'non-negative' if name == 'iterations' else 'positive'} "
                             f"integer, got {value!r}")
    check_lr_schedule(outer_lr, lr_schedule, min_outer_lr)
    if isinstance(keep_best, bool) or int(keep_best) != keep_best or keep_best < 0:
        raise ValueError(f"keep_best must be a non-negative integer, got {keep_best!r}")
    if keep_best and not (val_tasks is not None and val_every > 0 and (run is not None or not distributed.is_writer())):
        raise ValueError("keep_best ranks checkpoints by validation: it needs val_tasks, val_every > 0 and a run "
                         "folder to keep them in (on rank 0)")
    writer = distributed.is_writer()
    writes = run if writer else None
    device = torch.device(device)
    algorithm.to(device)
    optimizer = optimizer or torch.optim.Adam(algorithm.parameters(), lr=outer_lr)
    gen = torch.Generator().manual_seed(seed)
    window: dict[str, float] = {}  # sums of metrics since the last log line
    start, seconds_before = 0, 0.0  # a resumed run's iterations and training seconds so far
    state = _resume_state(run, run.resume if resume is None and run is not None else bool(resume))
    if state is not None:
        load_checkpoint(algorithm, state)
        optimizer.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        window = dict(state["window"])
        start, seconds_before = int(state["iteration"]), float(state.get("seconds", 0.0))
        if writes is not None:
            writes.truncate_metrics(start)
            writes.truncate_best(start)
    validate = val_tasks is not None and val_every > 0 and writer
    if validate:
        # Fixed sets from their own generators: validation never moves the training generator.
        fixed_val = val_tasks.sample(val_n_tasks, torch.Generator().manual_seed(seed + 1))
        fixed_train = tasks.sample(val_n_tasks, torch.Generator().manual_seed(seed + 2))

    def state_at(iteration: int) -> dict[str, Any]:
        return _checkpoint_state(algorithm, optimizer, gen, iteration, window, seconds_before + time.perf_counter()
                                 - t0, spec=spec, seed=seed, meta_batch=meta_batch, outer_lr=outer_lr)

    def checkpoint(iteration: int) -> None:
        if writes is not None:
            writes.save_checkpoint(state_at(iteration))

    t0 = time.perf_counter()
    last: dict[str, float] = {}
    stopped = "done"
    with _deferred_interrupts() as interrupts, \
            progress_bar(iterations, start, time_budget, desc, progress and writer) as bar:
        for i in range(start, iterations):
            batch = tasks.sample(meta_batch, gen).to(device)  # the global batch; each rank takes its shard
            metrics = train_step(algorithm, batch, optimizer, i, iterations, outer_lr, lr_schedule, min_outer_lr)
            for k, v in metrics.items():
                window[k] = window.get(k, 0.0) + v
            window["_n"] = window.get("_n", 0.0) + 1
            step = i + 1
            line: dict[str, float] = {}
            # Lines only at multiples (not at the last step): a run extended later logs what a longer run would.
            if step % log_every == 0:
                line = last = _window_mean(window)
                window = {}
                bar.set_postfix({k: f"{v:.4g}" for k, v in line.items() if k != "grad_norm"}, refresh=False)
            if validate and step % val_every == 0:
                on_train = evaluate(algorithm, fixed_train)
                on_val = evaluate(algorithm, fixed_val)
                line = {**line, f"meta_train_{on_val.metric}": on_train.mean, f"meta_test_{on_val.metric}": on_val.mean,
                        "gap": on_val.mean - on_train.mean, "meta_test_ci95": on_val.ci95}
                if keep_best and writes is not None:
                    writes.keep_best(state_at(step), on_val.mean, keep_best, higher=on_val.metric == "accuracy")
            if line and writes is not None:
                writes.log(step, line)
            bar.update(1)
            if step % checkpoint_every == 0 and step < iterations:
                checkpoint(step)
            over_budget = time_budget is not None and time.perf_counter() - t0 > time_budget and step < iterations
            interrupted, over_budget = distributed.agree(bool(interrupts), over_budget)
            if interrupted:
                checkpoint(step)
                raise TrainingInterrupted(f"interrupted at iteration {step} of {iterations}; checkpoint saved"
                                          + (f" in {run.dir}" if run is not None else ""))
            if over_budget:
                stopped = "time_budget"
                break
        else:
            step = max(start, iterations)
    checkpoint(step)
    if not last and window.get("_n"):
        last = _window_mean(window)
    if writes is not None and window.get("_n"):  # the last, shorter window (a run shorter than log_every too)
        writes.log(step, {**_window_mean(window), "partial_window": int(window["_n"])})
    return TrainResult(step, stopped, seconds_before + time.perf_counter() - t0, last)


def evaluate_checkpoint(path: str | Path, n_tasks: int = 1000, steps: int | None = None, seed: int | None = None,
                        split: str = "test", device: str = "cpu", task_args: dict[str, Any] | None = None,
                        one_batch: bool = False, inner_lr: float | None = None,
                        progress: bool = False, tta_shift: int = 0, support_shift: int = 0,
                        tta_rotations: int = 1) -> tuple[Algorithm, Any]:
    """Rebuild the algorithm of a checkpoint from its spec, load it, evaluate on held-out tasks (seed: the run's).

    The protocol of the run's own table, where it differs from the defaults: `task_args` override the
    spec's (e.g. more query points at meta-test), `one_batch` samples all `n_tasks` at once (as an
    experiment that samples its test set in one call does), `inner_lr` is the fine-tuning rate chosen
    after training (the pre-trained baseline's). `tta_shift`/`support_shift`/`tta_rotations` test with test-time
    augmentation (`evaluation.evaluate_ensemble` of the one model over shifted views of the images and rotated
    views of each task, `evaluation.tta_views`; the curve: its last point).
    """
    path = Path(path)
    if path.is_dir():
        path = find_checkpoint(path) or path / CHECKPOINT
    state = read_checkpoint(path)  # data only: nothing in the file is run
    if not state.get("spec"):
        raise ValueError(f"checkpoint {path} has no spec to rebuild its algorithm from; "
                         "load it into your own with metagrad.train.load_checkpoint(algorithm, path)")
    algorithm, _ = build(state["spec"], seed=int(state.get("seed", 0)))
    load_checkpoint(algorithm, state)
    algorithm.to(device)
    spec = {**state["spec"], "task_args": {**(state["spec"].get("task_args") or {}), **(task_args or {})}}
    tasks = build_tasks(spec, split=split)
    if int(getattr(tasks, "ways", 0) or 0) < int((spec.get("model_args") or {}).get("ways", 0)):
        algorithm = narrowed(algorithm, state["spec"], int(tasks.ways))  # meta-trained on more classes
    if inner_lr is not None:
        from metagrad import inner

        algorithm.inner_opt, algorithm.inner_lr = inner.sgd(inner_lr), inner_lr
    seed = int(state.get("seed", 0)) if seed is None else seed
    # Held-out tasks from a generator no training run uses (training: seed, seed+1, seed+2).
    gen = torch.Generator().manual_seed(seed + 10_000)
    if tta_shift or support_shift or tta_rotations > 1:
        if steps is not None:
            algorithm.eval_steps = steps
        held_out = tasks.sample(n_tasks, gen) if one_batch else tasks
        views = tta_views(tta_shift, support_shift, tta_rotations)
        return algorithm, evaluate_ensemble([algorithm], held_out, n_tasks, gen, **views)
    if one_batch:
        result = evaluate(algorithm, tasks.sample(n_tasks, gen), steps=steps, progress=progress)
    else:
        result = evaluate(algorithm, tasks, n_tasks, steps, gen, progress=progress)
    return algorithm, result
