"""Meta-batches sharded over processes: torchrun ranks, or forked local processes (path option 'parallel').

How a meta-batch is split (so that the global batch equals the single-process one): every rank draws
the same global batch from the run's seed (sampling is a small part of an iteration) and takes its
contiguous shard of tasks, `task_slice(tasks, rank, world)`. Each rank computes the meta-gradient of
its shard, weighted by its share of the tasks, and one all-reduce sums them: every rank then holds
the meta-gradient of the whole batch, takes the same optimizer step, and stays bit-identical to the
others without any broadcast of parameters. No DDP: torch.func with DDP's BatchNorm buffers breaks
(pytorch issue 130932). Gloo on CPU, NCCL on GPU (one GPU per rank), chosen by `init_from_env`.

The path `auto` picks by timing is rank 0's, broadcast after every iteration, so all ranks run the
same path. Only rank 0 writes (`is_writer`); `metagrad train` under torchrun does this for you.

`LocalGroup` is the launcher behind path option 'parallel' on one machine without torchrun: it forks
one process per core (ranks 1..) that join the caller (rank 0) in a private gloo group on 127.0.0.1,
and runs this same sharded meta-gradient on them. The workers belong to the algorithm: `close()`
(or `with algorithm:`) stops them, and so does the algorithm's collection or the program's end.
"""

from __future__ import annotations

import atexit
import json
import multiprocessing
import os
import socket
import sys
import traceback
import weakref
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_unflatten, treespec_dumps, treespec_loads

from metagrad.core import ExecPath, TaskBatch, Tasks
from metagrad.paths import default_workers

TIMEOUT_S = float(os.environ.get("METAGRAD_DIST_TIMEOUT", "300"))  # a dead peer ends a collective by then


def world() -> int:
    """World size of an initialised torch.distributed job (torchrun), else 1."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank in an initialised torch.distributed job, else 0."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_writer() -> bool:
    """True on the one process that writes run folders, logs and checkpoints: rank 0."""
    return rank() == 0


def init_from_env(device: str | torch.device = "cpu") -> bool:
    """Join the torchrun job described by the environment (WORLD_SIZE > 1): gloo on CPU, NCCL on CUDA.
    Returns True if this process is part of a multi-process job."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if dist.is_initialized():
        return True
    device = torch.device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=timedelta(seconds=TIMEOUT_S))
    atexit.register(leave)
    return True


def leave() -> None:
    """Leave the torchrun job (destroy this process's group); nothing if none is joined."""
    # A process that exits with its group up can abort in C++ at interpreter teardown, gloo's threads still
    # holding work ("terminate called without an active exception", SIGABRT: a finished rank of a
    # `metagrad train` job did so on 2026-12-02; pytorch issue 190489). Run at exit, before teardown.
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def task_slice(n_tasks: int, rank: int, world: int) -> slice:
    """The tasks of `rank`: contiguous, sizes differing by at most one."""
    lo = n_tasks * rank // world
    return slice(lo, n_tasks * (rank + 1) // world)


def _reduce(alg: Any, batch: Any, iteration: int, path: ExecPath | None, rank_: int, world_: int,
            all_reduce: Any) -> Any:
    """This rank's shard's meta-gradient, weighted by its share, summed over the ranks by `all_reduce`."""
    from metagrad.algorithms.base import MetaGradient

    sl = task_slice(len(batch), rank_, world_)
    # More processes than tasks: an idle rank computes the first task's gradient with weight 0, so that
    # every rank contributes tensors of the same names and metrics to the all-reduce.
    shard = batch[sl] if sl.stop > sl.start else batch[0:1]
    if path is None:
        local = alg.meta_gradient(shard, iteration)
    else:
        local = alg.local_meta_gradient(shard, iteration, path)
    w = (sl.stop - sl.start) / len(batch)
    keys = sorted(local.metrics)
    values = list(local.values())
    flat = torch.cat([v.reshape(-1) * w for v in values]
                     + [torch.tensor([local.metrics[k] * w for k in keys], dtype=values[0].dtype,
                                     device=values[0].device)])
    all_reduce(flat)
    parts = torch.split(flat, [v.numel() for v in values] + [len(keys)])
    grads = {n: p.view_as(v) for n, p, v in zip(local, parts, values)}
    return MetaGradient(grads, dict(zip(keys, parts[-1].tolist())), local.path)


def meta_gradient(alg: Any, batch: Any, iteration: int) -> Any:
    """The meta-gradient of the global `batch`: this process's alone, or in a torchrun job the sum of
    every rank's shard (each weighted by its share of the tasks), identical on every rank."""
    if world() == 1:
        return alg.meta_gradient(batch, iteration)
    if getattr(alg, "refused_options", {}).get("parallel"):
        raise ValueError(f"{type(alg).__name__} cannot be sharded over the ranks of a torchrun job: "
                         f"{alg.refused_options['parallel']}")
    grads = _reduce(alg, batch, iteration, None, rank(), world(), dist.all_reduce)
    _share_path_choice(alg, batch, iteration)
    return grads


def _share_path_choice(alg: Any, batch: Any, iteration: int) -> None:
    """Every rank takes rank 0's path choice for its shard's workload (broadcast as an index)."""
    from metagrad import paths

    sl = task_slice(len(batch), rank(), world())
    shard = batch[sl]
    order = alg.order_at(iteration)
    candidates = [str(c) for c in paths.path_candidates(alg.model, order, alg.device(), alg.path)]
    if len(candidates) == 1:
        return
    key = alg._workload(shard, order)
    mine = alg.timer.chosen.get(key)
    code = torch.tensor([candidates.index(mine) if mine in candidates else -1], dtype=torch.int64)
    if dist.get_backend() == "nccl":
        code = code.cuda()
    dist.broadcast(code, 0)
    if int(code) >= 0:
        alg.timer.chosen[key] = candidates[int(code)]


def _device_tensor(t: Tensor) -> Tensor:
    return t.cuda() if dist.get_backend() == "nccl" else t


def agree(*flags: bool) -> tuple[bool, ...]:
    """Each flag true on every rank if it is true on any (a stop decision all ranks take together, so
    that none waits in a collective for a rank that has stopped)."""
    if world() == 1:
        return tuple(bool(f) for f in flags)
    t = _device_tensor(torch.tensor([int(bool(f)) for f in flags], dtype=torch.int64))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return tuple(bool(v) for v in t.tolist())


def _broadcast_bytes(data: bytes | None) -> bytes | None:
    """Rank 0's bytes (or None) on every rank."""
    size = _device_tensor(torch.tensor([-1 if data is None else len(data)], dtype=torch.int64))
    dist.broadcast(size, 0)
    n = int(size.item())
    if n < 0:
        return None
    buf = torch.frombuffer(bytearray(data), dtype=torch.uint8) if rank() == 0 else torch.empty(n, dtype=torch.uint8)
    buf = _device_tensor(buf)
    dist.broadcast(buf, 0)
    return bytes(buf.cpu().numpy())


def broadcast_json(obj: Any) -> Any:
    """Rank 0's JSON-able `obj` on every rank (a config, a decision): sent as JSON text, never pickled."""
    data = _broadcast_bytes(json.dumps(obj).encode() if rank() == 0 else b"")
    return json.loads(data.decode())


def broadcast_checkpoint(path: Any) -> dict[str, Any] | None:
    """Rank 0's checkpoint file (`path`, or None: no checkpoint) read on every rank, as data: the other
    ranks receive its bytes and read them with the same safe reader, so no shared filesystem is needed."""
    import tempfile
    from pathlib import Path

    from metagrad.runs import read_checkpoint

    name = _broadcast_bytes(None if path is None else Path(path).name.encode())
    data = _broadcast_bytes(None if path is None else Path(path).read_bytes())
    if name is None or data is None:
        return None
    if rank() == 0:
        return read_checkpoint(path)
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / name.decode()
        local.write_bytes(data)
        return read_checkpoint(local)


# -- the local launcher: forked processes on one machine ---------------------------------------------------
class _Channel:
    """Broadcasts over a private gloo group: tensors as they are, metadata as JSON bytes (no pickle)."""

    def __init__(self, group: dist.ProcessGroup, rank_: int, world_: int) -> None:
        self.group, self.rank, self.world = group, rank_, world_

    def all_reduce(self, t: Tensor) -> None:
        self.group.allreduce([t]).wait()

    def _bcast(self, t: Tensor) -> None:
        self.group.broadcast(t, 0).wait()

    def send(self, meta: dict, tensors: list[Tensor]) -> tuple[dict, list[Tensor]]:
        """Rank 0's `meta` (JSON) and `tensors` on every rank."""
        if self.rank == 0:
            meta = {**meta, "tensors": [[list(t.shape), str(t.dtype).removeprefix("torch.")] for t in tensors]}
            data = torch.frombuffer(bytearray(json.dumps(meta).encode()), dtype=torch.uint8)
            size = torch.tensor([data.numel()], dtype=torch.int64)
        else:
            size = torch.zeros(1, dtype=torch.int64)
        self._bcast(size)
        if self.rank != 0:
            data = torch.empty(int(size[0]), dtype=torch.uint8)
        self._bcast(data)
        meta = json.loads(bytes(data.numpy()).decode())
        if self.rank != 0:
            tensors = [torch.empty(shape, dtype=getattr(torch, dtype)) for shape, dtype in meta["tensors"]]
        for t in tensors:
            self._bcast(t.contiguous() if self.rank == 0 else t)
        return meta, tensors


def _pack(alg: Any, batch: Any, iteration: int, path: ExecPath) -> tuple[dict, list[Tensor]]:
    params = [p.detach().contiguous() for p in alg.meta_parameters().values()]
    leaves_s, spec_s = tree_flatten(batch.support)
    leaves_q, spec_q = tree_flatten(batch.query)
    meta = {"cmd": "gradient", "iteration": iteration, "path": str(path), "kind": type(batch).__name__,
            "n_params": len(params), "support": treespec_dumps(spec_s), "query": treespec_dumps(spec_q),
            "n_support": len(leaves_s)}
    return meta, params + [t.detach().contiguous() for t in leaves_s + leaves_q]


def _unpack(alg: Any, meta: dict, tensors: list[Tensor]) -> tuple[Any, int, ExecPath]:
    n = meta["n_params"]
    with torch.no_grad():
        for p, t in zip(alg.meta_parameters().values(), tensors[:n]):
            p.copy_(t)
    rest = tensors[n:]
    support = tree_unflatten(rest[:meta["n_support"]], treespec_loads(meta["support"]))
    query = tree_unflatten(rest[meta["n_support"]:], treespec_loads(meta["query"]))
    batch = TaskBatch(*support, *query) if meta["kind"] == "TaskBatch" else Tasks(support, query)
    return batch, int(meta["iteration"]), ExecPath.parse(meta["path"])


def _worker(alg: Any, rank_: int, world_: int, port: int, threads: int) -> None:
    """Ranks 1..: wait for rank 0's commands and compute this rank's shard of every meta-gradient."""
    torch.set_num_threads(threads)
    try:
        store = dist.TCPStore("127.0.0.1", port, world_, is_master=False, timeout=timedelta(seconds=60))
        ch = _Channel(dist.ProcessGroupGloo(store, rank_, world_, timedelta(seconds=TIMEOUT_S)), rank_, world_)
        while True:
            meta, tensors = ch.send({}, [])
            if meta["cmd"] == "stop":
                return
            batch, iteration, path = _unpack(alg, meta, tensors)
            _reduce(alg, batch, iteration, path, rank_, world_, ch.all_reduce)
    except Exception:  # noqa: BLE001 - the worker's only way to report is stderr; rank 0 then fails its collective
        traceback.print_exc(file=sys.stderr)
        os._exit(1)


def check_on_cpu(batch: Any) -> None:
    """Path option 'parallel' without torchrun forks CPU processes: refuse a batch elsewhere, clearly."""
    devices = {t.device.type for t in tree_flatten((batch.support, batch.query))[0] if isinstance(t, Tensor)}
    if devices - {"cpu"}:
        raise ValueError("path option 'parallel' without torchrun forks CPU processes, but the batch is on "
                         f"{sorted(devices - {'cpu'})}: launch one process per GPU with torchrun instead")


class LocalGroup:
    """Rank 0 of a gloo group of forked processes that stay alive across meta-iterations (one per core)."""

    def __init__(self, alg: Any, workers: int | None = None) -> None:
        if "fork" not in multiprocessing.get_all_start_methods():
            raise RuntimeError("path option 'parallel' without torchrun needs the 'fork' start method (Linux, "
                               "macOS); on this system launch with torchrun instead")
        if alg.device().type != "cpu":
            raise ValueError("path option 'parallel' without torchrun forks CPU processes, but the model is on "
                             f"{alg.device()}: launch one process per GPU with torchrun instead")
        self.world = workers or default_workers()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        ctx = multiprocessing.get_context("fork")
        self.threads = max(1, torch.get_num_threads() // self.world)
        self.procs = [ctx.Process(target=_worker, args=(alg, r, self.world, port, self.threads), daemon=True)
                      for r in range(1, self.world)]
        for p in self.procs:
            p.start()
            p._args = ()  # the child has its copy; the parent must not keep the algorithm alive through it
        store = dist.TCPStore("127.0.0.1", port, self.world, is_master=True, timeout=timedelta(seconds=60))
        self.store = store
        self.channel = _Channel(dist.ProcessGroupGloo(store, 0, self.world, timedelta(seconds=TIMEOUT_S)),
                                0, self.world)
        self._alg = weakref.ref(alg)
        _groups.add(self)

    def meta_gradient(self, batch: Any, iteration: int, path: ExecPath) -> Any:
        """The meta-gradient of `batch`, its tasks sharded over this group's processes."""
        alg = self._alg()
        check_on_cpu(batch)
        before = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            meta, tensors = _pack(alg, batch, iteration, path)
            self.channel.send(meta, tensors)
            grads = _reduce(alg, batch, iteration, path, 0, self.world, self.channel.all_reduce)
        except BaseException:
            self.kill()  # the workers may be waiting in a collective: end them, re-raise
            raise
        finally:
            torch.set_num_threads(before)
        grads.path = path.replace(parallel=True)
        alg.timer.ran = grads.path
        return grads

    def pids(self) -> list[int]:
        """Process ids of the workers alive now."""
        return [p.pid for p in self.procs if p.is_alive()]

    def kill(self) -> None:
        """Terminate the workers at once."""
        for p in self.procs:
            p.terminate()
            p.join(timeout=10)
        _groups.discard(self)

    def close(self) -> None:
        """Ask the workers to stop, then make sure they did."""
        if not any(p.is_alive() for p in self.procs):
            _groups.discard(self)
            return
        try:
            self.channel.send({"cmd": "stop"}, [])
        except Exception:  # noqa: BLE001 - a worker already died (its error went to stderr): terminate below
            pass
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
        _groups.discard(self)


_groups: weakref.WeakSet[LocalGroup] = weakref.WeakSet()


def worker_pids() -> list[int]:
    """Process ids of every local worker alive now (e.g. to measure their memory)."""
    return [pid for g in list(_groups) for pid in g.pids()]


def shutdown() -> None:
    """Stop every local group's workers (each algorithm's `close()` does it for its own)."""
    for g in list(_groups):
        g.close()


atexit.register(shutdown)
