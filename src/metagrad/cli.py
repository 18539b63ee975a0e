"""The `metagrad` command: run named experiments, train, evaluate, list, report, download data.

    metagrad run [NAME] [--set key=value ...]     a named experiment (default: sinusoid, ~20 s)
    metagrad train --algorithm maml --tasks sinusoid --inner-lr 0.01 --iterations 1000 ...
    metagrad eval runs/NAME/checkpoint.safetensors         re-evaluate a checkpoint on held-out tasks
    metagrad list                                 experiments, algorithms, task families
    metagrad report runs/a runs/b --out docs/experiments.md
    metagrad download omniglot
    metagrad federated loopback --num-clients 3    Flower SuperLink + SuperNodes on 127.0.0.1 (federated extra)

Every run writes a folder (`runs/<name>`, or `--out`): config.json, metrics.jsonl, checkpoint.safetensors,
results.json, PNG plots. Bad names and config keys are one-line errors with exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from metagrad import __version__, distributed
from metagrad.runs import Run, find_checkpoint, has_checkpoints, normalise, read_checkpoint

EXIT_USAGE = 2


class UsageError(Exception):
    """A bad name, key or value given by the user: printed as one line, exit code 2."""


class CommandError(Exception):
    """The command could not do its work (no network, no device): printed as one line, exit code 1."""


@dataclass
class TrainConfig:
    """Everything `metagrad train` needs; keys of --config files and --set are these fields."""

    algorithm: str = "maml"
    tasks: str = "sinusoid"
    model: str = "auto"             # mlp | conv4 | auto (from the task family's example shape)
    inner_lr: float | None = None   # None: the algorithm's default
    inner_steps: int | None = None
    order: int | None = None
    shots: int | None = None        # None: the task family's default
    query_shots: int | None = None
    ways: int | None = None
    meta_batch: int = 25
    iterations: int = 1000
    outer_lr: float = 1e-3
    lr_schedule: str = "constant"   # constant | cosine (annealed to min_outer_lr over the iterations: MAML++)
    min_outer_lr: float = 0.0
    algorithm_args: dict[str, Any] = field(default_factory=dict)
    task_args: dict[str, Any] = field(default_factory=dict)
    model_args: dict[str, Any] = field(default_factory=dict)
    val_every: int = 0              # 0: no held-out validation during training
    val_tasks: int = 100
    eval_tasks: int = 1000
    eval_steps: int | None = None   # None: the algorithm's inner_steps
    log_every: int = 50
    checkpoint_every: int = 1000
    budget_minutes: float | None = None  # wall-time limit of meta-training, in minutes (as the experiments')
    device: str = "cpu"
    seed: int = 0

    def spec(self) -> dict[str, Any]:
        """The build spec: algorithm, model and task family with their arguments."""
        alg = {k: getattr(self, k) for k in ("inner_lr", "inner_steps", "order") if getattr(self, k) is not None}
        task = {k: getattr(self, k) for k in ("shots", "query_shots", "ways") if getattr(self, k) is not None}
        return {"algorithm": self.algorithm, "algorithm_args": {**alg, **self.algorithm_args},
                "model": self.model, "model_args": dict(self.model_args),
                "tasks": self.tasks, "task_args": {**task, **self.task_args}}


# -- config handling ---------------------------------------------------------------------------------
def read_config_file(path: str) -> dict[str, Any]:
    """Keys and values of a .json or .toml config file."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"--config {path}: no such file")
    if p.suffix == ".json":
        data = json.loads(p.read_text())
    elif p.suffix == ".toml":
        try:
            import tomllib
        except ImportError:  # Python 3.10
            raise UsageError("--config: .toml files need Python >= 3.11; use a .json file") from None
        data = tomllib.loads(p.read_text())
    else:
        raise UsageError(f"--config {path}: expected a .json or .toml file")
    if not isinstance(data, dict):
        raise UsageError(f"--config {path}: expected a table of key = value pairs")
    return data


def parse_sets(pairs: list[str]) -> dict[str, str]:
    """`["a=1", "b=x"]` -> {"a": "1", "b": "x"}."""
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise UsageError(f"--set expects key=value, got {pair!r}")
        k, v = pair.split("=", 1)
        out[k.strip().replace("-", "_")] = v
    return out


def resolve(config_cls: type, saved: dict[str, Any] | None, overrides: dict[str, Any], what: str) -> Any:
    """`config_cls` from defaults, then a resumed run's saved config, then overrides; unknown keys are errors."""
    from metagrad.experiments import make_config

    return make_config(config_cls, {**(saved or {}), **overrides}, what)


def saved_config(out: Path, resume: bool) -> dict[str, Any] | None:
    """The config.json of the run being resumed, if any."""
    path = out / "config.json"
    return json.loads(path.read_text()) if resume and path.is_file() else None


def budget_in_minutes(config: dict[str, Any], where: str) -> dict[str, Any]:
    """The old `time_budget` key (seconds) as `budget_minutes`: one unit for every time budget."""
    if "time_budget" not in config:
        return config
    config = dict(config)
    seconds = config.pop("time_budget")
    if isinstance(seconds, str):  # from --set: a number or null
        try:
            seconds = json.loads(seconds)
        except json.JSONDecodeError:
            pass
        if not (seconds is None or isinstance(seconds, (int, float))):
            raise UsageError(f"time_budget expects a number of seconds or null, got {seconds!r}")
    if seconds is not None:
        seconds = float(seconds)
        if "budget_minutes" in config and config["budget_minutes"] is not None \
                and float(config["budget_minutes"]) * 60 != seconds:
            raise UsageError(f"{where}: time_budget={seconds:g} (seconds) and budget_minutes="
                             f"{config['budget_minutes']} disagree; give budget_minutes only")
        config["budget_minutes"] = seconds / 60
        print(f"metagrad: note: {where}: time_budget={seconds:g} is in seconds, the old unit; using "
              f"budget_minutes={seconds / 60:g} (time budgets are in minutes)", file=sys.stderr)
    return config


def check_device(device: str | None) -> None:
    """A device this torch can use, or a one-line error saying why not and what to do."""
    if device is None:
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {device!r} is not a torch device; use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise CommandError(f"--device {device}: no CUDA device is available to this torch "
                               f"({torch.__version__}{', a CPU-only build' if torch.version.cuda is None else ''})"
                               "; use --device cpu, or install a CUDA build of torch (README, GPU users)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise CommandError(f"--device {device}: there are {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise CommandError(f"--device {device}: MPS is not available here; use --device cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"--device {device!r}: metagrad runs on cpu, cuda or mps")


def no_conflicts(flags: dict[str, Any], sets: dict[str, Any]) -> None:
    """A key given both as a flag and with --set must agree: refuse rather than pick one silently."""
    def same(a: Any, b: Any) -> bool:
        try:
            return float(a) == float(b)
        except (TypeError, ValueError):
            return str(a) == str(b)

    for key, value in flags.items():
        if key in sets and not same(sets[key], value):
            raise UsageError(f"--{key.replace('_', '-')} {value} and --set {key}={sets[key]} disagree; give one")


def check_resume(out: Path, resume: bool) -> None:
    """`--resume` needs a checkpoint to continue from: refuse rather than silently start afresh."""
    if resume and not has_checkpoints(out):
        what = "does not exist" if not out.exists() else "holds no checkpoint"
        raise UsageError(f"--resume: run folder {out} {what} to continue from; run without --resume to start "
                         "a new run there")


def finish(run: Run, results: dict[str, Any], name: str, summary: str, t0: float, argv: list[str]) -> None:
    """Write results.json with where it came from, and print the table."""
    from metagrad.report import markdown_table

    results = {"experiment": name, "summary": summary, "command": "metagrad " + " ".join(argv),
               "seconds": round(time.time() - t0, 1),
               "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), **results}
    run.save_results(results)
    if results.get("note"):
        print(results["note"])
    if "table" in results:
        print(markdown_table(results["table"]))
    print(f"run folder: {run.dir}")


# -- commands ----------------------------------------------------------------------------------------
def cmd_list(args: argparse.Namespace) -> int:
    from metagrad.experiments import load_all
    from metagrad.tasks import load_families
    from metagrad.train import algorithms

    def first_line(obj: Any) -> str:
        return (obj.__doc__ or "").strip().splitlines()[0] if obj.__doc__ else ""

    print("experiments (metagrad run NAME):")
    for name, e in sorted(load_all().items()):
        print(f"  {name:28s} {e.summary}")
    print("algorithms (metagrad train --algorithm NAME):")
    for name, cls in sorted(algorithms().items()):
        print(f"  {name:28s} {first_line(cls)}")
    print("task families (metagrad train --tasks NAME):")
    for name, cls in sorted(load_families().items()):
        print(f"  {name:28s} {first_line(cls)}")
    return 0


def show_config(exp: Any) -> None:
    """The config keys of an experiment with their types and defaults (`metagrad run NAME --show-config`)."""
    print(f"{exp.name}: {exp.summary}")
    print("config keys (--set KEY=VALUE, or a --config file); lists as comma-separated values:")
    for f in dataclasses.fields(exp.config_cls):
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "")
        print(f"  {f.name:26s} {kind:22s} default {default!r}")


def cmd_run(args: argparse.Namespace) -> int:
    from metagrad.experiments import get

    exp = get(args.name)
    if args.show_config:
        show_config(exp)
        return 0
    out = Path(args.out or Path("runs") / args.name)
    sets = parse_sets(args.set)
    overrides = {**(read_config_file(args.config) if args.config else {}), **sets}
    fields = {f.name for f in dataclasses.fields(exp.config_cls)}
    flags = {flag: getattr(args, flag) for flag in ("seed", "device") if getattr(args, flag) is not None}
    no_conflicts(flags, sets)
    for flag, value in flags.items():
        if flag not in fields:
            raise UsageError(f"experiment {args.name!r} has no {flag} option")
        overrides[flag] = value
    if "budget_minutes" in fields:
        overrides = budget_in_minutes(overrides, f"experiment {args.name!r}")
    check_resume(out, args.resume)
    cfg = resolve(exp.config_cls, saved_config(out, args.resume), overrides, f"experiment {args.name!r}")
    check_device(getattr(cfg, "device", None))
    with new_folder_removed_on_error(out):
        run = Run(out, dataclasses.asdict(cfg), resume=args.resume, overwrite=args.overwrite)
        t0 = time.time()
        results = exp.fn(cfg, run)
    finish(run, results, exp.name, exp.summary, t0, args.argv)
    return 0


@contextmanager
def new_folder_removed_on_error(out: Path) -> Iterator[None]:
    """A run folder this command creates is removed again if the command fails before it holds a
    checkpoint (a bad value found late): no half-made run folders. Interrupts keep it, for --resume."""
    existed = out.exists()
    try:
        yield
    except (UsageError, KeyError, ValueError, TypeError, FileNotFoundError):
        if not existed and out.is_dir() and not has_checkpoints(out):
            shutil.rmtree(out, ignore_errors=True)
        raise


def cmd_train(args: argparse.Namespace) -> int:
    from metagrad.evaluation import evaluate
    from metagrad.train import build, build_tasks, check_lr_schedule, meta_train

    flags = {k: v for k, v in vars(args).items() if k in {f.name for f in dataclasses.fields(TrainConfig)}}
    if "time_budget" in vars(args):  # the old flag, in seconds
        flags["time_budget"] = args.time_budget
    sets = parse_sets(args.set)
    no_conflicts(flags, sets)
    overrides = budget_in_minutes({**(read_config_file(args.config) if args.config else {}), **sets, **flags},
                                  "metagrad train")
    default = TrainConfig()
    out = Path(args.out or Path("runs") / f"train-{overrides.get('algorithm', default.algorithm)}-"
                                          f"{overrides.get('tasks', default.tasks)}")
    # Under torchrun (WORLD_SIZE > 1) every rank joins the job; rank 0 alone reads and writes the run
    # folder, and the others take its resolved config, so all ranks train the same thing.
    joined = distributed.init_from_env(overrides.get("device") or "cpu")
    cfg = None
    if distributed.is_writer():
        check_resume(out, args.resume)
        saved = saved_config(out, args.resume)
        cfg = resolve(TrainConfig, budget_in_minutes(saved, "the saved config") if saved else None, overrides,
                      "metagrad train")
    if joined:
        cfg = TrainConfig(**distributed.broadcast_json(dataclasses.asdict(cfg) if cfg is not None else None))
    name = f"train-{cfg.algorithm}-{cfg.tasks}"
    # Every value checked before the run folder is made.
    check_lr_schedule(cfg.outer_lr, cfg.lr_schedule, cfg.min_outer_lr)
    for key in ("iterations", "meta_batch", "eval_tasks", "log_every", "checkpoint_every", "val_tasks"):
        value = getattr(cfg, key)
        if not isinstance(value, int) or value < (0 if key == "iterations" else 1):
            raise UsageError(f"{key} must be a {'non-negative' if key == 'iterations' else 'positive'} integer, "
                             f"got {value!r}")
    if cfg.budget_minutes is not None and not cfg.budget_minutes >= 0:
        raise UsageError(f"budget_minutes must be >= 0 (minutes), got {cfg.budget_minutes!r}")
    check_device(cfg.device)
    spec = cfg.spec()
    algorithm, tasks = build(spec, seed=cfg.seed)
    val_tasks = build_tasks(spec, split="val") if cfg.val_every > 0 else None
    test_tasks = build_tasks(spec, split="test")
    budget = None if cfg.budget_minutes is None else cfg.budget_minutes * 60  # meta_train takes seconds

    def train(run: Run | None) -> Any:
        # Every rank runs the same loop; meta_train writes, validates and shows progress on rank 0 only.
        return meta_train(algorithm, tasks, cfg.iterations, cfg.meta_batch, cfg.outer_lr, run=run, resume=args.resume,
                          seed=cfg.seed, val_tasks=val_tasks, val_every=cfg.val_every, val_n_tasks=cfg.val_tasks,
                          log_every=cfg.log_every, checkpoint_every=cfg.checkpoint_every, time_budget=budget,
                          device=cfg.device, spec=spec, progress=not args.no_progress, desc=cfg.algorithm,
                          lr_schedule=cfg.lr_schedule, min_outer_lr=cfg.min_outer_lr)

    if not distributed.is_writer():  # ranks 1..: their shard of every meta-batch; rank 0 evaluates and writes
        train(None)
        return 0
    with new_folder_removed_on_error(out):
        run = Run(out, dataclasses.asdict(cfg), resume=args.resume, overwrite=args.overwrite)
        t0 = time.time()
        trained = train(run)
    # Held-out tasks from the generator `metagrad eval` uses too: the same numbers when re-evaluated.
    result = evaluate(algorithm, test_tasks, cfg.eval_tasks, cfg.eval_steps,
                      torch.Generator().manual_seed(cfg.seed + 10_000), progress=not args.no_progress)
    plot_training(run, result)
    scale, unit = (100.0, "%") if result.metric == "accuracy" else (1.0, "")
    row = {"algorithm": cfg.algorithm, "tasks": cfg.tasks, "iterations": trained.iteration, "stopped": trained.stopped,
           f"query {result.metric} (95% CI)": f"{result.mean * scale:.4g}{unit} ± {result.ci95 * scale:.2g}{unit}",
           "steps": result.steps, "test tasks": result.n_tasks, "train seconds": round(trained.seconds, 1)}
    finish(run, {"table": [row], "eval": result.as_dict(), "spec": spec}, name,
           f"metagrad train: {cfg.algorithm} on {cfg.tasks}", t0, args.argv)
    return 0


def plot_training(run: Run, result: Any) -> None:
    """Plots of a `train` run: meta-loss over iterations and the adaptation curve on held-out tasks."""
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    lines = [m for m in run.metrics() if "meta_loss" in m]
    a.plot([m["step"] for m in lines], [m["meta_loss"] for m in lines], label="meta-batches (window mean)")
    val = [m for m in run.metrics() if "gap" in m]
    if val:
        key = next(k for k in val[0] if k.startswith("meta_test_") and k != "meta_test_ci95")
        train_key = key.replace("meta_test_", "meta_train_")
        a.plot([m["step"] for m in val], [m[train_key] for m in val], "s-", label="fixed meta-train tasks")
        a.plot([m["step"] for m in val], [m[key] for m in val], "o-", label="held-out tasks")
    a.set(xlabel="iteration", ylabel="meta-loss", title="training")
    a.legend()
    steps = range(len(result.curve))
    b.errorbar(steps, result.curve, yerr=result.curve_ci95, marker="o", capsize=2)
    b.set(xlabel="inner steps", ylabel=f"query {result.metric}", title=f"{result.n_tasks} held-out tasks (95% CI)")
    run.save_figure(fig, "training")


SPEC_KEYS = ("algorithm", "algorithm_args", "model", "model_args", "tasks", "task_args")


def check_checkpoint_in_its_folder(path: Path, spec: dict[str, Any], config: dict[str, Any] | None) -> None:
    """Refuse a checkpoint whose spec is not the one of the run folder (config.json) it sits in."""
    if not config:
        return
    if set(config) <= {*SPEC_KEYS, "evaluation"}:  # an experiment's model folder: its config is the spec
        keys = [k for k in SPEC_KEYS if k in config]
    else:  # a `metagrad train` folder (or an experiment's): its algorithm and task family
        keys = [k for k in ("algorithm", "tasks") if isinstance(config.get(k), str)]
    differ = {k: (spec.get(k), config[k]) for k in keys if normalise(spec.get(k)) != normalise(config[k])}
    if differ:
        raise UsageError(f"checkpoint {path} does not belong to its run folder: "
                         + "; ".join(f"{k} {a!r} in the checkpoint, {b!r} in {path.parent / 'config.json'}"
                                     for k, (a, b) in differ.items())
                         + ". Move it to a folder of its own (without config.json) to evaluate it")


def eval_settings(config: dict[str, Any] | None, args: argparse.Namespace) -> dict[str, Any]:
    """How the run evaluated this checkpoint (its own table's settings), overridden by the flags given."""
    settings: dict[str, Any] = {"n_tasks": 1000, "steps": None, "seed": None, "task_args": {}, "one_batch": False,
                                "inner_lr": None}
    source = "defaults"
    if config and isinstance(config.get("evaluation"), dict):  # an experiment recorded its protocol
        settings.update({k: v for k, v in config["evaluation"].items() if k in settings})
        source = "the run's own evaluation settings (config.json)"
    elif config and "eval_tasks" in config:  # a `metagrad train` run
        settings.update(n_tasks=config["eval_tasks"], steps=config.get("eval_steps"))
        source = "the run's eval_tasks and eval_steps (config.json)"
        read = []
        if config.get("eval_query_shots") is not None:  # an experiment that tests with its own query size
            settings["task_args"]["query_shots"] = config["eval_query_shots"]
            read.append("eval_query_shots")
        if config.get("train_ways") not in (None, config.get("ways")):  # tests on fewer classes than it trained
            settings["task_args"]["ways"] = config["ways"]
            read.append("ways (trained on train_ways)")
        if read:
            source = f"the run's eval_tasks, eval_steps, {' and '.join(read)} (config.json)"
    for key, flag in (("n_tasks", "n_tasks"), ("steps", "steps"), ("seed", "seed")):
        if getattr(args, flag) is not None:
            settings[key] = getattr(args, flag)
    settings["source"] = source
    return settings


def cmd_eval(args: argparse.Namespace) -> int:
    from metagrad.runs import atomic_write_json
    from metagrad.train import evaluate_checkpoint

    path = Path(args.checkpoint)
    if not path.exists():
        raise UsageError(f"checkpoint {path} does not exist")
    folder = path if path.is_dir() else path.parent
    if path.is_dir():
        found = find_checkpoint(path)
        if found is None:
            inside = sorted(str(p.parent) for p in path.rglob("checkpoint.*") if find_checkpoint(p.parent) == p)
            raise UsageError(f"{path} holds no checkpoint (checkpoint.safetensors)"
                             + (f"; its models' run folders do: {', '.join(inside)}" if inside else ""))
        path = found
    check_device(args.device)
    if args.tta_shift < 0 or args.support_shift < 0:
        raise UsageError("--tta-shift and --support-shift are numbers of pixels, >= 0")
    state = read_checkpoint(path)
    spec = state.get("spec") or {}
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else None
    check_checkpoint_in_its_folder(path, spec, config)
    s = eval_settings(config, args)
    print(f"checkpoint {path}: algorithm {spec.get('algorithm')!r} on task family {spec.get('tasks')!r} "
          f"(task_args {spec.get('task_args') or {}}), iteration {state.get('iteration')}", file=sys.stderr)
    print(f"evaluating on split {args.split!r}: {s['n_tasks']} tasks, "
          f"{'the algorithm' + chr(39) + 's' if s['steps'] is None else s['steps']} inner steps"
          + (f", task_args {s['task_args']}" if s["task_args"] else "")
          + (f", fine-tuning rate {s['inner_lr']}" if s["inner_lr"] is not None else "")
          + f", test-task seed {'the run' + chr(39) + 's' if s['seed'] is None else s['seed']}; from {s['source']}",
          file=sys.stderr)
    algorithm, result = evaluate_checkpoint(path, s["n_tasks"], s["steps"], s["seed"], args.split, args.device,
                                            task_args=s["task_args"], one_batch=s["one_batch"],
                                            inner_lr=s["inner_lr"], progress=not args.no_progress,
                                            tta_shift=args.tta_shift, support_shift=args.support_shift,
                                            tta_rotations=args.tta_rotations)
    print(result)
    if args.tta_shift or args.support_shift or args.tta_rotations > 1:
        turns = f"each task in {args.tta_rotations} rotations, " if args.tta_rotations > 1 else ""
        print(f"with test-time augmentation ({turns}query views shifted by up to {args.tta_shift} px, support images "
              f"in every shift of up to {args.support_shift} px) after {result.steps} inner steps")
    else:
        print("curve over inner steps: " + ", ".join(f"{k}: {m:.4g}" for k, m in enumerate(result.curve)))
    seed = int(state.get("seed", 0)) if s["seed"] is None else s["seed"]
    atomic_write_json(folder / "eval.json", {
        **result.as_dict(), "checkpoint": str(path), "algorithm": spec.get("algorithm"), "tasks": spec.get("tasks"),
        "spec": spec, "iteration": state.get("iteration"), "split": args.split, "seed": seed,
        "settings": {k: v for k, v in s.items() if k != "seed"},
        "tta_shift": args.tta_shift, "support_shift": args.support_shift, "tta_rotations": args.tta_rotations})
    print(f"written: {folder / 'eval.json'}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from metagrad.report import render

    existed = Path(args.out).exists()
    out = render(args.run_dirs, args.out)
    print(f"{'updated (only the sections of these run folders)' if existed else 'written'}: {out}")
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    import importlib

    if args.dataset != "omniglot":
        raise UsageError(f"unknown dataset {args.dataset!r}; known: omniglot")
    module = importlib.import_module("metagrad.tasks.omniglot")
    if not hasattr(module, "download"):
        raise UsageError("this version of metagrad.tasks.omniglot has no download()")
    try:
        dest = module.download(args.dest) if args.dest else module.download()
    except OSError as e:  # offline, refused, disk full: the message says what to do
        raise CommandError(str(e).splitlines()[0]) from None
    print(f"omniglot is in {dest}")
    return 0


# -- argument parsing --------------------------------------------------------------------------------
TRAIN_HELP = {
    "algorithm": "algorithm to meta-train (metagrad list): {choices}",
    "tasks": "task family (metagrad list): {choices}",
    "model": "model: mlp, conv4, gcn, or auto (from the task family's examples)",
    "inner_lr": "inner-loop step size (default: the algorithm's)",
    "inner_steps": "inner-loop steps at meta-training (default: the algorithm's)",
    "order": "2: exact meta-gradient through the inner loop; 1: first order (default: the algorithm's)",
    "shots": "support examples per task, per class for classification (default: the task family's)",
    "query_shots": "query examples per task (default: the task family's)",
    "ways": "classes per task, for classification families (default: the task family's)",
    "meta_batch": "tasks per meta-iteration",
    "iterations": "meta-iterations (outer steps)",
    "outer_lr": "outer (Adam) learning rate",
    "lr_schedule": "outer-rate schedule; cosine anneals to --min-outer-lr over the iterations (MAML++)",
    "min_outer_lr": "final outer rate of the cosine schedule",
    "val_every": "held-out validation every N iterations (0: none): the meta-train vs meta-test gap",
    "val_tasks": "tasks of each validation",
    "eval_tasks": "held-out test tasks evaluated after training",
    "eval_steps": "inner steps at meta-test (default: the algorithm's inner_steps)",
    "log_every": "iterations per metrics.jsonl line (a shorter last window is logged too)",
    "checkpoint_every": "iterations between checkpoints (one is also saved at the end and on Ctrl-C)",
    "budget_minutes": "wall-time limit of meta-training, in MINUTES; stops cleanly with a checkpoint "
                      "(default: none)",
    "device": "torch device: cpu, cuda, cuda:N, mps",
    "seed": "run seed: model initialisation, task sampling, test tasks",
}
TRAIN_TYPES = {"inner_lr": float, "inner_steps": int, "order": int, "shots": int, "query_shots": int, "ways": int,
               "meta_batch": int, "iterations": int, "outer_lr": float, "lr_schedule": str, "min_outer_lr": float,
               "val_every": int, "val_tasks": int, "eval_tasks": int, "eval_steps": int, "log_every": int,
               "checkpoint_every": int, "budget_minutes": float, "seed": int, "algorithm": str, "tasks": str,
               "model": str, "device": str}
TRAIN_CHOICES = {"order": (1, 2), "lr_schedule": ("constant", "cosine"), "model": ("auto", "mlp", "conv4", "gcn")}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, except where there is none to show or its help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False, []) or "(default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


def parser() -> argparse.ArgumentParser:
    """The argument parser of `metagrad`."""
    fmt = HelpFormatter
    p = argparse.ArgumentParser(prog="metagrad", description="Fast, model-agnostic meta-learning on torch.func.")
    p.add_argument("--version", action="version", version=f"metagrad {__version__} (torch {torch.__version__})")
    sub = p.add_subparsers(dest="command", required=True)

    def run_flags(q: argparse.ArgumentParser) -> None:
        q.add_argument("--out", help="run folder (default runs/<name>)")
        q.add_argument("--resume", action="store_true",
                       help="continue the run in the folder from its checkpoint (refused if it has none)")
        q.add_argument("--overwrite", action="store_true", help="replace a finished run in the folder")
        q.add_argument("--config", help="a .json or .toml file of config keys")
        q.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")

    q = sub.add_parser("list", help="experiments, algorithms and task families")
    q.set_defaults(fn=cmd_list)

    q = sub.add_parser("run", help="run a named experiment (default: sinusoid)", formatter_class=fmt,
                       epilog="`metagrad run NAME --show-config` lists NAME's config keys, types and defaults; "
                              "`metagrad list` names the experiments.")
    q.add_argument("name", nargs="?", default="sinusoid", help="experiment (metagrad list)")
    run_flags(q)
    q.add_argument("--show-config", action="store_true", help="print the experiment's config keys and exit")
    q.add_argument("--seed", type=int, help="run seed (the same as --set seed=N; the two must agree)")
    q.add_argument("--device", help="torch device: cpu, cuda, cuda:N, mps (the same as --set device=...)")
    q.set_defaults(fn=cmd_run)

    from metagrad.tasks import load_families
    from metagrad.train import algorithms

    defaults = TrainConfig()
    choices = {"algorithm": ", ".join(sorted(algorithms())), "tasks": ", ".join(sorted(load_families()))}
    q = sub.add_parser("train", help="meta-train an algorithm on a task family", formatter_class=fmt,
                       description="Meta-train ALGORITHM on a task family; flags override --config and --set "
                                   "(a flag and a --set of the same key must agree). Time budgets are in minutes.")
    run_flags(q)
    q.add_argument("--no-progress", action="store_true", help="no progress bars")
    for key, kind in TRAIN_TYPES.items():
        default = getattr(defaults, key)
        text = TRAIN_HELP[key].format(choices=choices.get(key, ""))
        if default is not None and "(default" not in text:
            text += f" (default: {default})"
        # SUPPRESS: only flags the user gave override the config file and a resumed run's config. The choices
        # show in the help; a wrong one is the one-line error of the check that knows it (exit code 2).
        metavar = "{" + ",".join(map(str, TRAIN_CHOICES[key])) + "}" if key in TRAIN_CHOICES else key.upper()
        q.add_argument("--" + key.replace("_", "-"), dest=key, type=kind, default=argparse.SUPPRESS, help=text,
                       metavar=metavar)
    q.add_argument("--time-budget", dest="time_budget", type=float, default=argparse.SUPPRESS,
                   help="deprecated: the same budget in SECONDS; converted to --budget-minutes")
    q.set_defaults(fn=cmd_train)

    q = sub.add_parser("eval", help="re-evaluate a checkpoint (or run folder) on held-out tasks", formatter_class=fmt,
                       description="Rebuild a checkpoint's algorithm from its spec and evaluate it. By default with "
                                   "the settings the run itself evaluated with (its config.json), so the number "
                                   "is the run's own; the flags change them.")
    q.add_argument("checkpoint", help="checkpoint.safetensors (or an old checkpoint.pt), or its run folder")
    q.add_argument("--n-tasks", type=int, default=None, help="test tasks (default: the run's, else 1000)")
    q.add_argument("--steps", type=int, help="inner steps (default: the run's, else the algorithm's inner_steps)")
    q.add_argument("--seed", type=int, default=None, help="test-task seed (default: the run's seed)")
    q.add_argument("--split", default="test", choices=("train", "val", "test"),
                   help="which tasks, for task families with splits")
    q.add_argument("--device", default="cpu", help="torch device")
    q.add_argument("--tta-shift", type=int, default=0, metavar="PIXELS",
                   help="test-time augmentation: the mean prediction over the query images shifted by up to this "
                        "many pixels along each axis (1: 9 views); images only")
    q.add_argument("--support-shift", type=int, default=0, metavar="PIXELS",
                   help="test-time augmentation: adapt on the support images in every shift of up to this many "
                        "pixels (1: 9 copies of each); images only")
    q.add_argument("--tta-rotations", type=int, default=1, choices=(1, 2, 4), metavar="VIEWS",
                   help="test-time augmentation: the mean prediction over each whole task as it is and turned "
                        "upside down (2) or by every quarter-turn (4), each adapted on its own; square images, "
                        "for models trained with rotated classes (Omniglot's MAML split)")
    q.add_argument("--no-progress", action="store_true", help="no progress bar")
    q.set_defaults(fn=cmd_eval)

    q = sub.add_parser("report", help="markdown page from run folders, plots copied to <out dir>/img/",
                       formatter_class=fmt,
                       description="Write a markdown page with one section per run folder. An existing report page "
                                   "keeps everything but the sections of these run folders; any other existing "
                                   "file, or an image it did not make, is refused.")
    q.add_argument("run_dirs", nargs="+", help="run folders (with results.json)")
    q.add_argument("--out", default="docs/experiments.md", help="the markdown page")
    q.set_defaults(fn=cmd_report)

    q = sub.add_parser("download", help="download a dataset")
    q.add_argument("dataset", help="omniglot")
    q.add_argument("--dest", help="folder (default: $METAGRAD_DATA, else ~/.cache/metagrad/data)")
    q.set_defaults(fn=cmd_download)

    from metagrad.federated import commands

    commands.add_parser(sub, fmt)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of `metagrad`; returns the exit code."""
    from metagrad.train import TrainingInterrupted

    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser().parse_args(argv)
    args.argv = argv  # recorded in results.json, also when called from Python (benchmarks/)
    try:
        return args.fn(args)
    except (UsageError, KeyError, ValueError, FileNotFoundError, FileExistsError) as e:
        if os.environ.get("METAGRAD_DEBUG"):
            raise
        # KeyError's str() adds quotes; its message is its first argument.
        print(f"metagrad: error: {e.args[0] if isinstance(e, KeyError) and e.args else e}", file=sys.stderr)
        return EXIT_USAGE
    except (FloatingPointError, CommandError) as e:
        if os.environ.get("METAGRAD_DEBUG"):
            raise
        print(f"metagrad: error: {e}", file=sys.stderr)
        return 1
    except TrainingInterrupted as e:
        print(f"metagrad: {e}; continue with --resume", file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # outside meta-training (evaluation, plots): checkpoints so far are kept
        print("metagrad: interrupted; a run folder with checkpoints continues with --resume", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `metagrad list | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
