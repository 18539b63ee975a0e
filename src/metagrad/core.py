"""The functional core: task data, task losses, the adapter, and the one map over tasks.

Meta-learning here is function composition. A model is a pure function `f(params, x)` of a parameter
dict (`functional(model)`). A task batch carries a support and a query part, each a pytree of
tensors with a leading `[tasks]` dimension (`TaskBatch` for x and y, `Tasks` for anything else: a
graph, trajectories, a client's local data). A task loss `task_loss(f, params, data) -> scalar`
says what a task's data costs (`supervised(loss_fn)` builds one from `loss_fn(pred, target)`). An
`Adapter` holds what travels together (model function, task loss, inner optimizer, steps, order):
`adapt(params, support) -> adapted` and `evaluate(adapted, query) -> loss, metrics` are separate
calls, so meta-RL can roll out the adapted policy between them. `map_tasks` runs any per-task
function over a batch by an execution path (`metagrad.paths`): a loop, or vmap, with channels-last
and bfloat16 options; nothing else in the library loops over tasks.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap
from torch.utils._pytree import tree_flatten, tree_map

from metagrad.inner import InnerOptimizer, masked
from metagrad.paths import (  # noqa: F401 - re-exported: the core's public names for paths
    BASES,
    OPTIONS,
    ExecPath,
    _batch_statistics_bn,
    choose_path,
    has_native_batchnorm,
    parse_path,
    path_candidates,
)

Params = dict[str, Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]
Model = Callable[[Params, Any], Tensor]
TaskLoss = Callable[[Model, Params, Any], Tensor]
# "auto", "loop", "vmap", "parallel" or a base joined with options, e.g. "loop+cl+bf16" (metagrad.paths).
Path = str


def task_count(tree: Any) -> int:
    """The size of the leading `[tasks]` dimension shared by every tensor of a pytree."""
    leaves = [t for t in tree_flatten(tree)[0] if isinstance(t, Tensor)]
    if not leaves:
        raise ValueError("task data must hold at least one tensor with a leading [tasks] dimension")
    sizes = {t.shape[0] if t.dim() else None for t in leaves}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(f"every tensor of the task data must have the same leading [tasks] dimension, "
                         f"got shapes {[tuple(t.shape) for t in leaves]}")
    return sizes.pop()


def index_tasks(tree: Any, index: int | slice | Tensor) -> Any:
    """The tasks `index` of a pytree with a leading `[tasks]` dimension (an int drops that dimension)."""
    return tree_map(lambda t: t[index] if isinstance(t, Tensor) else t, tree)


def _move(t: Any, args: tuple, kwargs: dict) -> Any:
    if not isinstance(t, Tensor):
        return t
    if t.is_floating_point():
        return t.to(*args, **kwargs)
    kw = {k: v for k, v in kwargs.items() if k != "dtype"}
    dev = [a for a in args if isinstance(a, (str, torch.device))]
    return t.to(*dev, **kw)


@dataclass(frozen=True)
class Tasks:
    """A meta-batch of tasks of any structure: `support` and `query` are pytrees of tensors, each with a
    leading `[tasks]` dimension (a graph with its node features, trajectories, a client's data split)."""

    support: Any
    query: Any

    def __post_init__(self) -> None:
        s, q = task_count(self.support), task_count(self.query)
        if s != q:
            raise ValueError(f"Tasks.support has {s} tasks but Tasks.query has {q} (dim 0)")

    @property
    def n_tasks(self) -> int:
        """Number of tasks in the batch."""
        return task_count(self.support)

    def __len__(self) -> int:
        return self.n_tasks

    def __getitem__(self, index: int | slice | Tensor) -> Tasks:
        """Tasks selected along dim 0; an integer keeps the task dimension."""
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        return Tasks(index_tasks(self.support, index), index_tasks(self.query, index))

    def to(self, *args, **kwargs) -> Tasks:
        """The batch moved or cast like `Tensor.to` (integer tensors keep their dtype)."""
        return Tasks(tree_map(lambda t: _move(t, args, kwargs), self.support),
                     tree_map(lambda t: _move(t, args, kwargs), self.query))

    @staticmethod
    def cat(batches: Sequence[Tasks]) -> Tasks:
        """Concatenate batches along the task dimension."""
        return Tasks(tree_map(lambda *t: torch.cat(t), *(b.support for b in batches)),
                     tree_map(lambda *t: torch.cat(t), *(b.query for b in batches)))


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
        return TaskBatch(*(_move(t, args, kwargs) for t in self.tensors()))

    @property
    def support(self) -> tuple[Tensor, Tensor]:
        """The support part as task data: `(support_x [tasks, shots, ...], support_y)`."""
        return self.support_x, self.support_y

    @property
    def query(self) -> tuple[Tensor, Tensor]:
        """The query part as task data: `(query_x [tasks, query_shots, ...], query_y)`."""
        return self.query_x, self.query_y

    def tensors(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(support_x, support_y, query_x, query_y)."""
        return self.support_x, self.support_y, self.query_x, self.query_y

    @staticmethod
    def cat(batches: Sequence[TaskBatch]) -> TaskBatch:
        """Concatenate batches along the task dimension."""
        return TaskBatch(*(torch.cat(ts) for ts in zip(*(b.tensors() for b in batches))))


def check_shapes(pred: Tensor, target: Tensor, loss_name: str) -> None:
    """A clear error where an elementwise loss would broadcast a prediction against a target of another shape."""
    if pred.shape != target.shape:
        raise ValueError(f"{loss_name}: the model's output has shape {tuple(pred.shape)} but the target has shape "
                         f"{tuple(target.shape)}; they must be equal (broadcasting them would silently compare "
                         "every output with every target)")


def mse_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Mean squared error, the default loss (regression, as in the MAML paper); shapes must match."""
    check_shapes(pred, target, "mse_loss")
    return F.mse_loss(pred, target)


# Elementwise losses of torch that broadcast silently (with only a warning) when the shapes differ.
_ELEMENTWISE = {F.mse_loss: "mse_loss", F.l1_loss: "l1_loss", F.smooth_l1_loss: "smooth_l1_loss",
                F.huber_loss: "huber_loss", F.binary_cross_entropy_with_logits: "binary_cross_entropy_with_logits"}


class SupervisedLoss:
    """The task loss of x and y: `loss_fn(f(params, x), y)`; with integer labels, accuracy as a metric."""

    def __init__(self, loss_fn: LossFn) -> None:
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable as loss_fn(pred, target), got {type(loss_fn).__name__}")
        self.loss_fn = loss_fn

    def _loss(self, pred: Tensor, y: Tensor) -> Tensor:
        name = _ELEMENTWISE.get(self.loss_fn)
        if name is not None:
            check_shapes(pred, y, name)
        return self.loss_fn(pred, y)

    def __call__(self, f: Model, params: Params, data: tuple[Tensor, Tensor]) -> Tensor:
        x, y = data
        return self._loss(f(params, x), y)

    def with_metrics(self, f: Model, params: Params, data: tuple[Tensor, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss and, for integer labels, the accuracy, from one forward pass."""
        x, y = data
        out = f(params, x)
        metrics = {} if y.is_floating_point() else {"accuracy": (out.argmax(-1) == y).to(out.dtype).mean().detach()}
        return self._loss(out, y), metrics

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SupervisedLoss) and other.loss_fn is self.loss_fn

    def __hash__(self) -> int:
        return hash(self.loss_fn)


def supervised(loss_fn: LossFn = mse_loss) -> SupervisedLoss:
    """A task loss for task data `(x, y)` from a loss of predictions and targets (MSE by default)."""
    return loss_fn if isinstance(loss_fn, SupervisedLoss) else SupervisedLoss(loss_fn)


def takes_step(model: nn.Module) -> bool:
    """True if the module's forward reads the inner step index (`forward(x, step)`: MAML++'s per-step batch norm);
    a module whose forward takes `step` but ignores it in some configurations says so with `reads_step`."""
    return "step" in inspect.signature(model.forward).parameters and bool(getattr(model, "reads_step", True))


class Functional:
    """A module as a pure function `f(params, x)`; a class, not a closure, so `copy.deepcopy` of an algorithm
    gives a function of the copied module (its buffers), not of the original."""

    def __init__(self, model: nn.Module, runs: nn.Module | None = None) -> None:
        self.module = model  # for_vmap rebuilds f from it
        # What is called: the module itself, or a twin sharing its parameters and buffers (for_vmap's).
        self.runs = model if runs is None else runs
        self.stepped = takes_step(model)  # Adapter.f_at binds the step only where it is read

    def __call__(self, params: Params, x: Tensor, step: int = 0) -> Tensor:
        """The module's output at `params` (buffers taken from the module), after `step` inner updates."""
        kwargs = {"step": step} if self.stepped else {}
        return functional_call(self.runs, (params, dict(self.module.named_buffers())), (x,), kwargs, strict=False)


def functional(model: nn.Module) -> Model:
    """The module as a pure function `f(params, x)`; buffers are taken from the module. A module whose forward
    takes `step` (the number of inner updates its params have had) gets it as `f(params, x, step=k)`."""
    return Functional(model)


class _BatchNorm(torch.autograd.Function):
    """Batch norm on batch statistics (weight and bias optional), its backward written by hand in differentiable ops.

    Autograd's chain through the written-out op (subtract, square, mean, rsqrt, multiply, add, each with its own
    backward) passes over the activations several times more than this backward, whose full-size work is one
    product and two fused multiply-adds; the double backward (MAML's order 2) differentiates those few. The centred
    input and the reciprocal deviation are outputs, not hidden intermediates, so that the double backward can
    reach the input through them (torch's rule for saved intermediates). `generate_vmap_rule`: vmap and
    torch.func.grad run it like any composite op.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> tuple[Tensor, Tensor, Tensor]:
        dims, shape, m = _bn_dims(x)
        # The centred x once, for the variance and the output: a fifth less time over forward, backward and
        # double backward than torch's var (a Welford pass) beside a second subtraction (benchmarks/README.md).
        centred = x - x.sum(dims, keepdim=True) * m
        rstd = torch.rsqrt((centred * centred).sum(dims, keepdim=True) * m + eps)  # [1, channels, 1, ...]
        scale = rstd if weight is None else rstd * weight.view(shape)
        out = centred * scale if bias is None else torch.addcmul(bias.view(shape), centred, scale)
        return out, centred, rstd

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        _, weight, bias, _ = inputs
        _, centred, rstd = output
        ctx.save_for_backward(centred, rstd, weight)
        ctx.has_bias = bias is not None
        ctx.set_materialize_grads(False)  # the first backward gets no gradient for centred and rstd: skip them

    @staticmethod
    def backward(ctx: Any, g: Tensor | None, g_centred: Tensor | None,
                 g_rstd: Tensor | None) -> tuple[Tensor | None, Tensor | None, Tensor | None, None]:
        centred, rstd, weight = ctx.saved_tensors
        dims, shape, m = _bn_dims(centred)
        gx = gw = gb = None
        if g is not None:
            # d out / d x = a * (g - mean(g) - centred * rstd^2 * mean(g * centred)), a = rstd * weight.
            a = rstd if weight is None else rstd * weight.view(shape)
            g_sum = g.sum(dims, keepdim=True)
            gc_sum = (g * centred).sum(dims, keepdim=True)
            gw = None if weight is None else (gc_sum * rstd).view(-1)
            gb = g_sum.view(-1) if ctx.has_bias else None
            gx = torch.addcmul(torch.addcmul(a * g_sum * -m, centred, a * rstd * rstd * gc_sum * -m), g, a)
        if g_centred is not None:  # centred = x - mean(x)
            t = g_centred - g_centred.sum(dims, keepdim=True) * m
            gx = t if gx is None else gx + t
        if g_rstd is not None:  # rstd = (mean(centred^2) + eps)^-1/2, and mean(centred) = 0
            t = centred * (g_rstd * rstd * rstd * rstd * -m)
            gx = t if gx is None else gx + t
        return gx, gw, gb, None


def _bn_dims(x: Tensor) -> tuple[list[int], list[int], float]:
    """Batch norm's reduced dims of `x [n, channels, ...]`, the shape of a per-channel view, 1 / count."""
    return [0] + list(range(2, x.dim())), [1, -1] + [1] * (x.dim() - 2), x.shape[1] / x.numel()


def batch_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """Batch norm of `x [n, channels, ...]` over its own batch (`_BatchNorm`): exact under vmap at any order."""
    return _BatchNorm.apply(x, weight, bias, eps)[0]


class WrittenOutBatchNorm(nn.Module):
    """A torch BatchNorm on batch statistics, written out with the same parameters: exact under vmap."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm) -> None:
        super().__init__()
        self.eps = bn.eps
        # The same Parameter objects, under the same names: functional_call substitutes them alike.
        self.weight, self.bias = bn.weight, bn.bias

    def forward(self, x: Tensor) -> Tensor:
        return batch_norm(x, self.weight, self.bias, self.eps)


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
    return f if twin is model else Functional(model, twin)


def named_params(model: nn.Module) -> Params:
    """The trainable parameters of a module, as `named_parameters()` gives them."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def with_options(f: Model, options: frozenset[str] | set[str]) -> Model:
    """`f` run in channels-last layout (`cl`) and/or under bfloat16 autocast (`bf16`); output in the input's dtype."""
    if not set(options) & {"cl", "bf16"}:
        return f

    def g(params: Params, x: Tensor, **step: int) -> Tensor:
        dtype = x.dtype
        if "cl" in options and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled="bf16" in options):
            out = f(params, x, **step)
        # The loss and the inner update stay in the parameters' precision; only the network runs in bf16.
        return out.to(dtype) if out.is_floating_point() and dtype.is_floating_point else out

    g.stepped = getattr(f, "stepped", False)  # type: ignore[attr-defined]
    return g


@dataclass(frozen=True)
class Adapter:
    """What adapting to a task needs, travelling together: the model function, the task loss, the inner
    optimizer (a `masked` one adapts some parameters only), the steps, the order, and the path it runs on.

    `order=2` keeps the graph of every inner gradient (exact MAML), `order=1` treats the inner gradients
    as constants (first-order MAML), `order=0` keeps no graph to the start at all (meta-test).
    """

    f: Model
    task_loss: TaskLoss
    inner_opt: InnerOptimizer
    steps: int = 1
    order: int = 2
    path: ExecPath = ExecPath("loop")

    def __post_init__(self) -> None:
        if self.order not in (0, 1, 2):
            raise ValueError(f"order must be 0 (no graph), 1 (first order) or 2 (exact), got {self.order!r}")
        if int(self.steps) != self.steps or self.steps < 0:
            raise ValueError(f"steps must be a non-negative integer, got {self.steps!r}")

    def replace(self, **changes: Any) -> Adapter:
        """A copy with some fields changed (e.g. `steps` at meta-test, `order=0`)."""
        return dataclasses.replace(self, **changes)

    def on(self, path: str | ExecPath) -> Adapter:
        """This adapter on `path`: the model written out for vmap where needed, with the path's options."""
        path = ExecPath.parse(path)
        if not path.resolved:
            raise ValueError(f"an adapter runs on a resolved path such as 'loop' or 'vmap+bf16', got {path}")
        f = for_vmap(self.f) if path.base == "vmap" else self.f
        return self.replace(f=with_options(f, path.options), path=path)

    @property
    def vmapped(self) -> bool:
        """True when the adapter runs inside `vmap` (one task's slice of a batched call)."""
        return self.path.base == "vmap"

    def _layout(self, params: Params) -> Params:
        if not self.path.cl:
            return params
        # Conv weights in the images' layout, so that the convolutions need no conversion per call.
        return {n: p.contiguous(memory_format=torch.channels_last) if p.dim() == 4 else p for n, p in params.items()}

    def f_at(self, k: int) -> Model:
        """The model function for params that have had `k` inner updates: `f` with `step=k` bound where the
        model reads it (MAML++'s per-step batch norm), else `f` itself."""
        return functools.partial(self.f, step=k) if getattr(self.f, "stepped", False) else self.f

    def loss(self, params: Params, data: Any, k: int | None = None) -> Tensor:
        """The task loss of `params` (after `k` inner updates; default `steps`) on one task's `data`."""
        return self.task_loss(self.f_at(self.steps if k is None else k), params, data)

    def gradient(self, params: Params, data: Any, create_graph: bool, k: int = 0) -> tuple[Tensor, Params]:
        """Loss at `params` (after `k` inner updates) and its gradient with respect to the parameters the
        inner optimizer adapts."""
        names = list(self.inner_opt.select(params))
        if self.vmapped:
            # torch.autograd.grad cannot run under vmap; torch.func.grad can, and composes with the
            # outer autograd graph for second order.
            def loss_of(sub: Params) -> tuple[Tensor, Tensor]:
                loss = self.loss({**params, **sub}, data, k)
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
        loss = self.loss(params, data, k)
        g = torch.autograd.grad(loss, [params[n] for n in names], create_graph=create_graph)
        return loss, dict(zip(names, g))

    def step(self, params: Params, state: object, data: Any, k: int = 0) -> tuple[Params, object, Tensor]:
        """Inner step `k` (0-based) on one task's `data`: new params, new state and the pre-step loss."""
        # Inner steps need gradients even when the caller is under no_grad (evaluation, finite differences).
        with torch.enable_grad():
            loss, g = self.gradient(params, data, create_graph=self.order >= 2, k=k)
            updates, state = self.inner_opt.update(g, state, {n: params[n] for n in g})
            new = dict(params)
            for n in g:
                new[n] = params[n] + updates[n]
        if self.order == 0:
            new = {n: p.detach() for n, p in new.items()}
        return new, state, loss

    def init(self, params: Params) -> object:
        """The inner optimizer's state at the start of adaptation."""
        return self.inner_opt.init(self.inner_opt.select(params))

    def trajectory(self, params: Params, support: Any) -> list[Params]:
        """One task's parameters after 0..`steps` inner steps on its `support` data."""
        params = self._layout({n: p.detach() for n, p in params.items()} if self.order == 0 else params)
        state = self.init(params)
        trajectory = [params]
        for k in range(self.steps):
            params, state, _ = self.step(params, state, support, k)
            trajectory.append(params)
        return trajectory

    def adapt(self, params: Params, support: Any) -> Params:
        """One task's adapted parameters after `steps` inner steps on its `support` data."""
        return self.trajectory(params, support)[-1]

    def evaluate(self, adapted: Params, query: Any, k: int | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """One task's query loss at `adapted` (after `k` inner updates; default `steps`) and its metrics
        (accuracy for integer labels)."""
        adapted = self._layout(adapted)
        k = self.steps if k is None else k
        with_metrics = getattr(self.task_loss, "with_metrics", None)
        if with_metrics is not None:
            return with_metrics(self.f_at(k), adapted, query)
        return self.loss(adapted, query, k), {}


def map_tasks(fn: Callable[..., Any], adapter: Adapter, path: str | ExecPath, *data: Any) -> Any:
    """`fn(adapter_on_path, *one_task's_data)` for every task of `data` (pytrees `[tasks, ...]`), stacked.

    The one map over tasks: `loop` calls `fn` task by task, `vmap` once under `torch.func.vmap` (task
    data and outputs batched along dim 0); the path's options reach `fn` through the adapter it gets.
    Returns `fn`'s output pytree with a leading `[tasks]` dimension on every tensor.
    """
    path = ExecPath.parse(path)
    if not path.resolved:
        raise ValueError(f"map_tasks needs a resolved path such as 'loop' or 'vmap+bf16', got {path}; "
                         "use metagrad.paths.choose_path")
    on = adapter.on(path.replace(parallel=False))
    if path.base == "vmap":
        return vmap(lambda *d: fn(on, *d), randomness="different")(*data)
    n = task_count(data)
    outs = [fn(on, *index_tasks(data, i)) for i in range(n)]
    return tree_map(lambda *xs: torch.stack(xs), *outs)


def adapt_and_evaluate(on: Adapter, params: Params, support: Any, query: Any,
                       all_steps: bool = False) -> tuple[Tensor, dict[str, Tensor]]:
    """One task: adapt on `support`, evaluate on `query`: loss `[]` and metrics (`[steps+1]` with `all_steps`)."""
    if not all_steps:
        return on.evaluate(on.adapt(params, support), query)
    outs = [on.evaluate(p, query, k) for k, p in enumerate(on.trajectory(params, support))]
    return torch.stack([o[0] for o in outs]), tree_map(lambda *xs: torch.stack(xs), *[o[1] for o in outs])


# -- the first core's functions, kept for its users; each is one call of the adapter ----------------------
def _adapter(f: Model, loss_fn: LossFn, opt: InnerOptimizer, steps: int, order: int,
             names: Sequence[str] | None) -> Adapter:
    return Adapter(f, supervised(loss_fn), masked(opt, names) if names is not None else opt, steps, order)


def inner_loop(
    f: Model, loss_fn: LossFn, params: Params, x: Tensor, y: Tensor, opt: InnerOptimizer,
    steps: int, order: int = 2, names: Sequence[str] | None = None, vmapped: bool = False,
) -> list[Params]:
    """`steps` inner steps on one task's support set `x [shots, ...]`; returns params after 0..steps
    (`Adapter.trajectory` with a supervised task loss; `names` masks the inner optimizer)."""
    ad = _adapter(f, loss_fn, opt, steps, order, names)
    return ad.replace(path=ExecPath("vmap" if vmapped else "loop")).trajectory(params, (x, y))


def query_losses(
    f: Model, loss_fn: LossFn, params: Params, batch: TaskBatch, opt: InnerOptimizer, steps: int,
    order: int, path: str, names: Sequence[str] | None = None, all_steps: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Adapt each task on its support set and return query losses `[tasks]` (or `[tasks, steps+1]`
    with `all_steps`) and, for integer labels, query accuracies of the same shape."""
    p = ExecPath.parse(path)
    if p.parallel:
        raise ValueError("path option 'parallel' shards a meta-batch over processes at the meta-gradient "
                         "(Algorithm.meta_gradient, or a torchrun job); query_losses runs in this process: "
                         "pass the path without it")
    losses, metrics = map_tasks(lambda on, s, q: adapt_and_evaluate(on, params, s, q, all_steps),
                                _adapter(f, loss_fn, opt, steps, order, names), p, batch.support, batch.query)
    acc = metrics.get("accuracy")
    return losses, (acc.detach() if acc is not None else None)


def check_finite(value: Tensor, what: str) -> None:
    """Raise a clear error on NaN or inf instead of silently corrupting the parameters."""
    if not torch.isfinite(value).all():
        raise FloatingPointError(
            f"{what} is not finite ({value.detach().flatten()[:4].tolist()}); lower outer_lr or inner_lr, "
            "or check the task data for NaN/inf"
        )
