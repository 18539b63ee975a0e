"""What every algorithm shares: the model as a parameter dict, the inner loop, the outer step.

An algorithm defines `_meta_loss(batch) -> (loss, metrics)`: a scalar whose gradient with respect
to `self.parameters()` is the algorithm's meta-gradient (its mean over the tasks of `batch`).
Everything else (meta_step, adapt, evaluation, checkpoints) is here once, and so is the early
stopping of the inner loop at meta-test: `eval_steps` inner steps, chosen on validation tasks by
`select_eval_steps`.
"""

from __future__ import annotations

import numbers
import statistics
import time
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.func import vmap

from metagrad import core
from metagrad.core import LossFn, Params, Path, TaskBatch
from metagrad.inner import InnerOptimizer, sgd

TIMED_RUNS = 2  # timed meta-iterations per candidate path before `auto` picks one (after a warm-up)


class Algorithm(nn.Module):
    """Base of all algorithms: holds the model, the inner optimizer and the iteration count."""

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
        self.inner_opt = inner_opt or sgd(inner_lr)
        # Registered so that learned inner rates are trained, saved and restored with the model.
        self.inner_meta_params = self.inner_opt.meta_params
        self.path = path
        names = [n for n, _ in model.named_parameters()]
        if adapt_names is not None:
            unknown = sorted(set(adapt_names) - set(names))
            if unknown:
                raise ValueError(f"adapt_names {unknown} are not parameters of the model; it has {names}")
        self.adapt_names = list(adapt_names) if adapt_names is not None else None
        self.f = core.functional(model)
        self.register_buffer("iteration", torch.zeros((), dtype=torch.long))
        # A buffer, so that a step count chosen on validation tasks is saved in checkpoints.
        self.register_buffer("_eval_steps", torch.tensor(self.inner_steps if eval_steps is None else eval_steps))
        # Path timing (meta_backward): seconds per candidate path and the choice, per workload.
        self._timings: dict[tuple, dict[str, list[float]]] = {}
        self.tuned_paths: dict[tuple, str] = {}
        self._trial: str | None = None

    @property
    def eval_steps(self) -> int:
        """Inner steps used at meta-test (`adapt`, `evaluate`): `inner_steps` unless chosen otherwise."""
        return int(self._eval_steps)

    @eval_steps.setter
    def eval_steps(self, steps: int) -> None:
        check_steps(eval_steps=steps)
        self._eval_steps.fill_(int(steps))

    # -- pieces the algorithms use ---------------------------------------------------------------
    def params(self) -> Params:
        """The meta-parameters of the model (the starting point of adaptation)."""
        return core.named_params(self.model)

    def device(self) -> torch.device:
        """Device of the model's parameters."""
        return next(self.model.parameters()).device

    def exec_path(self, order: int | None = None) -> str:
        """The execution path for this model, order and device (see `core.choose_path`); inside
        `meta_backward`, the path it runs (the timed or chosen one)."""
        if self._trial is not None:
            return self._trial
        return core.choose_path(self.model, self.order if order is None else order, self.device(), self.path)

    def _workload(self, batch: TaskBatch) -> tuple:
        return (self._order_now(), len(batch), tuple(batch.support_x.shape[1:]), tuple(batch.query_x.shape[1:]),
                str(batch.support_x.dtype))

    def _path_for(self, batch: TaskBatch) -> str:
        """The path for this meta-batch: the only candidate, the one chosen for this workload, or the
        next to time (round robin; the fastest once each ran TIMED_RUNS times after a warm-up).

        Like cuDNN's benchmark mode, the choice follows the clock: two fresh runs can take different
        paths, whose results differ in rounding; checkpoints carry the choice, and an explicit `path`
        makes runs bit-identical."""
        candidates = core.path_candidates(self.model, self._order_now(), self.device(), self.path)
        key = self._workload(batch)
        if len(candidates) == 1:
            return candidates[0]
        if key in self.tuned_paths and self.tuned_paths[key] in candidates:
            return self.tuned_paths[key]
        times = self._timings.setdefault(key, {c: [] for c in candidates})
        return min(candidates, key=lambda c: len(times.setdefault(c, [])))

    def _time_path(self, batch: TaskBatch, path: str, seconds: float) -> None:
        key = self._workload(batch)
        if key in self.tuned_paths or key not in self._timings:
            return
        times = self._timings[key]
        times[path].append(seconds)
        if all(len(t) > TIMED_RUNS for t in times.values()):
            # The first run of each path is a warm-up (lazy imports, allocator): not counted.
            self.tuned_paths[key] = min(times, key=lambda c: statistics.median(times[c][1:]))

    def _order_now(self) -> int:
        """The order in force at this iteration (MAML's order annealing overrides it)."""
        return self.order

    def path_state(self) -> dict:
        """The paths `auto` chose by timing and the timings of those still being chosen (for checkpoints)."""
        return {"chosen": dict(self.tuned_paths), "timings": {k: {p: list(t) for p, t in v.items()}
                                                              for k, v in self._timings.items()}}

    def load_path_state(self, state: dict) -> None:
        """Take the path choices (and timings) of `path_state`, e.g. from a checkpoint being resumed."""
        self.tuned_paths.update(state.get("chosen", {}))
        for k, v in state.get("timings", {}).items():
            self._timings[k] = {p: list(t) for p, t in v.items()}

    def _check_batch(self, batch: TaskBatch) -> None:
        if not isinstance(batch, TaskBatch):
            raise TypeError(f"expected a metagrad.TaskBatch, got {type(batch).__name__}")
        if len(batch) == 0 or batch.support_x.shape[1] == 0 or batch.query_x.shape[1] == 0:
            raise ValueError(f"the TaskBatch needs at least one task, one support and one query example; "
                             f"got support {tuple(batch.support_x.shape)}, query {tuple(batch.query_x.shape)}")

    def fit_tasks(self, x: Tensor, y: Tensor, steps: int, path: str | None = None) -> Params:
        """Each task's parameters after `steps` inner steps on its `x [tasks, n, ...]`, without a graph
        to the start: stacked `[tasks, *param.shape]` (parameters not in `adapt_names` repeat theta)."""
        theta = self.params()

        def one(xi: Tensor, yi: Tensor, vmapped: bool) -> Params:
            return core.inner_loop(self.f, self.loss_fn, theta, xi, yi, self.inner_opt, steps, order=0,
                                   names=self.adapt_names, vmapped=vmapped)[-1]

        if core.parse_path(path or self.exec_path(1))[0] == "vmap":
            return vmap(lambda xi, yi: one(xi, yi, True), randomness="different")(x, y)
        fitted = [one(x[i], y[i], False) for i in range(x.shape[0])]
        return {n: torch.stack([p[n] for p in fitted]) for n in fitted[0]}

    def task_losses(self, stacked: Params, x: Tensor, y: Tensor, path: str | None = None) -> Tensor:
        """Loss of each task's parameters `stacked [tasks, ...]` on its own `x [tasks, n, ...]`: `[tasks]`."""
        def one(p: Params, xi: Tensor, yi: Tensor) -> Tensor:
            return self.loss_fn(self.f(p, xi), yi)

        if core.parse_path(path or self.exec_path(1))[0] == "vmap":
            return vmap(one, randomness="different")(stacked, x, y)
        return torch.stack([one({n: t[i] for n, t in stacked.items()}, x[i], y[i]) for i in range(x.shape[0])])

    def _meta_loss(self, batch: TaskBatch) -> tuple[Tensor, dict[str, float]]:
        raise NotImplementedError

    # -- public API --------------------------------------------------------------------------------
    def meta_loss(self, batch: TaskBatch) -> Tensor:
        """Scalar meta-objective over the batch, differentiable with respect to `self.parameters()`."""
        self._check_batch(batch)
        return self._meta_loss(batch)[0]

    def meta_backward(self, batch: TaskBatch, chunk_size: int | None = None) -> dict[str, float]:
        """Accumulate the meta-gradient into `.grad`, a chunk of tasks at a time (bounded memory)."""
        self._check_batch(batch)
        totals: dict[str, float] = {}
        path = self._path_for(batch)
        start, self._trial = time.perf_counter(), path
        try:
            for chunk in core.chunks(batch, path, chunk_size):
                loss, metrics = self._meta_loss(chunk)
                core.check_finite(loss, f"meta-loss at iteration {int(self.iteration)}")
                (loss * (len(chunk) / len(batch))).backward()
                for k, v in {"meta_loss": float(loss.detach()), **metrics}.items():
                    totals[k] = totals.get(k, 0.0) + v * len(chunk) / len(batch)
        finally:
            self._trial = None
        if self.device().type == "cuda":
            torch.cuda.synchronize()
        self._time_path(batch, path, time.perf_counter() - start)
        return totals

    def meta_step(self, batch: TaskBatch, optimizer: torch.optim.Optimizer) -> dict[str, float]:
        """One outer update on a meta-batch; returns its metrics (meta_loss, accuracy, grad_norm)."""
        optimizer.zero_grad(set_to_none=True)
        metrics = self.meta_backward(batch)
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])) if grads \
            else torch.zeros(())
        core.check_finite(norm, f"meta-gradient norm at iteration {int(self.iteration)}")
        metrics["grad_norm"] = float(norm)
        optimizer.step()
        self.iteration += 1
        return metrics

    def adapt(self, batch: TaskBatch, steps: int | None = None) -> Params:
        """Adapted parameters of every task after `steps` (default `eval_steps`) inner steps on its
        support set, stacked: each tensor `[tasks, *param.shape]`."""
        self._check_batch(batch)
        steps = self.eval_steps if steps is None else check_steps(steps=steps)
        return self.fit_tasks(batch.support_x, batch.support_y, steps)

    def predict(self, adapted: Params, x: Tensor) -> Tensor:
        """Outputs of each task's adapted model on its inputs `x [tasks, n, ...]`."""
        return torch.stack([self.f({n: p[i] for n, p in adapted.items()}, x[i]) for i in range(x.shape[0])])

    @torch.no_grad()
    def adaptation_curve(self, batch: TaskBatch, steps: int) -> tuple[Tensor, Tensor | None]:
        """Query loss (and accuracy for labels) of each task after 0..steps inner steps: `[tasks, steps+1]`."""
        self._check_batch(batch)
        check_steps(steps=steps)
        # No graph to the start (order 0), so vmap is right even with torch BatchNorm: the path of order 1.
        losses, accs = core.query_losses(self.f, self.loss_fn, self.params(), batch, self.inner_opt, steps,
                                         order=0, path=self.exec_path(1), names=self.adapt_names,
                                         all_steps=True)
        return losses, accs

    @torch.no_grad()
    def select_eval_steps(self, val_batch: TaskBatch, max_steps: int) -> int:
        """Early stopping of the inner loop: set and return the step count in 0..`max_steps` with the
        lowest mean query loss on the validation tasks `val_batch` (the fewest steps on a tie)."""
        check_steps(max_steps=max_steps)
        losses, _ = self.adaptation_curve(val_batch, max_steps)  # [tasks, max_steps + 1]
        self.eval_steps = int(torch.argmin(losses.mean(0)))
        return self.eval_steps


def check_steps(**kwargs: int) -> int:
    """Raise a clear error for a step count that is not a non-negative integer; return the (last) count."""
    for name, value in kwargs.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)
