"""The evaluation protocol of the field: adapt on N held-out tasks, report mean and 95% CI."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

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
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if isinstance(tasks, TaskBatch):
        batches = [tasks[i:i + batch_size] for i in range(0, len(tasks), batch_size)]
    else:
        if n_tasks < 1:
            raise ValueError(f"n_tasks must be positive, got {n_tasks}")
        sizes = [min(batch_size, n_tasks - i) for i in range(0, n_tasks, batch_size)]
        # Sampled one batch at a time: 600 episodes of 20-way 5-shot would hold hundreds of MB at once.
        batches = (tasks.sample(s, generator) for s in sizes)
    device = algorithm.device()
    per_task = []
    metric = "loss"
    was_training = algorithm.training
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
    curves = torch.cat(per_task)  # [tasks, steps + 1]
    stats = [mean_ci95(curves[:, k]) for k in range(curves.shape[1])]
    return EvalResult(metric, stats[-1][0], stats[-1][1], curves.shape[0], steps,
                      [m for m, _ in stats], [c for _, c in stats])
