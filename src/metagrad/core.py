"""The functional core: a model as a function of a parameter dict, the inner loop, the meta-loss.

Every algorithm is built from four pieces defined here:
`functional(model)` turns a module into `f(params, x)`; `inner_loop` takes `inner_steps` steps of an
inner optimizer on one task's support set; `query_losses` adapts every task of a `TaskBatch` and
returns the query losses `[tasks]`; `meta_backward` accumulates the meta-gradient of their mean with
the execution path that is fastest on the device (a per-task loop or `torch.func.vmap`).

An execution path is a base (`loop` or `vmap`) with options joined by `+`: `cl` (channels-last
images and conv weights), `bf16` (bfloat16 autocast: faster, not exact), `parallel` (a process per
core, each adapting a slice of the tasks: `metagrad.parallel`). `choose_path` turns `"auto"` (or a
partial spec such as `"parallel"`) into a full one such as `"loop+parallel"`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap

from metagrad.inner import InnerOptimizer

Params = dict[str, Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]
Model = Callable[[Params, Tensor], Tensor]
# "auto", "loop", "vmap", "parallel" or a base joined with options, e.g. "loop+cl+bf16" (module docstring).
Path = str
BASES = ("loop", "vmap")
OPTIONS = ("cl", "bf16", "parallel")


@dataclass(frozen=True)
class TaskBatch:
    """A meta-batch of tasks: support `[tasks, shots, ...]` and query `[tasks, query_shots, ...]`."""

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor

    def __post_init__(self) -> None:
        names = ("support_x", "support_y", "query_x", "query_y")
        for name in names:
            t = getattr(self, name)
            if not isinstance(t, Tensor):
                raise TypeError(f"TaskBatch.{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() < 2:
                raise ValueError(
                    f"TaskBatch.{name} must have shape [tasks, shots, ...], got {tuple(t.shape)}"
                )
        tasks = {name: getattr(self, name).shape[0] for name in names}
        if len(set(tasks.values())) != 1:
            raise ValueError(f"TaskBatch tensors disagree on the number of tasks (dim 0): {tasks}")
        for side in ("support", "query"):
            x, y = getattr(self, f"{side}_x"), getattr(self, f"{side}_y")
            if x.shape[1] != y.shape[1]:
                raise ValueError(
                    f"TaskBatch.{side}_x has {x.shape[1]} shots but {side}_y has {y.shape[1]} "
                    f"(shapes {tuple(x.shape)} and {tuple(y.shape)})"
                )
        if self.support_x.shape[2:] != self.query_x.shape[2:]:
            raise ValueError(
                f"support_x and query_x must have the same example shape, got "
                f"{tuple(self.support_x.shape[2:])} and {tuple(self.query_x.shape[2:])}"
            )

    @property
    def n_tasks(self) -> int:
        """Number of tasks in the batch."""
        return self.support_x.shape[0]

    def __len__(self) -> int:
        return self.n_tasks

    def __getitem__(self, index: int | slice | Tensor) -> TaskBatch:
        """Tasks selected along dim 0; an integer keeps the task dimension (`[1, shots, ...]`)."""
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        return TaskBatch(self.support_x[index], self.support_y[index], self.query_x[index], self.query_y[index])

    def to(self, *args, **kwargs) -> TaskBatch:
        """The batch moved or cast like `Tensor.to` (labels keep their integer dtype)."""
        def move(t: Tensor) -> Tensor:
            if t.is_floating_point():
                return t.to(*args, **kwargs)
            kw = {k: v for k, v in kwargs.items() if k != "dtype"}
            dev = [a for a in args if isinstance(a, (str, torch.device))]
            return t.to(*dev, **kw)

        return TaskBatch(*(move(t) for t in self.tensors()))

    def tensors(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(support_x, support_y, query_x, query_y)."""
        return self.support_x, self.support_y, self.query_x, self.query_y

    @staticmethod
    def cat(batches: Sequence[TaskBatch]) -> TaskBatch:
        """Concatenate batches along the task dimension."""
        return TaskBatch(*(torch.cat(ts) for ts in zip(*(b.tensors() for b in batches))))


def mse_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Mean squared error, the default loss (regression, as in the MAML paper)."""
    return F.mse_loss(pred, target)


def functional(model: nn.Module) -> Model:
    """The module as a pure function `f(params, x)`; buffers are taken from the module."""
    def f(params: Params, x: Tensor) -> Tensor:
        return functional_call(model, (params, dict(model.named_buffers())), (x,), strict=False)

    f.module = model  # type: ignore[attr-defined]  # for_vmap rebuilds f from it
    return f


def batch_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """Batch norm of `x [n, channels, ...]` over its own batch, written out: exact under vmap at any order."""
    dims = [0] + list(range(2, x.dim()))
    mean = x.mean(dims, keepdim=True)
    var = x.var(dims, unbiased=False, keepdim=True)
    out = (x - mean) * torch.rsqrt(var + eps)
    shape = [1, -1] + [1] * (x.dim() - 2)
    if weight is not None:
        out = out * weight.view(shape)
    if bias is not None:
        out = out + bias.view(shape)
    return out


class WrittenOutBatchNorm(nn.Module):
    """A torch BatchNorm on batch statistics, written out with the same parameters: exact under vmap."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm) -> None:
        super().__init__()
        self.eps = bn.eps
        # The same Parameter objects, under the same names: functional_call substitutes them alike.
        self.weight, self.bias = bn.weight, bn.bias

    def forward(self, x: Tensor) -> Tensor:
        return batch_norm(x, self.weight, self.bias, self.eps)


def _batch_statistics_bn(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is None


def _written_out(module: nn.Module) -> nn.Module:
    """The module with every batch-statistics BatchNorm written out; shares all parameters and buffers."""
    if _batch_statistics_bn(module):
        return WrittenOutBatchNorm(module)
    children = {n: _written_out(c) for n, c in module._modules.items() if c is not None}
    if all(c is module._modules[n] for n, c in children.items()):
        return module
    twin = copy.copy(module)  # shallow: the same parameter and buffer dicts, a new dict of children
    twin._modules = {**module._modules, **children}
    return twin


def for_vmap(f: Model) -> Model:
    """`f` to call under `vmap`: torch BatchNorm on batch statistics written out, because vmap of
    the native op gives a wrong second-order gradient in torch 2.13 (../shared/notes/peers.md); the
    native op stays in the loop, where it is faster. `f` itself when nothing needs writing out."""
    model = getattr(f, "module", None)
    if model is None:
        return f
    twin = _written_out(model)
    if twin is model:
        return f

    def g(params: Params, x: Tensor) -> Tensor:
        return functional_call(twin, (params, dict(model.named_buffers())), (x,), strict=False)

    return g


def named_params(model: nn.Module) -> Params:
    """The trainable parameters of a module, as `named_parameters()` gives them."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _grads(
    f: Model, loss_fn: LossFn, params: Params, x: Tensor, y: Tensor, names: Sequence[str],
    create_graph: bool, vmapped: bool,
) -> tuple[Tensor, Params]:
    """Loss at `params` and its gradient with respect to `params[names]`."""
    if vmapped:
        # torch.autograd.grad cannot run under vmap; torch.func.grad can, and composes with the
        # outer autograd graph for second order.
        def loss_of(sub: Params) -> tuple[Tensor, Tensor]:
            loss = loss_fn(f({**params, **sub}, x), y)
            return loss, loss

        sub = {n: params[n] for n in names}
        if not create_graph:
            sub = {n: p.detach() for n, p in sub.items()}
        g, loss = torch.func.grad(loss_of, has_aux=True)(sub)
        if not create_graph:
            g = {n: t.detach() for n, t in g.items()}
        return loss, g
    if not create_graph or not all(params[n].requires_grad for n in names):
        # First order (or no graph to the start, e.g. under no_grad): differentiate a detached copy.
        params = {n: (p.detach().requires_grad_(True) if n in names else p.detach())
                  for n, p in params.items()}
        create_graph = False
    loss = loss_fn(f(params, x), y)
    g = torch.autograd.grad(loss, [params[n] for n in names], create_graph=create_graph)
    return loss, dict(zip(names, g))


def inner_step(
    f: Model, loss_fn: LossFn, params: Params, state: object, x: Tensor, y: Tensor,
    opt: InnerOptimizer, step: int, order: int, names: Sequence[str] | None = None,
    vmapped: bool = False,
) -> tuple[Params, object, Tensor]:
    """One inner-optimizer step on `(x, y)`: returns new params, new state and the pre-step loss.

    `order=2` keeps the graph of the gradient (exact MAML), `order=1` treats the gradient as a
    constant (first-order MAML), `order=0` keeps no graph to the starting point at all (meta-test).
    """
    names = list(params) if names is None else list(names)
    # Inner steps need gradients even when the caller is under no_grad (evaluation, finite differences).
    with torch.enable_grad():
        loss, g = _grads(f, loss_fn, params, x, y, names, create_graph=order >= 2, vmapped=vmapped)
        sub = {n: params[n] for n in names}
        updates, state = opt.update(g, state, sub, step)
        new = dict(params)
        for n in names:
            new[n] = params[n] + updates[n]
    if order == 0:
        new = {n: p.detach() for n, p in new.items()}
    return new, state, loss


def inner_loop(
    f: Model, loss_fn: LossFn, params: Params, x: Tensor, y: Tensor, opt: InnerOptimizer,
    steps: int, order: int = 2, names: Sequence[str] | None = None, vmapped: bool = False,
) -> list[Params]:
    """`steps` inner steps on one task's support set `x [shots, ...]`; returns params after 0..steps."""
    if order == 0:
        params = {n: p.detach() for n, p in params.items()}
    state = opt.init({n: params[n] for n in (params if names is None else names)})
    trajectory = [params]
    for k in range(steps):
        params, state, _ = inner_step(f, loss_fn, params, state, x, y, opt, k, order, names, vmapped)
        trajectory.append(params)
    return trajectory


def has_native_batchnorm(model: nn.Module) -> bool:
    """True if the model uses a torch BatchNorm that `for_vmap` cannot write out (one with running
    statistics): its second-order gradient is wrong under vmap."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and not _batch_statistics_bn(m)
               for m in model.modules())


def parse_path(path: str) -> tuple[str, frozenset[str]]:
    """The base (`auto`, `loop` or `vmap`) and the set of options of a path spec like `"loop+cl+bf16"`."""
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


def _distributed_world() -> int:
    """World size of an already initialised torch.distributed job (torchrun), else 1."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def choose_path(model: nn.Module, order: int, device: torch.device, path: Path = "auto") -> str:
    """The execution path for the meta-batch: the measured fastest one that is also exact.

    On CPU a per-task loop is the rule for conv nets and vmap for MLPs (one batched kernel per
    layer instead of a Python loop); for conv nets on CPU the winner depends on the workload
    (few images per task favour vmap), so `path_candidates` offers both and the algorithm times
    them on its first meta-batches (`Algorithm.meta_backward`). Channels-last was slower than the
    default layout for the conv nets measured (benchmarks/README.md). vmap at order 2 is refused
    over a BatchNorm with running statistics (a torch.func bug gives a wrong second-order gradient,
    ../shared/notes/peers.md; one on batch statistics is written out by `for_vmap`). `auto` adds
    `parallel` only under an initialised torch.distributed job (torchrun: every rank takes its
    slice) and never adds `bf16`, which changes the numbers: both are the user's choice otherwise.
    """
    base, options = parse_path(path)
    vmap_ok = not (order >= 2 and has_native_batchnorm(model))
    if base == "vmap" and not vmap_ok:
        raise ValueError(
            "path='vmap' with order=2 is refused for models with a torch BatchNorm that tracks running "
            "statistics: torch.func.vmap gives a wrong second-order gradient there (torch 2.13). Use "
            "path='loop', BatchNorm with track_running_stats=False, or metagrad.models.TaskBatchNorm."
        )
    if base == "auto":
        convs = any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())
        base = "vmap" if vmap_ok and (device.type == "cuda" or not convs) else "loop"
        if path == "auto" and _distributed_world() > 1:
            options = options | {"parallel"}
    if "bf16" in options and device.type not in ("cpu", "cuda"):
        raise ValueError(f"path option 'bf16' needs a CPU or CUDA device, the model is on {device}")
    return "+".join([base] + [o for o in OPTIONS if o in options])


def path_candidates(model: nn.Module, order: int, device: torch.device, path: Path = "auto") -> list[str]:
    """The exact paths worth timing for this model: `choose_path`'s, plus vmap for an `auto` conv net
    on CPU (workload-dependent there); one path wherever the rule is clear."""
    chosen = choose_path(model, order, device, path)
    base, options = parse_path(chosen)
    if parse_path(path)[0] != "auto" or device.type != "cpu" or base != "loop" or "parallel" in options \
            or (order >= 2 and has_native_batchnorm(model)):
        return [chosen]
    return [chosen, "+".join(["vmap"] + [o for o in OPTIONS if o in options])]


def with_options(f: Model, options: frozenset[str] | set[str]) -> Model:
    """`f` run in channels-last layout (`cl`) and/or under bfloat16 autocast (`bf16`); output in the input's dtype."""
    if not options & {"cl", "bf16"}:
        return f

    def g(params: Params, x: Tensor) -> Tensor:
        dtype = x.dtype
        if "cl" in options and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled="bf16" in options):
            out = f(params, x)
        # The loss and the inner update stay in the parameters' precision; only the network runs in bf16.
        return out.to(dtype) if out.is_floating_point() and dtype.is_floating_point else out

    return g


def query_losses(
    f: Model, loss_fn: LossFn, params: Params, batch: TaskBatch, opt: InnerOptimizer, steps: int,
    order: int, path: str, names: Sequence[str] | None = None, all_steps: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Adapt each task on its support set and return query losses `[tasks]` (or `[tasks, steps+1]`
    with `all_steps`) and, for integer labels, query accuracies of the same shape."""
    base, options = parse_path(path)
    if base == "auto":
        raise ValueError("query_losses needs a resolved path such as 'loop' or 'vmap+bf16'; use choose_path")
    if "parallel" in options and order >= 1 and torch.is_grad_enabled():
        from metagrad import parallel

        return parallel.query_losses(f, loss_fn, params, batch, opt, steps, order, base, options - {"parallel"},
                                     names, all_steps)
    f = with_options(for_vmap(f) if base == "vmap" else f, options)
    if "cl" in options:
        # Conv weights in the images' layout, so that the convolutions need no conversion per call.
        params = {n: p.contiguous(memory_format=torch.channels_last) if p.dim() == 4 else p for n, p in params.items()}
    classify = not batch.query_y.is_floating_point()

    def one_task(p: Params, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor, vmapped: bool):
        traj = inner_loop(f, loss_fn, p, sx, sy, opt, steps, order, names, vmapped)
        chosen = traj if all_steps else traj[-1:]
        losses, accs = [], []
        for q in chosen:
            out = f(q, qx)
            losses.append(loss_fn(out, qy))
            if classify:
                accs.append((out.argmax(-1) == qy).float().mean())
        acc = torch.stack(accs) if classify else torch.zeros(len(chosen), device=qx.device)
        return torch.stack(losses), acc

    if base == "vmap":
        losses, accs = vmap(lambda *a: one_task(params, *a, vmapped=True), randomness="different")(
            *batch.tensors()
        )
    else:
        outs = [one_task(params, *(t[i] for t in batch.tensors()), vmapped=False) for i in range(len(batch))]
        losses = torch.stack([o[0] for o in outs])
        accs = torch.stack([o[1] for o in outs])
    if not all_steps:
        losses, accs = losses[:, 0], accs[:, 0]
    return losses, (accs.detach() if classify else None)


def chunks(batch: TaskBatch, path: str, chunk_size: int | None = None) -> Iterable[TaskBatch]:
    """Slices of the batch to back-propagate one at a time (memory: one task's graph for the loop);
    vmap and parallel paths take the batch whole (parallel: each process then holds its slice's graphs)."""
    base, options = parse_path(path)
    size = chunk_size or (len(batch) if base == "vmap" or "parallel" in options else 1)
    for start in range(0, len(batch), size):
        yield batch[start:start + size]


def check_finite(value: Tensor, what: str) -> None:
    """Raise a clear error on NaN or inf instead of silently corrupting the parameters."""
    if not torch.isfinite(value).all():
        raise FloatingPointError(
            f"{what} is not finite ({value.detach().flatten()[:4].tolist()}); lower outer_lr or inner_lr, "
            "or check the task data for NaN/inf"
        )
