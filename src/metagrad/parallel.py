"""A process per core: each process adapts a slice of the meta-batch, and the meta-gradients are summed.

Why processes: on CPU the meta-iteration of a conv net is bound by memory-bound elementwise kernels
(batch norm, ReLU, pooling and their backward passes) that gain little from a second thread, while
two single-threaded processes on two cores each run at full speed (benchmarks/README.md).

`query_losses` here has the signature of `core.query_losses` and is what `path="...+parallel"` runs.
It returns the losses of all tasks `[tasks]` through one autograd node, so the algorithm's
`loss.backward()` works unchanged: in the forward pass every rank builds the graphs of its own
slice of tasks and the losses are all-reduced; in the backward pass every rank back-propagates
its slice with its part of the incoming gradient and the parameter gradients are all-reduced.

Two ways to run:
- one machine, no launcher: the first call forks `workers - 1` persistent processes (ranks 1..)
  that join the caller (rank 0) in a gloo group on localhost. Each forward call broadcasts the
  parameters and the batch to them. They live until `shutdown()` or the end of the program.
  Forking copies the model, the loss and the inner optimizer as they are at that moment (Linux, macOS).
- torchrun: torch.distributed is already initialised; every rank runs the same script on the same
  batch (same seed), takes its slice, and steps its own optimizer on identical gradients.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import multiprocessing
import os
import socket
import sys
import traceback
from collections.abc import Sequence
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

from metagrad import core
from metagrad.core import LossFn, Model, Params, TaskBatch
from metagrad.inner import InnerOptimizer

_pools: dict[tuple, _Pool] = {}


def default_workers() -> int:
    """One process per CPU core this process may run on (`METAGRAD_WORKERS` overrides)."""
    env = os.environ.get("METAGRAD_WORKERS")
    if env is not None:
        if not env.isdigit() or int(env) < 1:
            raise ValueError(f"METAGRAD_WORKERS must be a positive integer, got {env!r}")
        return int(env)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def task_slice(n_tasks: int, rank: int, world: int) -> slice:
    """The tasks of `rank`: contiguous, sizes differing by at most one."""
    lo = n_tasks * rank // world
    return slice(lo, n_tasks * (rank + 1) // world)


class _Comm:
    """The collectives used here, over a private gloo group (forked workers) or the default group (torchrun)."""

    def __init__(self, group: dist.ProcessGroup | None, rank: int, world: int) -> None:
        self.group, self.rank, self.world = group, rank, world

    def all_reduce(self, t: Tensor) -> None:
        if self.group is None:
            dist.all_reduce(t)
        else:
            self.group.allreduce([t]).wait()

    def broadcast_object(self, obj: object = None) -> object:
        """Rank 0's `obj` on every rank (torch.save bytes: tensors travel without a pickle of their storage)."""
        size = torch.zeros(1, dtype=torch.int64)
        if self.rank == 0:
            buf = io.BytesIO()
            torch.save(obj, buf)
            data = torch.frombuffer(bytearray(buf.getbuffer()), dtype=torch.uint8)
            size[0] = data.numel()
        self.group.broadcast(size, 0).wait()
        if self.rank != 0:
            data = torch.empty(int(size[0]), dtype=torch.uint8)
        self.group.broadcast(data, 0).wait()
        if self.rank == 0:
            return obj
        return torch.load(io.BytesIO(data.numpy().tobytes()), weights_only=False)


class _Slice:
    """One rank's part of a forward/backward pair: its tasks' graphs, kept until the backward pass."""

    def __init__(self, comm: _Comm, f: Model, loss_fn: LossFn, opt: InnerOptimizer,
                 names: Sequence[str] | None) -> None:
        self.comm, self.f, self.loss_fn, self.opt, self.names = comm, f, loss_fn, opt, names
        self.losses: Tensor | None = None
        self.rows: Tensor | None = None
        self.leaves: list[Tensor] = []

    def forward(self, params: Params, meta: dict[str, Tensor], batch: TaskBatch, steps: int, order: int,
                path: str, all_steps: bool) -> tuple[Tensor, Tensor]:
        """Losses and accuracies of all tasks (this rank's slice computed here, the rest all-reduced in)."""
        # Every parameter is a leaf that needs a gradient here: rank 0's flags do not travel to the workers.
        leaves = {n: p.detach().requires_grad_(True) for n, p in params.items()}
        saved = dict(self.opt.meta_params.items())
        # The inner optimizer reads its learned rates from meta_params: swap in this call's values as leaves.
        for k, v in meta.items():
            self.opt.meta_params[k] = torch.nn.Parameter(v.detach(), requires_grad=True)
        self.leaves = list(leaves.values()) + [self.opt.meta_params[k] for k in meta]
        sl = task_slice(len(batch), self.comm.rank, self.comm.world)
        shape = (len(batch), steps + 1) if all_steps else (len(batch),)
        first = next(iter(params.values()))
        full = torch.zeros((2,) + shape, dtype=first.dtype, device=first.device)
        self.losses, self.rows = None, None
        try:
            if sl.stop > sl.start:  # more processes than tasks leaves some ranks without work
                with torch.enable_grad():
                    if all_steps:
                        losses, accs = core.query_losses(self.f, self.loss_fn, leaves, batch[sl], self.opt, steps,
                                                         order, path, self.names, all_steps)
                        self.losses = losses
                    else:
                        losses, accs = self._per_task(leaves, batch[sl], steps, order, path)
                full[0, sl] = losses.detach()
                if accs is not None:
                    full[1, sl] = accs.to(full.dtype)
        finally:
            for k, v in saved.items():
                self.opt.meta_params[k] = v
        self.comm.all_reduce(full)
        return full[0], full[1]

    def _per_task(self, leaves: Params, part: TaskBatch, steps: int, order: int,
                  path: str) -> tuple[Tensor, Tensor | None]:
        """Each task's loss and, at once, its gradient (a row of `self.rows [tasks, n]`): one task's graph
        alive at a time, like the loop path, instead of the whole slice's until the backward pass."""
        rows, losses, accs = [], [], []
        for i in range(len(part)):
            loss, acc = core.query_losses(self.f, self.loss_fn, leaves, part[i], self.opt, steps, order, path,
                                          self.names)
            rows.append(self._flat(torch.autograd.grad(loss[0], self.leaves, allow_unused=True)))
            losses.append(loss.detach())
            accs.append(acc)
        self.rows = torch.stack(rows)
        return torch.cat(losses), (torch.cat(accs) if accs[0] is not None else None)

    def _flat(self, grads: Sequence[Tensor | None]) -> Tensor:
        return torch.cat([(torch.zeros_like(leaf) if g is None else g).reshape(-1)
                          for leaf, g in zip(self.leaves, grads)])

    def backward(self, grad_losses: Tensor) -> list[Tensor]:
        """Gradients of `sum(grad_losses * losses)` with respect to the leaves, summed over the ranks."""
        sl = task_slice(len(grad_losses), self.comm.rank, self.comm.world)
        if self.rows is not None:  # linearity: the weighted sum of the per-task gradients
            flat = grad_losses[sl].to(self.rows.dtype) @ self.rows
        elif self.losses is not None:
            flat = self._flat(torch.autograd.grad(self.losses, self.leaves, grad_losses[sl], allow_unused=True))
        else:
            flat = self._flat([None] * len(self.leaves))
        self.comm.all_reduce(flat)
        shapes = [leaf.shape for leaf in self.leaves]
        self.losses, self.rows, self.leaves = None, None, []
        return [t.view(shape) for t, shape in zip(torch.split(flat, [s.numel() for s in shapes]), shapes)]


class _Pool:
    """Rank 0 of a gloo group of forked worker processes that stay alive across meta-steps."""

    def __init__(self, f: Model, loss_fn: LossFn, opt: InnerOptimizer, names: Sequence[str] | None,
                 workers: int) -> None:
        if "fork" not in multiprocessing.get_all_start_methods():
            raise RuntimeError("path option 'parallel' without torchrun needs the 'fork' start method (Linux, "
                               "macOS); on this system launch with torchrun instead")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        ctx = multiprocessing.get_context("fork")
        threads = max(1, torch.get_num_threads() // workers)
        self.procs = [ctx.Process(target=_worker, args=(rank, workers, port, threads, f, loss_fn, opt, names),
                                  daemon=True) for rank in range(1, workers)]
        for p in self.procs:
            p.start()
        store = dist.TCPStore("127.0.0.1", port, workers, is_master=True, timeout=timedelta(seconds=60))
        group = dist.ProcessGroupGloo(store, 0, workers, timedelta(minutes=30))
        self.store, self.comm = store, _Comm(group, 0, workers)
        self.slice = _Slice(self.comm, f, loss_fn, opt, names)

    def kill(self) -> None:
        for p in self.procs:
            p.terminate()
            p.join(timeout=10)

    def close(self) -> None:
        try:
            self.comm.broadcast_object(("stop", None))
        except Exception:  # noqa: BLE001 - a worker already died (its error went to stderr): terminate below
            pass  # a worker already died; its error went to stderr
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()


def _worker(rank: int, world: int, port: int, threads: int, f: Model, loss_fn: LossFn, opt: InnerOptimizer,
            names: Sequence[str] | None) -> None:
    """Ranks 1..: wait for rank 0's commands and run this rank's slice of every forward and backward."""
    torch.set_num_threads(threads)
    try:
        store = dist.TCPStore("127.0.0.1", port, world, is_master=False, timeout=timedelta(seconds=60))
        comm = _Comm(dist.ProcessGroupGloo(store, rank, world, timedelta(minutes=30)), rank, world)
        part = _Slice(comm, f, loss_fn, opt, names)
        while True:
            cmd, payload = comm.broadcast_object()
            if cmd == "stop":
                return
            if cmd == "forward":
                part.forward(**payload)
            elif cmd == "backward":
                part.backward(payload)
    except Exception:  # noqa: BLE001 - the worker's only way to report is stderr; rank 0 then fails its collective
        traceback.print_exc(file=sys.stderr)
        os._exit(1)


@contextlib.contextmanager
def _guard(run: dict):
    """An error on rank 0 mid-protocol leaves the workers waiting in a collective: end that pool, re-raise."""
    try:
        yield
    except BaseException:
        pool = run["pool"]
        if pool is not None:
            for key, p in list(_pools.items()):
                if p is pool:
                    del _pools[key]
            pool.kill()
        raise


@contextlib.contextmanager
def _threads(run: dict):
    """While rank 0 computes its slice of a forked pool, it has its share of the threads, like each worker."""
    before = torch.get_num_threads()
    if run["pool"] is not None:
        torch.set_num_threads(max(1, before // run["pool"].comm.world))
    try:
        yield
    finally:
        torch.set_num_threads(before)


class _ParallelLosses(torch.autograd.Function):
    """One autograd node for the whole meta-batch: forward and backward run on all ranks."""

    @staticmethod
    def forward(ctx, run: dict, *tensors: Tensor) -> tuple[Tensor, Tensor]:
        part: _Slice = run["slice"]
        n = len(run["param_names"])
        params = dict(zip(run["param_names"], tensors[:n]))
        meta = dict(zip(run["meta_names"], tensors[n:]))
        args = dict(params=params, meta=meta, batch=run["batch"], steps=run["steps"], order=run["order"],
                    path=run["path"], all_steps=run["all_steps"])
        with _guard(run), _threads(run):
            if run["pool"] is not None:
                run["pool"].comm.broadcast_object(("forward", {k: _detached(v) for k, v in args.items()}))
            losses, accs = part.forward(**args)
        ctx.run = run
        ctx.mark_non_differentiable(accs)
        return losses, accs

    @staticmethod
    def backward(ctx, grad_losses: Tensor, grad_accs: Tensor) -> tuple:
        run = ctx.run
        grad_losses = grad_losses.contiguous()
        with _guard(run), _threads(run):
            if run["pool"] is not None:
                run["pool"].comm.broadcast_object(("backward", grad_losses))
            grads = run["slice"].backward(grad_losses)
        return (None, *grads)


def _detached(v: object) -> object:
    if isinstance(v, Tensor):
        return v.detach()
    if isinstance(v, dict):
        return {k: _detached(t) for k, t in v.items()}
    if isinstance(v, TaskBatch):
        return TaskBatch(*v.tensors())
    return v


def query_losses(
    f: Model, loss_fn: LossFn, params: Params, batch: TaskBatch, opt: InnerOptimizer, steps: int, order: int,
    base: str, options: frozenset[str], names: Sequence[str] | None = None, all_steps: bool = False,
    workers: int | None = None,
) -> tuple[Tensor, Tensor | None]:
    """`core.query_losses` with the tasks split over processes; `base`/`options` are each slice's path."""
    path = "+".join([base, *sorted(options)])
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if world > 1:  # torchrun: any device, the job's own backend (gloo, or nccl for one GPU per rank)
        pool, part = None, _Slice(_Comm(None, dist.get_rank(), world), f, loss_fn, opt, names)
    else:
        if any(t.device.type != "cpu" for t in batch.tensors()):
            raise ValueError("path option 'parallel' without torchrun forks CPU processes, but the batch is on "
                             f"{batch.support_x.device}: launch one process per GPU with torchrun instead")
        workers = workers or default_workers()
        # By identity; the pool holds these objects, so their ids are not reused while it lives.
        key = (id(f), id(loss_fn), id(opt), tuple(names) if names is not None else None, workers)
        if key not in _pools:
            _pools[key] = _Pool(f, loss_fn, opt, names, workers)
        pool = _pools[key]
        part = pool.slice
    meta_names = list(opt.meta_params.keys())
    run = dict(slice=part, pool=pool, param_names=list(params), meta_names=meta_names, batch=batch,
               steps=steps, order=order, path=path, all_steps=all_steps)
    losses, accs = _ParallelLosses.apply(run, *params.values(), *(opt.meta_params[k] for k in meta_names))
    classify = not batch.query_y.is_floating_point()
    return losses, (accs if classify else None)


def worker_pids() -> list[int]:
    """Process ids of the forked workers alive now (e.g. to measure their memory)."""
    return [p.pid for pool in _pools.values() for p in pool.procs if p.is_alive()]


def shutdown() -> None:
    """Stop the forked worker processes (they also stop when the program ends)."""
    while _pools:
        _, pool = _pools.popitem()
        pool.close()


atexit.register(shutdown)
