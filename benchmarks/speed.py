"""Seconds and memory per meta-iteration: metagrad's execution paths against learn2learn, higher and TorchOpt.

One meta-iteration = adapt each of `meta_batch` tasks (`inner_steps` SGD steps on its support set)
and accumulate the meta-gradient of the mean query loss into `.grad`: the work of MAML's outer step,
without the optimizer update (the same for every library). Every implementation runs the same
`nn.Module`, the same initial weights and the same tasks; their gradients are compared in float64
against a plain torch.func loop before anything is timed.

Models (synthetic data, so nothing to download):
- sinusoid:        the 1-40-40-1 ReLU MLP, 10 support and 10 query points per task (Finn et al. 5.1).
- omniglot-max:    Conv4 with 2x2 max-pooling (MAML's MiniImageNet net; learn2learn's and higher's
                   Omniglot examples), 5-way 1-shot, 15 query per class, 28x28 images.
- omniglot-stride: Conv4 with stride-2 convolutions (the MAML paper's Omniglot net), same tasks.

The floor: in the same run, alternating with the others, one forward and backward pass of the same network
over the same images (each task's support and query images as one batch, as ../shared/notes/compute_floor.py):
the work no meta-learner can avoid. `x floor` is each row's median over the floor's.

Timing: implementations alternate within each repeat; the median is printed. Peers run with
all the process's threads (torch's default); `parallel` paths run one process per core, one
thread each: the sharded meta-gradient of a torchrun job (`metagrad.distributed`) on forked
ranks, so `metagrad loop` against `metagrad parallel` is 1 rank against 2 on a 2-core machine.
Memory: the peak resident memory added during one meta-iteration, summed over the process and
its workers: freed heap is first returned to the OS (`malloc_trim`), then the kernel's peak-RSS
counter is reset (`/proc/PID/clear_refs`) and read after the iteration (`VmHWM`). torch's CPU
tensors live in malloc'd memory that tracemalloc does not see, hence this measure.

    python benchmarks/speed.py                       # everything, ~5 min on 2 idle cores
    python benchmarks/speed.py --quick               # 8 tasks, 2 repeats: a smoke run
    python benchmarks/speed.py --model omniglot-max --order 2 --peers learn2learn torchopt
    python benchmarks/speed.py --model omniglot-max --order 2 --meta-batch 32 --paths loop parallel  # 1 vs 2 ranks
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import importlib.abc
import importlib.util
import io
import json
import os
import statistics
import sys
import time
import types
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call

from metagrad import TaskBatch, core, distributed, paths
from metagrad.algorithms import MAML
from metagrad.algorithms.base import TIMED_RUNS
from metagrad.models import MLP, Conv4
from metagrad.tasks import Sinusoid

PEERS = ("learn2learn", "higher", "torchopt", "torchfunc-loop")
MODELS = ("sinusoid", "omniglot-max", "omniglot-stride")
Step = Callable[[TaskBatch], None]


# -- the problems ---------------------------------------------------------------------------------
def problem(name: str, meta_batch: int, dtype: torch.dtype) -> tuple[nn.Module, TaskBatch, Callable, float]:
    """Model (seed 0), a task batch (seed 0), the loss and the inner learning rate."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if name == "sinusoid":
        model = MLP((1, 40, 40, 1))
        batch = Sinusoid(shots=10, query_shots=10).sample(meta_batch, gen)
        return model.to(dtype), batch.to(dtype=dtype), nn.functional.mse_loss, 0.01
    model, batch = conv_tasks("max" if name == "omniglot-max" else "stride", 5, 1, 15, meta_batch)
    return model.to(dtype), batch.to(dtype=dtype), nn.functional.cross_entropy, 0.4


def conv_tasks(pool: str, ways: int, shots: int, query: int, meta_batch: int) -> tuple[nn.Module, TaskBatch]:
    """An Omniglot Conv4 (seed 0) and `meta_batch` tasks of random 28x28 images (seed 0), `query` per class."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = Conv4(ways, 1, 64, pool=pool)
    sx = torch.rand(meta_batch, ways * shots, 1, 28, 28, generator=gen)  # [tasks, ways * shots, 1, 28, 28]
    qx = torch.rand(meta_batch, ways * query, 1, 28, 28, generator=gen)
    sy = torch.arange(ways).repeat_interleave(shots).repeat(meta_batch, 1)
    qy = torch.arange(ways).repeat_interleave(query).repeat(meta_batch, 1)
    return model, TaskBatch(sx, sy, qx, qy)


# -- the peers: each accumulates mean-over-tasks meta-gradients into model's .grad ------------------
class _StubModule(types.ModuleType):
    """A stand-in package: every attribute is an empty class (learn2learn subclasses some at import)."""

    __path__: list[str] = []

    def __getattr__(self, name: str) -> type:
        if name.startswith("__"):
            raise AttributeError(name)
        return type(name, (), {})


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):  # noqa: ANN001 - importlib protocol
        if name == "torchvision" or name.startswith("torchvision."):
            return importlib.util.spec_from_loader(name, self)
        return None

    def create_module(self, spec):  # noqa: ANN001
        return _StubModule(spec.name)

    def exec_module(self, module) -> None:  # noqa: ANN001
        pass


def _stub_torchvision() -> None:
    """learn2learn imports torchvision, whose only build for torch 2.13 is a CUDA one that fails to load
    beside the CPU torch; its MAML needs none of it (../shared/notes/peers.md)."""
    if not any(isinstance(f, _StubFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _StubFinder())


def import_learn2learn() -> types.ModuleType:
    """learn2learn, imported beside the torchvision stub and quietly (its gym import prints a deprecation notice)."""
    _stub_torchvision()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        import learn2learn

    return learn2learn


def learn2learn_step(model: nn.Module, loss_fn: Callable, inner_lr: float, steps: int, order: int) -> Step:
    l2l = import_learn2learn()
    maml = l2l.algorithms.MAML(model, lr=inner_lr, first_order=order == 1)

    def step(batch: TaskBatch) -> None:
        for i in range(len(batch)):
            learner = maml.clone()
            for _ in range(steps):
                learner.adapt(loss_fn(learner(batch.support_x[i]), batch.support_y[i]))
            (loss_fn(learner(batch.query_x[i]), batch.query_y[i]) / len(batch)).backward()

    return step


def higher_step(model: nn.Module, loss_fn: Callable, inner_lr: float, steps: int, order: int) -> Step:
    import higher

    opt = torch.optim.SGD(model.parameters(), lr=inner_lr)
    params = list(model.parameters())

    def step(batch: TaskBatch) -> None:
        for i in range(len(batch)):
            with higher.innerloop_ctx(model, opt, copy_initial_weights=False,
                                      track_higher_grads=order == 2) as (fmodel, diffopt):
                for _ in range(steps):
                    diffopt.step(loss_fn(fmodel(batch.support_x[i]), batch.support_y[i]))
                loss = loss_fn(fmodel(batch.query_x[i]), batch.query_y[i]) / len(batch)
                if order == 2:
                    loss.backward()
                else:
                    # First order in higher: the query gradient at the adapted (detached) weights.
                    for p, g in zip(params, torch.autograd.grad(loss, fmodel.parameters())):
                        p.grad = g if p.grad is None else p.grad + g

    return step


def torchopt_step(model: nn.Module, loss_fn: Callable, inner_lr: float, steps: int, order: int) -> Step:
    import torchopt

    names = [n for n, _ in model.named_parameters()]
    params = tuple(model.parameters())
    opt = torchopt.sgd(lr=inner_lr)

    def step(batch: TaskBatch) -> None:
        for i in range(len(batch)):
            p, state = params, opt.init(params)
            for _ in range(steps):
                loss = loss_fn(functional_call(model, dict(zip(names, p)), (batch.support_x[i],)), batch.support_y[i])
                grads = torch.autograd.grad(loss, p, create_graph=order == 2)
                updates, state = opt.update(grads, state, inplace=False)
                p = torchopt.apply_updates(p, updates, inplace=False)
            loss = loss_fn(functional_call(model, dict(zip(names, p)), (batch.query_x[i],)), batch.query_y[i])
            (loss / len(batch)).backward()

    return step


def torchfunc_loop_step(model: nn.Module, loss_fn: Callable, inner_lr: float, steps: int, order: int) -> Step:
    names = [n for n, _ in model.named_parameters()]

    def step(batch: TaskBatch) -> None:
        for i in range(len(batch)):
            p = dict(model.named_parameters())
            for _ in range(steps):
                loss = loss_fn(functional_call(model, p, (batch.support_x[i],)), batch.support_y[i])
                grads = torch.autograd.grad(loss, list(p.values()), create_graph=order == 2)
                p = {n: t - inner_lr * g for (n, t), g in zip(p.items(), grads)}
            (loss_fn(functional_call(model, p, (batch.query_x[i],)), batch.query_y[i]) / len(batch)).backward()

    del names
    return step


PEER_STEPS = {"learn2learn": learn2learn_step, "higher": higher_step, "torchopt": torchopt_step,
              "torchfunc-loop": torchfunc_loop_step}
FLOOR = "floor: forward+backward"


def floor_step(model: nn.Module, loss_fn: Callable) -> Step:
    """One forward and backward pass over every image of the meta-batch, each task's support and query
    images `[shots + query_shots, ...]` as one batch: the compute no meta-learner can avoid."""
    def step(batch: TaskBatch) -> None:
        for i in range(len(batch)):
            x = torch.cat([batch.support_x[i], batch.query_x[i]])
            y = torch.cat([batch.support_y[i], batch.query_y[i]])
            (loss_fn(model(x), y) / len(batch)).backward()

    return step


def ours_step(model: nn.Module, loss_fn: Callable, inner_lr: float, steps: int, order: int, path: str) -> Step:
    alg = MAML(model, inner_lr=inner_lr, inner_steps=steps, order=order, loss_fn=loss_fn, path=path)

    def step(batch: TaskBatch) -> None:
        alg.meta_backward(batch)

    step.algorithm = alg  # type: ignore[attr-defined]  # for settle()
    return step


def settle(step: Step, batch: TaskBatch) -> str | None:
    """Run our step until `auto` has timed its candidate paths and chosen one; the path it runs."""
    alg = getattr(step, "algorithm", None)
    if alg is None:
        return None
    for _ in range(2 * (TIMED_RUNS + 1) * 2):
        if len(alg.tuned_paths) or len(core.path_candidates(alg.model, alg.order, alg.device(), alg.path)) == 1:
            break
        step(batch)
    return alg._path_for(batch)


def our_paths(model_name: str, order: int, device: torch.device | None = None) -> list[str]:
    """The paths worth timing for this model: auto, and the options of core.choose_path."""
    if device is not None and device.type == "cuda":  # forked CPU workers ('parallel') have no place on one GPU
        return ["auto", "loop", "vmap"]
    if model_name == "sinusoid":
        return ["auto", "loop"]
    # auto times loop and vmap on this batch and keeps the faster (settle() lets it choose before timing);
    # vmap runs torch BatchNorm written out (core.for_vmap). Not by default, to stay near 5 minutes
    # (time them with --paths): loop+bf16, loop+cl (slower here, README).
    return ["auto", "vmap", "parallel", "parallel+bf16"]


# -- measuring ------------------------------------------------------------------------------------
def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def grads_of(model: nn.Module, step: Step, batch: TaskBatch) -> Tensor:
    model.zero_grad(set_to_none=True)
    step(batch)
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in model.parameters()])


def rel_err(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _status(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def peak_memory(step: Step, batch: TaskBatch, model: nn.Module) -> float | None:
    """Peak resident bytes added by one meta-iteration, over this process and its parallel workers (Linux); on
    CUDA the peak of allocated device memory above what was allocated before."""
    device = next(model.parameters()).device
    if device.type == "cuda":
        model.zero_grad(set_to_none=True)
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step(batch)
        sync(device)
        return torch.cuda.max_memory_allocated(device) - before
    if not os.path.exists("/proc/self/clear_refs"):
        return None
    model.zero_grad(set_to_none=True)
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    pids = [os.getpid(), *distributed.worker_pids()]
    base = {}
    for pid in pids:
        with contextlib.suppress(OSError):
            base[pid] = _status(pid, "VmRSS")
            with open(f"/proc/{pid}/clear_refs", "w") as fh:
                fh.write("5")  # reset the peak-RSS counter VmHWM to the current RSS
    step(batch)
    return sum(_status(pid, "VmHWM") - b for pid, b in base.items())


def run(model_name: str, order: int, args: argparse.Namespace) -> list[dict]:
    """Check gradients in float64, then time every implementation; returns one row per implementation."""
    impls: dict[str, Callable[[nn.Module, Callable, float], Step]] = {}
    for peer in args.peers:
        impls[peer] = lambda m, lf, lr, peer=peer: PEER_STEPS[peer](m, lf, lr, args.inner_steps, order)
    device = torch.device(args.device)
    for path in args.paths or our_paths(model_name, order, device):
        impls[f"metagrad {path}"] = lambda m, lf, lr, path=path: ours_step(m, lf, lr, args.inner_steps, order, path)

    def on_device(model: nn.Module, batch: TaskBatch, *rest: object) -> tuple:
        return (model.to(device), batch.to(device), *rest)

    # Gradients: float64, against the plain torch.func loop; float32 (and bf16) against float64 too.
    model64, batch64, loss_fn, inner_lr = on_device(*problem(model_name, args.check_tasks, torch.float64))
    reference = grads_of(model64, torchfunc_loop_step(model64, loss_fn, inner_lr, args.inner_steps, order), batch64)
    model32, batch32, _, _ = on_device(*problem(model_name, args.check_tasks, torch.float32))
    errs = {}
    for name, make in impls.items():
        log(f"{model_name} order {order}: gradient check of {name}")
        e64 = rel_err(grads_of(model64, make(model64, loss_fn, inner_lr), batch64), reference)
        e32 = rel_err(grads_of(model32, make(model32, loss_fn, inner_lr), batch32).double(), reference)
        errs[name] = (e64, e32)
        distributed.shutdown()

    model, batch, _, _ = on_device(*problem(model_name, args.meta_batch, torch.float32))
    steps = {name: make(model, loss_fn, inner_lr) for name, make in impls.items()}
    steps[FLOOR] = floor_step(model, loss_fn)
    errs[FLOOR] = (None, None)
    for name in list(steps):
        chosen = settle(steps[name], batch)
        if name == "metagrad auto" and chosen:
            steps[f"metagrad auto ({chosen})"] = steps.pop(name)
            errs[f"metagrad auto ({chosen})"] = errs.pop(name)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(args.repeats + 1):  # the first round warms up (and starts the parallel workers)
        log(f"{model_name} order {order}: timing round {r} of {args.repeats}")
        for name, step in steps.items():
            model.zero_grad(set_to_none=True)
            sync(device)
            t = time.perf_counter()
            step(batch)
            sync(device)
            times[name].append(time.perf_counter() - t)
    memory = {name: peak_memory(step, batch, model) for name, step in steps.items()}
    distributed.shutdown()

    med = {name: statistics.median(ts[1:]) for name, ts in times.items()}
    peers = [med[p] for p in args.peers]
    fastest_peer = min(peers) if peers else None
    floor = med[FLOOR]
    rows = []
    for name in steps:
        rows.append(dict(model=model_name, order=order, impl=name, seconds=med[name],
                         spread=(min(times[name][1:]), max(times[name][1:])),
                         memory_mb=None if memory[name] is None else memory[name] / 2**20,
                         speedup=None if fastest_peer is None else fastest_peer / med[name],
                         over_floor=med[name] / floor, err64=errs[name][0], err32=errs[name][1]))
    return rows


def print_rows(rows: list[dict]) -> None:
    head = f"{'model':16s} {'ord':>3s} {'implementation':24s} {'s/iter':>8s} {'min-max':>13s} {'peak MB':>8s} " \
           f"{'x fastest peer':>14s} {'x floor':>7s} {'grad err f64':>12s} {'grad err f32':>12s}"
    print(head)
    print("-" * len(head))
    for r in rows:
        mem = "-" if r["memory_mb"] is None else f"{r['memory_mb']:.0f}"
        speed = "-" if r["speedup"] is None else f"{r['speedup']:.2f}"
        e64, e32 = ("-" if e is None else f"{e:.1e}" for e in (r["err64"], r["err32"]))
        print(f"{r['model']:16s} {r['order']:>3d} {r['impl']:24s} {r['seconds']:8.3f} "
              f"{r['spread'][0]:6.2f}-{r['spread'][1]:<6.2f} {mem:>8s} {speed:>14s} {r['over_floor']:7.2f} "
              f"{e64:>12s} {e32:>12s}")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> None:
    """Parse flags, run the benchmark grid, print the table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", nargs="+", choices=MODELS + ("all",), default=["all"])
    p.add_argument("--order", nargs="+", type=int, choices=(1, 2), default=[2, 1])
    p.add_argument("--peers", nargs="*", choices=PEERS, default=list(PEERS))
    p.add_argument("--paths", nargs="*", help="metagrad paths to time (default: the ones that fit the model)")
    p.add_argument("--meta-batch", type=int, default=32)
    p.add_argument("--inner-steps", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--check-tasks", type=int, default=2, help="tasks in the float64 gradient check")
    p.add_argument("--quick", action="store_true", help="8 tasks, 2 repeats: a smoke run")
    p.add_argument("--device", default="cpu", help="cpu or cuda (peers and paths run there alike)")
    p.add_argument("--json", help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: CUDA is not available here (torch {torch.__version__})")
    if args.quick:
        args.meta_batch, args.repeats, args.check_tasks = 8, 2, 2
    models = MODELS if "all" in args.model else tuple(args.model)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {paths.default_workers()} cores; "
          f"meta-batch {args.meta_batch}, inner steps {args.inner_steps}, {args.repeats} repeats (median); "
          f"load {os.getloadavg()[0]:.2f}; CPU kernels {torch.backends.cpu.get_cpu_capability()}, oneDNN bf16 "
          f"{'yes' if paths.cpu_has_fast_bf16() else 'NO (bf16 convolutions fall back to a slow kernel)'}")
    rows = []
    for model_name in models:
        for order in args.order:
            new = run(model_name, order, args)
            print_rows(new)
            rows += new
    if len(rows) > len(new):
        print("\nall:")
        print_rows(rows)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"torch": torch.__version__, "device": args.device, "threads": torch.get_num_threads(),
                       "meta_batch": args.meta_batch, "inner_steps": args.inner_steps, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
