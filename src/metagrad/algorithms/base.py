"""What every algorithm shares: the model as a parameter dict, the inner loop, the outer step.

An algorithm defines `_meta_loss(batch) -> (loss, metrics)`: a scalar whose gradient with respect
to `self.parameters()` is the algorithm's meta-gradient (its mean over the tasks of `batch`).
Everything else (meta_step, adapt, evaluation, checkpoints) is here once.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from metagrad import core
from metagrad.core import LossFn, Params, Path, TaskBatch
from metagrad.inner import InnerOptimizer, sgd


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
    ) -> None:
        super().__init__()
        if order not in (1, 2):
            raise ValueError(f"order must be 1 (first-order) or 2 (exact second order), got {order!r}")
        if int(inner_steps) != inner_steps or inner_steps < 0:
            raise ValueError(f"inner_steps must be a non-negative integer, got {inner_steps!r}")
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

    # -- pieces the algorithms use ---------------------------------------------------------------
    def params(self) -> Params:
        """The meta-parameters of the model (the starting point of adaptation)."""
        return core.named_params(self.model)

    def device(self) -> torch.device:
        """Device of the model's parameters."""
        return next(self.model.parameters()).device

    def exec_path(self, order: int | None = None) -> str:
        """The execution path for this model, order and device (see `core.choose_path`)."""
        return core.choose_path(self.model, self.order if order is None else order, self.device(), self.path)

    def _check_batch(self, batch: TaskBatch) -> None:
        if not isinstance(batch, TaskBatch):
            raise TypeError(f"expected a metagrad.TaskBatch, got {type(batch).__name__}")

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
        for chunk in core.chunks(batch, self.exec_path(), chunk_size):
            loss, metrics = self._meta_loss(chunk)
            core.check_finite(loss, f"meta-loss at iteration {int(self.iteration)}")
            (loss * (len(chunk) / len(batch))).backward()
            for k, v in {"meta_loss": float(loss.detach()), **metrics}.items():
                totals[k] = totals.get(k, 0.0) + v * len(chunk) / len(batch)
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
        """Adapted parameters of every task, stacked: each tensor `[tasks, *param.shape]`."""
        self._check_batch(batch)
        steps = self.inner_steps if steps is None else steps
        adapted = [
            core.inner_loop(self.f, self.loss_fn, self.params(), batch.support_x[i], batch.support_y[i],
                            self.inner_opt, steps, order=0, names=self.adapt_names)[-1]
            for i in range(len(batch))
        ]
        return {n: torch.stack([a[n] for a in adapted]) for n in adapted[0]}

    def predict(self, adapted: Params, x: Tensor) -> Tensor:
        """Outputs of each task's adapted model on its inputs `x [tasks, n, ...]`."""
        return torch.stack([self.f({n: p[i] for n, p in adapted.items()}, x[i]) for i in range(x.shape[0])])

    @torch.no_grad()
    def adaptation_curve(self, batch: TaskBatch, steps: int) -> tuple[Tensor, Tensor | None]:
        """Query loss (and accuracy for labels) of each task after 0..steps inner steps: `[tasks, steps+1]`."""
        self._check_batch(batch)
        losses, accs = core.query_losses(self.f, self.loss_fn, self.params(), batch, self.inner_opt, steps,
                                         order=0, path="loop", names=self.adapt_names, all_steps=True)
        return losses, accs
