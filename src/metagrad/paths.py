"""Execution paths: how the tasks of a meta-batch are run, chosen by rule or by timing, in one module.

A path is a base, `loop` (one task at a time: one task's graph in memory) or `vmap` (all tasks in one
set of batched kernels), with options: `cl` (channels-last images and conv weights), `bf16` (bfloat16
autocast: faster, not exact) and `parallel` (the tasks sharded over processes, one per core: the
same sharded meta-gradient as a torchrun job, `metagrad.distributed`). A spec is a string such as
`"auto"`, `"loop+cl+bf16"` or `"parallel"`; `ExecPath.parse` turns it into the small dataclass every
other module takes, once. `choose_path` resolves `auto` by rule; `PathTimer` times the candidates
where the rule is not clear (a CPU conv net: loop or vmap depends on the workload) and keeps the faster.
"""

from __future__ import annotations

import math
import os
import statistics
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

BASES = ("loop", "vmap")
OPTIONS = ("cl", "bf16", "parallel")
TIMED_RUNS = 2  # timed meta-iterations per candidate path before `auto` picks one (after a warm-up)


@dataclass(frozen=True, eq=False)
class ExecPath:
    """A parsed path: `base` is 'auto', 'loop' or 'vmap'; the options are flags. Equal to its spec string."""

    base: str = "auto"
    cl: bool = False
    bf16: bool = False
    parallel: bool = False

    @staticmethod
    def parse(spec: str | ExecPath) -> ExecPath:
        """The path of a spec like `"loop+cl+bf16"` (an ExecPath is returned as it is)."""
        if isinstance(spec, ExecPath):
            return spec
        base, options = parse_path(spec)
        return ExecPath(base, "cl" in options, "bf16" in options, "parallel" in options)

    @property
    def options(self) -> frozenset[str]:
        """The options that are on."""
        return frozenset(o for o in OPTIONS if getattr(self, o))

    @property
    def resolved(self) -> bool:
        """True once the base is 'loop' or 'vmap'."""
        return self.base in BASES

    def replace(self, **changes: object) -> ExecPath:
        """A copy with some fields changed."""
        fields = {"base": self.base, "cl": self.cl, "bf16": self.bf16, "parallel": self.parallel, **changes}
        return ExecPath(**fields)

    def __str__(self) -> str:
        return "+".join([self.base] + [o for o in OPTIONS if getattr(self, o)])

    __repr__ = __str__

    def __eq__(self, other: object) -> bool:
        if isinstance(other, str):
            try:
                other = ExecPath.parse(other)
            except ValueError:
                return False
        return isinstance(other, ExecPath) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))


def parse_path(path: str) -> tuple[str, frozenset[str]]:
    """The base (`auto`, `loop` or `vmap`) and the set of options of a path spec like `"loop+cl+bf16"`."""
    if isinstance(path, ExecPath):
        return path.base, path.options
    if not isinstance(path, str):
        raise TypeError(f"path must be a string such as 'auto', 'loop' or 'loop+bf16', got {type(path).__name__}")
    tokens = path.split("+")
    bases = [t for t in tokens if t in ("auto",) + BASES]
    options = frozenset(t for t in tokens if t in OPTIONS)
    unknown = [t for t in tokens if t not in ("auto",) + BASES + OPTIONS]
    if unknown or len(bases) > 1 or len(bases) + len(options) != len(tokens):
        raise ValueError(f"path must be 'auto', 'loop' or 'vmap', optionally joined with options {OPTIONS} "
                         f"by '+' (e.g. 'loop+cl+bf16', 'parallel'), each at most once; got {path!r}")
    return (bases[0] if bases else "auto"), options


def _batch_statistics_bn(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is None


def has_native_batchnorm(model: nn.Module) -> bool:
    """True if the model uses a torch BatchNorm that `core.for_vmap` cannot write out (one with running
    statistics): its second-order gradient is wrong under vmap."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and not _batch_statistics_bn(m)
               for m in model.modules())


def updates_statistics(model: nn.Module) -> bool:
    """True if a forward pass of the model writes statistics in place (MAML++'s per-step running statistics in
    training mode): under vmap the write is refused, and forked workers would keep it to themselves."""
    return any(getattr(m, "updates_statistics", False) for m in model.modules())


def choose_path(model: nn.Module, order: int, device: torch.device, path: str | ExecPath = "auto") -> ExecPath:
    """The execution path for the meta-batch: the rule's fastest one that is also exact.

    On CPU a per-task loop is the rule for conv nets and vmap for MLPs (one batched kernel per layer
    instead of a Python loop); for conv nets on CPU the winner depends on the workload, so
    `path_candidates` offers both and `PathTimer` times them. vmap at order 2 is refused over a
    BatchNorm with running statistics (a torch.func bug gives a wrong second-order gradient,
    ../shared/notes/peers.md; one on batch statistics is written out by `core.for_vmap`). `auto`
    never adds `bf16` (it changes the numbers) nor `parallel` (a torchrun job shards every meta-batch
    over its ranks by itself): both are the user's choice.
    """
    p = ExecPath.parse(path)
    writes = updates_statistics(model)
    if writes and (p.base == "vmap" or p.parallel):
        raise ValueError(
            f"path {str(p)!r} is refused for a model that keeps running statistics in training mode (per-step "
            "batch norm with running_stats=True): vmap cannot write them in place and forked workers would keep "
            "them to themselves. Use path='loop' (or 'auto'), or running_stats=False.")
    vmap_ok = not (order >= 2 and has_native_batchnorm(model)) and not writes
    convs = any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())
    if p.base == "vmap" and not vmap_ok:
        raise ValueError(
            "path='vmap' with order=2 is refused for models with a torch BatchNorm that tracks running "
            "statistics: torch.func.vmap gives a wrong second-order gradient there (torch 2.13). Use "
            "path='loop', BatchNorm with track_running_stats=False, or metagrad.models.TaskBatchNorm."
        )
    if p.base == "auto":
        p = p.replace(base="vmap" if vmap_ok and (device.type == "cuda" or not convs) else "loop")
    if p.cl and p.base == "vmap":
        raise ValueError("path option 'cl' (channels-last) runs on the loop path only: torch.func.vmap cannot "
                         "change memory formats (torch 2.13: 'NYI: querying is_contiguous inside of vmap'); "
                         "use 'loop+cl' or 'vmap'")
    if p.bf16 and device.type not in ("cpu", "cuda"):
        raise ValueError(f"path option 'bf16' needs a CPU or CUDA device, the model is on {device}")
    if p.bf16 and convs and device.type == "cpu" and not cpu_has_fast_bf16():
        warnings.warn(SLOW_BF16, RuntimeWarning, stacklevel=2)
    return p


# Measured on a 2-core AMD EPYC with AVX2 only (README, "Speed"): omniglot-5w1s at 6.2 s per iteration with
# bf16 against 0.94 s in float32, every convolution in torch's reference `_slow_conv2d_*` kernels.
SLOW_BF16 = (
    "path option 'bf16' on a CPU without oneDNN bfloat16 kernels (torch.ops.mkldnn._is_mkldnn_bf16_supported() "
    "is False: oneDNN needs AVX-512 or AVX2-VNNI-2 for bf16): torch runs every bf16 convolution in its slow "
    "reference kernel, several times slower than float32 (6.6x per meta-iteration measured on Omniglot). "
    "Drop '+bf16' on this machine.")


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU has oneDNN bfloat16 kernels (without them a bf16 convolution falls back to a slow one)."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def path_candidates(model: nn.Module, order: int, device: torch.device,
                    path: str | ExecPath = "auto") -> list[ExecPath]:
    """The exact paths worth timing for this model: `choose_path`'s, plus vmap for an `auto` conv net
    on CPU (workload-dependent there); one path wherever the rule is clear."""
    chosen = choose_path(model, order, device, path)
    if ExecPath.parse(path).base != "auto" or device.type != "cpu" or chosen.base != "loop" or chosen.parallel \
            or (order >= 2 and has_native_batchnorm(model)) or updates_statistics(model):
        return [chosen]
    return [chosen, chosen.replace(base="vmap")]


def available_memory() -> int | None:
    """Bytes of memory the system can still give (Linux MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class PathTimer:
    """`auto`'s choice between paths by the clock, per workload (order, tasks, example shapes, dtype).

    Like cuDNN's benchmark mode: round robin over the candidates, a warm-up and TIMED_RUNS timed
    meta-iterations each, then the lowest median. Two fresh runs can choose differently (results
    then differ in rounding); checkpoints carry the choice (`state`), and an explicit path makes runs
    bit-identical. Before a vmap trial the timer predicts its memory (the loop's one-task graph times
    the tasks) and skips the trial if that exceeds half the memory available, so a trial never runs
    a machine out of memory for a path that would then be discarded.
    """

    def __init__(self) -> None:
        self.timings: dict[tuple, dict[str, list[float]]] = {}
        self.chosen: dict[tuple, str] = {}
        self.task_bytes: dict[tuple, int] = {}  # one task's graph on the loop path, measured
        self.ran: ExecPath | None = None  # the path of the last meta-gradient

    def next(self, key: tuple, candidates: list[ExecPath], tasks: int) -> ExecPath:
        """The path for this workload: the only candidate, the chosen one, or the next to time."""
        if len(candidates) == 1:
            return candidates[0]
        if key in self.chosen and self.chosen[key] in candidates:
            return ExecPath.parse(self.chosen[key])
        times = self.timings.setdefault(key, {str(c): [] for c in candidates})
        for c in candidates:
            times.setdefault(str(c), [])
        budget = available_memory()
        if key in self.task_bytes and budget is not None:
            for c in candidates:
                if c.base == "vmap" and self.task_bytes[key] * tasks > budget / 2 and not times[str(c)]:
                    times[str(c)] = [math.inf] * (TIMED_RUNS + 1)  # predicted not to fit: never tried
        return min(candidates, key=lambda c: len(times[str(c)]))

    def needs_size(self, key: tuple, candidates: list[ExecPath], path: ExecPath) -> bool:
        """True for the first loop run of a workload that may still try vmap: measure one task's graph then."""
        return path.base == "loop" and key not in self.task_bytes and key not in self.chosen \
            and any(c.base == "vmap" for c in candidates)

    @contextmanager
    def measure(self, key: tuple):
        """Record the bytes of the storages saved for backward while the block builds one task's graph
        (what vmap would hold for every task of the batch at once)."""
        seen: dict[int, int] = {}
        peak = [0]

        def pack(t: torch.Tensor) -> torch.Tensor:
            s = t.untyped_storage()
            seen.setdefault(s.data_ptr(), s.nbytes())
            peak[0] = max(peak[0], sum(seen.values()))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield
        self.task_bytes[key] = peak[0]

    def record(self, key: tuple, path: ExecPath, seconds: float) -> str | None:
        """Add a timing; returns the chosen path when this timing completes the choice."""
        if key in self.chosen or key not in self.timings:
            return None
        times = self.timings[key]
        times[str(path)].append(seconds)
        if all(len(t) > TIMED_RUNS for t in times.values()):
            # The first run of each path is a warm-up (lazy imports, allocator): not counted.
            self.chosen[key] = min(times, key=lambda c: statistics.median(times[c][1:]))
            return self.chosen[key]
        return None

    def state(self) -> dict:
        """The choices made and the timings of those still being made (for checkpoints)."""
        return {"chosen": dict(self.chosen), "timings": {k: {p: list(t) for p, t in v.items()}
                                                         for k, v in self.timings.items()}}

    def load(self, state: dict) -> None:
        """Take the choices (and timings) of `state`, e.g. from a checkpoint being resumed."""
        self.chosen.update(state.get("chosen", {}))
        for k, v in state.get("timings", {}).items():
            self.timings[k] = {p: list(t) for p, t in v.items()}


def default_workers() -> int:
    """One process per CPU core this process may run on (`METAGRAD_WORKERS` overrides)."""
    env = os.environ.get("METAGRAD_WORKERS")
    if env is not None:
        if not env.isdigit() or int(env) < 1:
            raise ValueError(f"METAGRAD_WORKERS must be a positive integer, got {env!r}")
        return int(env)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
