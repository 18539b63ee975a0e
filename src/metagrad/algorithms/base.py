"""What every algorithm shares: the model as a parameter dict, the adapter, the meta-gradient, the train step.

An algorithm defines `objective(batch, iteration, path) -> (loss, metrics)`: a scalar whose gradient
with respect to `meta_parameters()` is the algorithm's meta-gradient (its mean over the tasks of
`batch`), computed with `core.map_tasks` on `path`. Everything else is here once:

    meta_gradient(batch, iteration) -> grads    pure: no optimizer, no .grad, bounded memory (a task's
                                                graph at a time on the loop path); path chosen or timed
    train_step(batch, optimizer)                 meta-gradient (sharded over the ranks of a torchrun job,
                                                 or over forked processes with path option 'parallel'),
                                                 optimizer step, iteration count
    adapt(batch) / adaptation_curve(batch)       meta-test with the same adapter (`eval_steps` steps,
                                                 chosen on validation tasks by `select_eval_steps`)
"""

from __future__ import annotations

import logging
import numbers
import time
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from metagrad import core, distributed, paths
from metagrad.core import Adapter, ExecPath, LossFn, Params, Path, TaskBatch, Tasks
from metagrad.inner import InnerOptimizer, masked, sgd
from metagrad.paths import TIMED_RUNS  # noqa: F401 - re-exported for its users

log = logging.getLogger("metagrad")


class MetaGradient(dict):
    """The meta-gradient: parameter name -> gradient, in `meta_parameters()` order; `.metrics` holds
    the batch's meta_loss (and accuracy for labels), `.path` the execution path that computed it."""

    def __init__(self, grads: dict[str, Tensor], metrics: dict[str, float], path: ExecPath | None = None) -> None:
        super().__init__(grads)
        self.metrics = metrics
        self.path = path


class Algorithm(nn.Module):
    """Base of all algorithms: holds the model, the inner optimizer and the iteration count."""

    # Path options this algorithm cannot honour, with the reason (refused with a clear error).
    refused_options: dict[str, str] = {}

    def __init__(
        self,
        model: nn.Module,
        inner_lr: float = 0.01,
        inner_steps: int = 1,
        order: int = 2,
        loss_fn: LossFn | None = None,
        inner_opt: InnerOptimizer | None = None,
        path: Path = "auto",
        adapt_names: Sequence[str] | None = None,
        eval_steps: int | None = None,
        task_loss: core.TaskLoss | None = None,
    ) -> None:
        super().__init__()
        if order not in (1, 2):
            raise ValueError(f"order must be 1 (first-order) or 2 (exact second order), got {order!r}")
        check_steps(inner_steps=inner_steps)
        if eval_steps is not None:
            check_steps(eval_steps=eval_steps)
        if not inner_lr > 0 and inner_opt is None:
            raise ValueError(f"inner_lr must be positive, got {inner_lr!r}")
        self.model = model
        self.inner_lr = float(inner_lr)
        self.inner_steps = int(inner_steps)
        self.order = order
        self.loss_fn: LossFn = loss_fn or core.mse_loss
        self._task_loss = task_loss
        self.inner_opt = inner_opt or sgd(inner_lr)
        # Registered so that learned inner rates are trained, saved and restored with the model.
        self.inner_meta_params = self.inner_opt.meta_params
        parsed = ExecPath.parse(path)
        for option in parsed.options:
            if option in self.refused_options:
                raise ValueError(f"{type(self).__name__} does not support path option {option!r}: "
                                 f"{self.refused_options[option]}")
        self.path = path
        self.adapt_names = inner_names(model, adapt_names)
        self.f = core.functional(model)
        self.register_buffer("iteration", torch.zeros((), dtype=torch.long))
        # A buffer, so that a step count chosen on validation tasks is saved in checkpoints.
        self.register_buffer("_eval_steps", torch.tensor(self.inner_steps if eval_steps is None else eval_steps))
        self.timer = paths.PathTimer()
        self._pool: distributed.LocalGroup | None = None

    @property
    def eval_steps(self) -> int:
        """Inner steps used at meta-test (`adapt`, `evaluate`): `inner_steps` unless chosen otherwise."""
        return int(self._eval_steps)

    @eval_steps.setter
    def eval_steps(self, steps: int) -> None:
        check_steps(eval_steps=steps)
        self._eval_steps.fill_(int(steps))

    @property
    def task_loss(self) -> core.TaskLoss:
        """The loss of one task's data, `task_loss(f, params, data)`: `supervised(loss_fn)` unless given."""
        return self._task_loss if self._task_loss is not None else core.supervised(self.loss_fn)

    # -- pieces the algorithms use ---------------------------------------------------------------
    def params(self) -> Params:
        """The model's parameters (the starting point of adaptation)."""
        return core.named_params(self.model)

    def meta_parameters(self) -> dict[str, nn.Parameter]:
        """What the outer loop trains, named and ordered: what a server aggregates or a rank all-reduces."""
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    def device(self) -> torch.device:
        """Device of the model's parameters."""
        return next(self.model.parameters()).device

    def order_at(self, iteration: int) -> int:
        """The order in force at `iteration` (MAML's order annealing overrides it)."""
        return self.order

    def adapter(self, iteration: int | None = None, steps: int | None = None, order: int | None = None) -> Adapter:
        """The adapter of this algorithm: model function, task loss, inner optimizer (masked to
        `adapt_names`), `steps` (default `inner_steps`) and `order` (default: the order at `iteration`)."""
        opt = masked(self.inner_opt, self.adapt_names) if self.adapt_names is not None else self.inner_opt
        it = int(self.iteration) if iteration is None else iteration
        return Adapter(self.f, self.task_loss, opt, self.inner_steps if steps is None else steps,
                       self.order_at(it) if order is None else order)

    def exec_path(self, order: int | None = None) -> str:
        """The execution path of the last meta-gradient (the one `auto` picked by timing included), or
        before any, the one the rule gives for this model, order and device (`paths.choose_path`)."""
        if order is None and self.timer.ran is not None:
            return str(self.timer.ran)
        order = self.order_at(int(self.iteration)) if order is None else order
        return str(paths.choose_path(self.model, order, self.device(), self.path))

    def path_report(self) -> dict[str, Any]:
        """Which path ran last, what `auto` chose for each workload, and the timings behind the choices."""
        return {"ran": str(self.timer.ran) if self.timer.ran is not None else None, **self.timer.state()}

    def _workload(self, batch: Any, order: int) -> tuple:
        shapes = tuple(tuple(t.shape[1:]) for t in core.tree_flatten((batch.support, batch.query))[0]
                       if isinstance(t, Tensor))
        dtype = next((str(t.dtype) for t in core.tree_flatten(batch.support)[0] if t.is_floating_point()), "")
        return (order, len(batch), shapes, dtype)

    def _path_for(self, batch: Any, iteration: int | None = None) -> ExecPath:
        """The path for this meta-batch: the only candidate, the one chosen for this workload, or the next to time."""
        order = self.order_at(int(self.iteration) if iteration is None else iteration)
        candidates = paths.path_candidates(self.model, order, self.device(), self.path)
        return self.timer.next(self._workload(batch, order), candidates, len(batch))

    def _time_path(self, batch: Any, path: ExecPath, seconds: float) -> None:
        order = self.order_at(getattr(self, "_iteration_now", int(self.iteration)))
        chosen = self.timer.record(self._workload(batch, order), path, seconds)
        if chosen is not None:
            times = self.timer.timings[self._workload(batch, order)]
            log.info("auto chose path %s for %d tasks at order %d (median s/iteration: %s)", chosen, len(batch),
                     order, {p: round(sorted(t[1:])[len(t[1:]) // 2], 4) for p, t in times.items()})

    @property
    def tuned_paths(self) -> dict[tuple, str]:
        """The paths `auto` chose by timing, per workload."""
        return self.timer.chosen

    def path_state(self) -> dict:
        """The paths `auto` chose by timing and the timings of those still being chosen (for checkpoints)."""
        return self.timer.state()

    def load_path_state(self, state: dict) -> None:
        """Take the path choices (and timings) of `path_state`, e.g. from a checkpoint being resumed."""
        self.timer.load(state)

    def _check_batch(self, batch: Any) -> None:
        if not isinstance(batch, (TaskBatch, Tasks)):
            raise TypeError(f"expected a metagrad.TaskBatch, got {type(batch).__name__} "
                            "(tasks of another structure: metagrad.core.Tasks)")
        if len(batch) == 0 or (isinstance(batch, TaskBatch) and (batch.support_x.shape[1] == 0
                                                                 or batch.query_x.shape[1] == 0)):
            raise ValueError(f"the TaskBatch needs at least one task, one support and one query example; "
                             f"got support {tuple(batch.support_x.shape)}, query {tuple(batch.query_x.shape)}")

    def _in_process(self, path: str | ExecPath | None = None) -> ExecPath:
        """`path` (default: this model's path at order 1, where no graph reaches the start, so vmap is exact
        even over torch BatchNorm) without 'parallel': adaptation alone runs in this process."""
        return ExecPath.parse(path or self.exec_path(1)).replace(parallel=False)

    def fit_tasks(self, data: Any, steps: int, path: str | ExecPath | None = None) -> Params:
        """Each task's parameters after `steps` inner steps on its `data [tasks, ...]`, without a graph to
        the start: stacked `[tasks, *param.shape]` (parameters the inner optimizer does not adapt repeat theta)."""
        theta = self.params()
        path = self._in_process(path)
        return core.map_tasks(lambda on, d: on.adapt(theta, d), self.adapter(steps=steps, order=0), path, data)

    def task_losses(self, stacked: Params, data: Any, path: str | ExecPath | None = None) -> Tensor:
        """Loss of each task's parameters `stacked [tasks, ...]` on its own `data [tasks, ...]`: `[tasks]`."""
        path = self._in_process(path)
        return core.map_tasks(lambda on, p, d: on.loss(p, d), self.adapter(), path, stacked, data)

    def objective(self, batch: Any, iteration: int, path: ExecPath) -> tuple[Tensor, dict[str, Tensor]]:
        """The meta-objective on `batch` at `iteration`, on `path`: a scalar with its graph to the meta-parameters."""
        raise NotImplementedError

    def adapt_and_evaluate(self, on: Adapter, params: Params, support: Any, query: Any,
                           all_steps: bool = False) -> tuple[Tensor, dict[str, Tensor]]:
        """One task adapted on `support`, evaluated on `query`: `core.adapt_and_evaluate` (ANIL: its body once)."""
        return core.adapt_and_evaluate(on, params, support, query, all_steps)

    # -- public API --------------------------------------------------------------------------------
    def meta_gradient(self, batch: Any, iteration: int | None = None, chunk_size: int | None = None) -> MetaGradient:
        """The meta-gradient of `batch` at `iteration` (default: the algorithm's count): pure, nothing stepped.

        The loop path back-propagates one task at a time (memory: one task's graph); vmap takes the
        batch whole. With path option `parallel` (outside a torchrun job) the tasks are sharded over
        forked processes, one per core, exactly as over the ranks of a torchrun job.
        """
        self._check_batch(batch)
        iteration = int(self.iteration) if iteration is None else int(iteration)
        path = self._path_for(batch, iteration)
        self._iteration_now = iteration
        if path.parallel and distributed.world() == 1:
            distributed.check_on_cpu(batch)
            if self._pool is None:
                self._pool = distributed.LocalGroup(self)
                weakref.finalize(self, self._pool.close)
            return self._pool.meta_gradient(batch, iteration, path.replace(parallel=False))
        start = time.perf_counter()
        order = self.order_at(iteration)
        key = self._workload(batch, order)
        if self.timer.needs_size(key, paths.path_candidates(self.model, order, self.device(), self.path), path):
            # One task's graph, measured in the loop's first (warm-up, untimed) run: `auto` will not try
            # vmap where every task's graph at once would not fit in the memory available.
            try:
                with self.timer.measure(key), torch.enable_grad():
                    self.objective(batch[0:1], iteration, path.replace(parallel=False))
            except RuntimeError as e:  # torch.func.grad/vjp inside (iMAML) refuse saved-tensor hooks
                if "saved tensor hooks" not in str(e):
                    raise
                self.timer.task_bytes[key] = 0  # not measurable: no prediction, the trial runs
        grads = self.local_meta_gradient(batch, iteration, path.replace(parallel=False), chunk_size)
        if self.device().type == "cuda":
            torch.cuda.synchronize()
        self.timer.ran = path
        self._time_path(batch, path, time.perf_counter() - start)
        return grads

    def local_meta_gradient(self, batch: Any, iteration: int, path: ExecPath,
                            chunk_size: int | None = None) -> MetaGradient:
        """The meta-gradient of `batch` computed in this process on a resolved `path`, a chunk of tasks at a time."""
        names, leaves = zip(*self.meta_parameters().items())
        total = [torch.zeros_like(p) for p in leaves]
        metrics: dict[str, float] = {}
        for chunk, w in chunks(batch, path, chunk_size):
            with torch.enable_grad():
                loss, m = self.objective(chunk, iteration, path)
                core.check_finite(loss, f"meta-loss at iteration {iteration}")
                grads = torch.autograd.grad(loss, leaves, allow_unused=True)
            for t, g in zip(total, grads):
                if g is not None:
                    t.add_(g, alpha=w)
            for k, v in {"meta_loss": loss.detach(), **m}.items():
                metrics[k] = metrics.get(k, 0.0) + float(v) * w
        return MetaGradient(dict(zip(names, total)), metrics, path)

    def train_step(self, batch: Any, optimizer: torch.optim.Optimizer,
                   iteration: int | None = None) -> dict[str, float]:
        """One outer update: the meta-gradient (its mean over the ranks' shards in a torchrun job) into
        `.grad`, its norm checked, `optimizer.step()`, the iteration count advanced. Returns the metrics."""
        iteration = int(self.iteration) if iteration is None else int(iteration)
        grads = distributed.meta_gradient(self, batch, iteration)
        self._set_grads(grads)
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads.values()])) \
            if grads else torch.zeros(())
        core.check_finite(norm, f"meta-gradient norm at iteration {iteration}")
        optimizer.step()
        self.iteration.fill_(iteration + 1)
        return {**grads.metrics, "grad_norm": float(norm)}

    def _set_grads(self, grads: dict[str, Tensor]) -> None:
        for n, p in self.named_parameters():
            p.grad = grads[n].detach().clone() if n in grads else None

    def meta_step(self, batch: Any, optimizer: torch.optim.Optimizer) -> dict[str, float]:
        """One outer update on a meta-batch (`train_step`); returns its metrics (meta_loss, accuracy, grad_norm)."""
        return self.train_step(batch, optimizer)

    def meta_backward(self, batch: Any, chunk_size: int | None = None) -> dict[str, float]:
        """Accumulate the meta-gradient into `.grad` (as `loss.backward()` would); returns the metrics."""
        grads = self.meta_gradient(batch, chunk_size=chunk_size)
        for n, p in self.meta_parameters().items():
            p.grad = grads[n].clone() if p.grad is None else p.grad + grads[n]
        return dict(grads.metrics)

    def meta_loss(self, batch: Any, iteration: int | None = None) -> Tensor:
        """Scalar meta-objective over the batch, differentiable with respect to `meta_parameters()`.

        Its gradient is the meta-gradient, computed eagerly here in bounded memory (one task's graph
        at a time on the loop path) and handed to autograd: `meta_loss(batch).backward()` and
        `meta_gradient(batch)` cost the same. Higher derivatives of it are not available (use
        `objective` for those); without grad mode it only computes the value.
        """
        self._check_batch(batch)
        iteration = int(self.iteration) if iteration is None else int(iteration)
        leaves = list(self.meta_parameters().values())
        if not (torch.is_grad_enabled() and leaves):
            path = self._path_for(batch, iteration).replace(parallel=False)
            return sum(self.objective(chunk, iteration, path)[0].detach() * w for chunk, w in chunks(batch, path))
        return _EagerMetaLoss.apply(self, batch, iteration, *leaves)

    def adapt(self, batch: Any, steps: int | None = None) -> Params:
        """Adapted parameters of every task after `steps` (default `eval_steps`) inner steps on its
        support set, stacked: each tensor `[tasks, *param.shape]`."""
        self._check_batch(batch)
        steps = self.eval_steps if steps is None else check_steps(steps=steps)
        return self.fit_tasks(batch.support, steps)

    @torch.no_grad()
    def trajectories(self, support: Any, steps: int) -> Params:
        """Each task's parameters after 0..`steps` inner steps on its `support` data (meta-test, no graph):
        `{name: [tasks, steps + 1, *param.shape]}`; the parameters the inner optimizer does not adapt repeat."""
        theta = self.params()
        path = self._in_process()
        return core.map_tasks(lambda on, s: {n: torch.stack([p[n] for p in on.trajectory(theta, s)]) for n in theta},
                              self.adapter(steps=check_steps(steps=steps), order=0), path, support)

    def predict(self, adapted: Params, x: Tensor, steps: int | None = None) -> Tensor:
        """Outputs of each task's adapted model (after `steps` inner steps, default `eval_steps`, as `adapt`)
        on its inputs `x [tasks, n, ...]`."""
        steps = self.eval_steps if steps is None else check_steps(steps=steps)
        return core.map_tasks(lambda on, p, xi: on.f_at(steps)(p, xi), self.adapter(steps=steps, order=0), "loop",
                              adapted, x)

    @torch.no_grad()
    def adaptation_curve(self, batch: Any, steps: int) -> tuple[Tensor, Tensor | None]:
        """Query loss (and accuracy for labels) of each task after 0..steps inner steps: `[tasks, steps+1]`."""
        self._check_batch(batch)
        check_steps(steps=steps)
        path = self._in_process()
        theta = self.params()
        losses, metrics = core.map_tasks(lambda on, s, q: self.adapt_and_evaluate(on, theta, s, q, all_steps=True),
                                         self.adapter(steps=steps, order=0), path, batch.support, batch.query)
        return losses, metrics.get("accuracy")

    @torch.no_grad()
    def select_eval_steps(self, val_batch: Any, max_steps: int) -> int:
        """Early stopping of the inner loop: set and return the step count in 0..`max_steps` with the
        lowest mean query loss on the validation tasks `val_batch` (the fewest steps on a tie)."""
        check_steps(max_steps=max_steps)
        losses, _ = self.adaptation_curve(val_batch, max_steps)  # [tasks, max_steps + 1]
        self.eval_steps = int(torch.argmin(losses.mean(0)))
        return self.eval_steps

    def close(self) -> None:
        """Stop the processes of path option 'parallel', if any (also done when the algorithm is collected)."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def __enter__(self) -> Algorithm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _EagerMetaLoss(torch.autograd.Function):
    """The meta-loss as one autograd node whose gradient was computed in bounded memory in the forward pass."""

    @staticmethod
    def forward(ctx, alg: Algorithm, batch: Any, iteration: int, *leaves: Tensor) -> Tensor:
        grads = alg.meta_gradient(batch, iteration)
        ctx.grads = list(grads.values())
        return torch.as_tensor(grads.metrics["meta_loss"], dtype=leaves[0].dtype, device=leaves[0].device)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple:
        return (None, None, None, *(grad_out * g for g in ctx.grads))


def chunks(batch: Any, path: ExecPath, chunk_size: int | None = None) -> Iterator[tuple[Any, float]]:
    """Slices of the batch computed one at a time, each with its share of the tasks: one task on the
    loop path (memory: one task's graph), the whole batch on vmap, or `chunk_size` tasks."""
    size = chunk_size or (len(batch) if path.base == "vmap" else 1)
    for lo in range(0, len(batch), size):
        chunk = batch[lo:lo + size]
        yield chunk, len(chunk) / len(batch)


def pooled(batch: Any) -> Any:
    """Each task's support and query data together, `[tasks, shots + query_shots, ...]` (Reptile, the baselines)."""
    return core.tree_map(lambda s, q: torch.cat([s, q], dim=1), batch.support, batch.query)


def inner_names(model: nn.Module, adapt_names: Sequence[str] | None = None) -> list[str] | None:
    """The parameters the inner loop adapts: `adapt_names` (checked), else all but those the model learns in the
    outer loop only (`model.meta_only`: MAML++'s per-step batch norm); None for all of them."""
    names = [n for n, _ in model.named_parameters()]
    if adapt_names is not None:
        unknown = sorted(set(adapt_names) - set(names))
        if unknown:
            raise ValueError(f"adapt_names {unknown} are not parameters of the model; it has {names}")
        return list(adapt_names)
    meta_only = set(getattr(model, "meta_only", ()))
    return [n for n in names if n not in meta_only] if meta_only else None


def check_steps(**kwargs: int) -> int:
    """Raise a clear error for a step count that is not a non-negative integer; return the (last) count."""
    for name, value in kwargs.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)
