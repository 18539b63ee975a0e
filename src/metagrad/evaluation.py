"""The evaluation protocol of the field: adapt on N held-out tasks, report mean and 95% CI."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from metagrad.algorithms.base import check_steps
from metagrad.core import TaskBatch
from metagrad.tasks.base import TaskDistribution


@dataclass
class EvalResult:
    """Metric after `steps` inner steps (mean, 95% CI half-width) and the curve over 0..steps."""

    metric: str
    mean: float
    ci95: float
    n_tasks: int
    steps: int
    curve: list[float]
    curve_ci95: list[float]

    def as_dict(self) -> dict:
        """Plain dict for results.json."""
        return asdict(self)

    def __str__(self) -> str:
        scale, unit = (100.0, "%") if self.metric == "accuracy" else (1.0, "")
        return (f"{self.metric} {self.mean * scale:.3f}{unit} ± {self.ci95 * scale:.3f}{unit} "
                f"(95% CI, {self.n_tasks} tasks)")


def mean_ci95(values: torch.Tensor) -> tuple[float, float]:
    """Mean and 95% confidence half-width (normal approximation, 1.96 standard errors) over dim 0."""
    values = values.double()
    n = values.shape[0]
    sd = values.std(dim=0, unbiased=True) if n > 1 else torch.zeros_like(values[0])
    return float(values.mean(0)), float(1.96 * sd / math.sqrt(n))


def _restore(algorithm, buffers: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for n, b in algorithm.model.named_buffers():
            b.copy_(buffers[n])


def _sampled(tasks: TaskDistribution | TaskBatch, n_tasks: int, generator: torch.Generator | None,
             batch_size: int):
    """The task batches of an evaluation: slices of a given batch, or `n_tasks` sampled `batch_size` at a time."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if isinstance(tasks, TaskBatch):
        return [tasks[i:i + batch_size] for i in range(0, len(tasks), batch_size)]
    if n_tasks < 1:
        raise ValueError(f"n_tasks must be positive, got {n_tasks}")
    sizes = [min(batch_size, n_tasks - i) for i in range(0, n_tasks, batch_size)]
    # Sampled one batch at a time: 600 episodes of 20-way 5-shot would hold hundreds of MB at once.
    return (tasks.sample(s, generator) for s in sizes)


def shifted(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Images `[..., H, W]` moved `dy` pixels down and `dx` right, the edge pixels repeated into the gap."""
    h, w = x.shape[-2:]
    if abs(dy) >= h or abs(dx) >= w:
        raise ValueError(f"a shift of ({dy}, {dx}) pixels moves a {h}x{w} image out of its frame")
    if dy == 0 and dx == 0:
        return x
    p = max(abs(dy), abs(dx))
    # Repeating the edge rather than wrapping round (torch.roll) keeps a stroke near one border off the other.
    padded = F.pad(x.reshape(-1, 1, h, w), (p, p, p, p), mode="replicate")
    return padded[..., p - dy:p - dy + h, p - dx:p - dx + w].reshape(x.shape)


def shift_views(radius: int) -> list[tuple[int, int]]:
    """The (dy, dx) shifts of test-time augmentation: every shift of at most `radius` pixels along each axis,
    (0, 0) first; radius 0: the images as they are."""
    if radius < 0:
        raise ValueError(f"radius must be >= 0, got {radius}")
    r = range(-radius, radius + 1)
    return sorted(((dy, dx) for dy in r for dx in r), key=lambda s: (s != (0, 0), s))


def rotation_views(turns: int) -> list[int]:
    """The quarter-turns of test-time augmentation by rotating whole tasks: 1, the task as it is ([0]); 2, also
    upside down ([0, 2]); 4, every quarter-turn ([0, 1, 2, 3])."""
    if turns not in (1, 2, 4):
        raise ValueError(f"rotation views are 1 (none), 2 (and a half-turn) or 4 (every quarter-turn); got {turns}")
    return list(range(0, 4, 4 // turns))


def tta_views(query_shift: int, support_shift: int, rotations: int = 1) -> dict[str, list]:
    """`evaluate_ensemble`'s `query_shifts`, `support_shifts` and `task_rotations` for shifts of up to these many
    pixels and `rotations` views of each task (`rotation_views`)."""
    return {"query_shifts": shift_views(query_shift), "support_shifts": shift_views(support_shift),
            "task_rotations": rotation_views(rotations)}


def rotated_task(batch: TaskBatch, turns: int) -> TaskBatch:
    """The task with every support and query image `[..., H, W]` turned by `turns` quarter-turns counter-clockwise
    (labels as they are): the same task seen another way round."""
    if turns % 4 == 0:
        return batch
    h, w = batch.support_x.shape[-2:]
    if h != w or batch.query_x.shape[-2:] != (h, w):
        raise ValueError(f"rotating a task needs square images of one size; support {tuple(batch.support_x.shape)}, "
                         f"query {tuple(batch.query_x.shape)}")
    return TaskBatch(torch.rot90(batch.support_x, turns, (-2, -1)), batch.support_y,
                     torch.rot90(batch.query_x, turns, (-2, -1)), batch.query_y)


def with_shifted_support(batch: TaskBatch, shifts: Sequence[tuple[int, int]]) -> TaskBatch:
    """The batch with its support set in every view of `shifts` (labels repeated): support
    `[tasks, shots * len(shifts), ...]`, views in the order given; the query set as it is."""
    if not shifts:
        raise ValueError("support_shifts needs at least one view, (0, 0) for the images as they are")
    if list(shifts) == [(0, 0)]:
        return batch
    x = torch.cat([shifted(batch.support_x, dy, dx) for dy, dx in shifts], 1)
    y = batch.support_y.repeat(1, len(shifts), *([1] * (batch.support_y.dim() - 2)))
    return TaskBatch(x, y, batch.query_x, batch.query_y)


@torch.no_grad()
def ensemble_predict(members: Sequence, batch: TaskBatch,
                     query_shifts: Sequence[tuple[int, int]] = ((0, 0),),
                     support_shifts: Sequence[tuple[int, int]] = ((0, 0),),
                     task_rotations: Sequence[int] = (0,)) -> torch.Tensor:
    """The ensemble's prediction on each task's query inputs: for each whole-task rotation in `task_rotations`
    (`rotated_task`), every member adapts on the support set (`eval_steps` steps; in every view of
    `support_shifts`, `with_shifted_support`) and predicts on each view of the query images (`query_shifts`);
    class probabilities (integer labels) or outputs are averaged over the rotations, members and query views:
    `[tasks, query_shots, ...]`. The views (`tta_views`) are test-time augmentation; their default is the task
    as it is."""
    if not members:
        raise ValueError("an ensemble needs at least one member")
    if not query_shifts:
        raise ValueError("query_shifts needs at least one view, (0, 0) for the images as they are")
    if not task_rotations:
        raise ValueError("task_rotations needs at least one view, 0 for the task as it is")
    # Each support view adds the batch's support set again: the tasks in as many chunks as views keep the memory of
    # an adaptation that of the plain batch (25 views of 100 Omniglot tasks at once filled 24 GiB). Tasks adapt
    # independently, so the chunks change no prediction.
    size = -(-len(batch) // max(len(support_shifts), 1))  # none: one chunk, and with_shifted_support refuses it
    # A rotated task is a task of the same distribution where training saw rotated classes (Omniglot's MAML
    # split): its prediction is one more view, as a shifted image is, averaged with the same weight.
    return torch.stack([torch.cat([_predict(members, rotated_task(batch[i:i + size], k), query_shifts, support_shifts)
                                   for i in range(0, len(batch), size)]) for k in task_rotations]).mean(0)


def _predict(members: Sequence, batch: TaskBatch, query_shifts: Sequence[tuple[int, int]],
             support_shifts: Sequence[tuple[int, int]]) -> torch.Tensor:
    classify = not batch.query_y.is_floating_point()
    support = with_shifted_support(batch, support_shifts)
    preds = []
    for m in members:
        buffers = {n: b.clone() for n, b in m.model.named_buffers()}
        adapted = m.adapt(support)
        for dy, dx in query_shifts:
            # One forward pass per view: the batch statistics stay those of one view of the query set.
            out = m.predict(adapted, shifted(batch.query_x, dy, dx))
            preds.append(out.softmax(-1) if classify else out)
        _restore(m, buffers)
    return torch.stack(preds).mean(0)


def evaluate_ensemble(
    members: Sequence,
    tasks: TaskDistribution | TaskBatch,
    n_tasks: int = 1000,
    generator: torch.Generator | None = None,
    batch_size: int = 100,
    query_shifts: Sequence[tuple[int, int]] = ((0, 0),),
    support_shifts: Sequence[tuple[int, int]] = ((0, 0),),
    task_rotations: Sequence[int] = (0,),
) -> EvalResult:
    """Query accuracy (integer labels: the argmax of the mean probability) or loss (the first member's `loss_fn`
    of the mean output) of the ensemble `ensemble_predict` on held-out tasks: mean and 95% CI over the tasks.
    MAML++ tests the ensemble of its five best validation checkpoints (`meta_train(keep_best=5)`); one member
    with `query_shifts`, `support_shifts` and `task_rotations` (`tta_views`) is test-time augmentation of a single
    model. The result's curve holds the members' `eval_steps` point only."""
    device = members[0].device() if members else None
    per_task, metric = [], "loss"
    for b in _sampled(tasks, n_tasks, generator, batch_size):
        b = b.to(device)
        mean = ensemble_predict(members, b, query_shifts, support_shifts, task_rotations)
        if not b.query_y.is_floating_point():
            metric = "accuracy"
            per_task.append((mean.argmax(-1) == b.query_y).double().mean(1).cpu())
        else:
            per_task.append(torch.stack([members[0].loss_fn(p, y) for p, y in zip(mean, b.query_y)]).double().cpu())
    values = torch.cat(per_task)
    m, ci = mean_ci95(values)
    steps = members[0].eval_steps
    return EvalResult(metric, m, ci, values.shape[0], steps, [m], [ci])


def evaluate(
    algorithm,
    tasks: TaskDistribution | TaskBatch,
    n_tasks: int = 1000,
    steps: int | None = None,
    generator: torch.Generator | None = None,
    batch_size: int = 100,
    progress: bool = False,
) -> EvalResult:
    """Adapt `algorithm` on `n_tasks` held-out tasks for 0..`steps` inner steps (default: its
    `eval_steps`, i.e. `inner_steps` unless chosen by `select_eval_steps`) and report query accuracy
    for classification, query loss otherwise. `progress` shows a bar over the tasks."""
    steps = algorithm.eval_steps if steps is None else check_steps(steps=steps)
    batches = _sampled(tasks, n_tasks, generator, batch_size)
    device = algorithm.device()
    per_task = []
    metric = "loss"
    was_training = algorithm.training
    # Meta-test adaptation must not move running statistics (MAML++'s per-step ones): restored at the end, as
    # the MAML++ code backs them up around evaluation.
    buffers = {n: b.clone() for n, b in algorithm.model.named_buffers()}
    if progress:  # a bar over tasks: 600 Omniglot episodes take minutes on a CPU
        from tqdm.auto import tqdm

        total = len(tasks) if isinstance(tasks, TaskBatch) else n_tasks
        bar = tqdm(total=total, desc="evaluate", unit="task", dynamic_ncols=True, mininterval=0.5)
    for b in batches:
        losses, accs = algorithm.adaptation_curve(b.to(device), steps)
        metric = "accuracy" if accs is not None else "loss"
        per_task.append((accs if accs is not None else losses).cpu())
        if progress:
            bar.update(len(b))
    if progress:
        bar.close()
    algorithm.train(was_training)
    _restore(algorithm, buffers)
    curves = torch.cat(per_task)  # [tasks, steps + 1]
    stats = [mean_ci95(curves[:, k]) for k in range(curves.shape[1])]
    return EvalResult(metric, stats[-1][0], stats[-1][1], curves.shape[0], steps,
                      [m for m, _ in stats], [c for _, c in stats])
