"""The `metagrad` command: run named experiments, train, evaluate, list, report, download data.

    metagrad run [NAME] [--set key=value ...]     a named experiment (default: sinusoid, ~20 s)
    metagrad train --algorithm maml --tasks sinusoid --inner-lr 0.01 --iterations 1000 ...
    metagrad eval runs/NAME/checkpoint.safetensors         re-evaluate a checkpoint on held-out tasks
    metagrad list                                 experiments, algorithms, task families
    metagrad report runs/a runs/b --out docs/experiments.md
    metagrad download omniglot

Every run writes a folder (`runs/<name>`, or `--out`): config.json, metrics.jsonl, checkpoint.safetensors,
results.json, PNG plots. Bad names and config keys are one-line errors with exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from metagrad.runs import Run, has_checkpoints

EXIT_USAGE = 2


class UsageError(Exception):
    """A bad name, key or value given by the user: printed as one line, exit code 2."""


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
    time_budget: float | None = None
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


def cmd_run(args: argparse.Namespace) -> int:
    from metagrad.experiments import get

    exp = get(args.name)
    out = Path(args.out or Path("runs") / args.name)
    overrides = {**(read_config_file(args.config) if args.config else {}), **parse_sets(args.set)}
    fields = {f.name for f in dataclasses.fields(exp.config_cls)}
    for flag in ("seed", "device"):
        value = getattr(args, flag)
        if value is not None:
            if flag not in fields:
                raise UsageError(f"experiment {args.name!r} has no {flag} option")
            overrides[flag] = value
    check_resume(out, args.resume)
    cfg = resolve(exp.config_cls, saved_config(out, args.resume), overrides, f"experiment {args.name!r}")
    run = Run(out, dataclasses.asdict(cfg), resume=args.resume, overwrite=args.overwrite)
    t0 = time.time()
    results = exp.fn(cfg, run)
    finish(run, results, exp.name, exp.summary, t0, args.argv)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from metagrad.evaluation import evaluate
    from metagrad.train import build, build_tasks, check_lr_schedule, meta_train

    flags = {k: v for k, v in vars(args).items() if k in {f.name for f in dataclasses.fields(TrainConfig)}}
    overrides = {**(read_config_file(args.config) if args.config else {}), **parse_sets(args.set), **flags}
    default = TrainConfig()
    out = Path(args.out or Path("runs") / f"train-{overrides.get('algorithm', default.algorithm)}-"
                                          f"{overrides.get('tasks', default.tasks)}")
    check_resume(out, args.resume)
    cfg = resolve(TrainConfig, saved_config(out, args.resume), overrides, "metagrad train")
    name = f"train-{cfg.algorithm}-{cfg.tasks}"
    check_lr_schedule(cfg.outer_lr, cfg.lr_schedule, cfg.min_outer_lr)  # before the run folder is made
    spec = cfg.spec()
    algorithm, tasks = build(spec, seed=cfg.seed)
    val_tasks = build_tasks(spec, split="val") if cfg.val_every > 0 else None
    test_tasks = build_tasks(spec, split="test")
    run = Run(out, dataclasses.asdict(cfg), resume=args.resume, overwrite=args.overwrite)
    t0 = time.time()
    trained = meta_train(algorithm, tasks, cfg.iterations, cfg.meta_batch, cfg.outer_lr, run=run, seed=cfg.seed,
                         val_tasks=val_tasks, val_every=cfg.val_every, val_n_tasks=cfg.val_tasks,
                         log_every=cfg.log_every, checkpoint_every=cfg.checkpoint_every,
                         time_budget=cfg.time_budget, device=cfg.device, spec=spec, progress=not args.no_progress,
                         desc=cfg.algorithm, lr_schedule=cfg.lr_schedule, min_outer_lr=cfg.min_outer_lr)
    # Held-out tasks from the generator `metagrad eval` uses too: the same numbers when re-evaluated.
    result = evaluate(algorithm, test_tasks, cfg.eval_tasks, cfg.eval_steps,
                      torch.Generator().manual_seed(cfg.seed + 10_000))
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


def cmd_eval(args: argparse.Namespace) -> int:
    from metagrad.runs import atomic_write_json
    from metagrad.train import evaluate_checkpoint

    path = Path(args.checkpoint)
    if not path.exists():
        raise UsageError(f"checkpoint {path} does not exist")
    _, result = evaluate_checkpoint(path, args.n_tasks, args.steps, args.seed, args.split, args.device)
    print(result)
    print("curve over inner steps: " + ", ".join(f"{m:.4g}" for m in result.curve))
    folder = path if path.is_dir() else path.parent
    atomic_write_json(folder / "eval.json", {**result.as_dict(), "checkpoint": str(path), "split": args.split,
                                             "seed": args.seed})
    print(f"written: {folder / 'eval.json'}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from metagrad.report import render

    print(f"written: {render(args.run_dirs, args.out)}")
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    import importlib

    if args.dataset != "omniglot":
        raise UsageError(f"unknown dataset {args.dataset!r}; known: omniglot")
    module = importlib.import_module("metagrad.tasks.omniglot")
    if not hasattr(module, "download"):
        raise UsageError("this version of metagrad.tasks.omniglot has no download()")
    dest = module.download(args.dest) if args.dest else module.download()
    print(f"omniglot is in {dest}")
    return 0


# -- argument parsing --------------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    """The argument parser of `metagrad`."""
    p = argparse.ArgumentParser(prog="metagrad", description="Fast, model-agnostic meta-learning on torch.func.")
    sub = p.add_subparsers(dest="command", required=True)

    def run_flags(q: argparse.ArgumentParser) -> None:
        q.add_argument("--out", help="run folder (default runs/<name>)")
        q.add_argument("--resume", action="store_true", help="continue the run in the folder from its checkpoint")
        q.add_argument("--overwrite", action="store_true", help="replace a finished run in the folder")
        q.add_argument("--config", help="a .json or .toml file of config keys")
        q.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")

    q = sub.add_parser("list", help="experiments, algorithms and task families")
    q.set_defaults(fn=cmd_list)

    q = sub.add_parser("run", help="run a named experiment (default: sinusoid)")
    q.add_argument("name", nargs="?", default="sinusoid")
    run_flags(q)
    q.add_argument("--seed", type=int)
    q.add_argument("--device")
    q.set_defaults(fn=cmd_run)

    q = sub.add_parser("train", help="meta-train an algorithm on a task family")
    run_flags(q)
    q.add_argument("--no-progress", action="store_true", help="no progress bar")
    types = {"inner_lr": float, "inner_steps": int, "order": int, "shots": int, "query_shots": int, "ways": int,
             "meta_batch": int, "iterations": int, "outer_lr": float, "lr_schedule": str,
             "min_outer_lr": float, "val_every": int, "val_tasks": int,
             "eval_tasks": int, "eval_steps": int, "log_every": int, "checkpoint_every": int,
             "time_budget": float, "seed": int, "algorithm": str, "tasks": str, "model": str, "device": str}
    for key, kind in types.items():
        # SUPPRESS: only flags the user gave override the config file and a resumed run's config.
        q.add_argument("--" + key.replace("_", "-"), dest=key, type=kind, default=argparse.SUPPRESS)
    q.set_defaults(fn=cmd_train)

    q = sub.add_parser("eval", help="re-evaluate a checkpoint (or run folder) on held-out tasks")
    q.add_argument("checkpoint")
    q.add_argument("--n-tasks", type=int, default=1000)
    q.add_argument("--steps", type=int, help="inner steps (default: the algorithm's inner_steps)")
    q.add_argument("--seed", type=int, default=None, help="test-task seed (default: the run's seed)")
    q.add_argument("--split", default="test")
    q.add_argument("--device", default="cpu")
    q.set_defaults(fn=cmd_eval)

    q = sub.add_parser("report", help="markdown page from run folders, plots copied to <out dir>/img/")
    q.add_argument("run_dirs", nargs="+")
    q.add_argument("--out", default="docs/experiments.md")
    q.set_defaults(fn=cmd_report)

    q = sub.add_parser("download", help="download a dataset")
    q.add_argument("dataset")
    q.add_argument("--dest", help="folder (default: the dataset's default location)")
    q.set_defaults(fn=cmd_download)
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
    except FloatingPointError as e:
        print(f"metagrad: error: {e}", file=sys.stderr)
        return 1
    except TrainingInterrupted as e:
        print(f"metagrad: {e}; continue with --resume", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `metagrad list | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
