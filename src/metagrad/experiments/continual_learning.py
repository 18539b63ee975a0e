"""Class-incremental learning (tasks/continual.py): classes arrive one at a time; how much is forgotten?

    learn(theta, task): for each class c in arrival order: `inner_steps` SGD steps on c's `shots` examples only
    MAML start: meta-train theta so that the query loss over ALL classes after learn(theta, task) is low
        (the objective of OML, Javed & White, NeurIPS 2019, here on the whole network, exact order 2 or 1)
    for each of >= 500 held-out sequences of unseen classes, from each start run learn(.) and record the
        accuracy matrix R[t, j] = query accuracy on class j after learning class t (argmax over seen classes)
    report (Lopez-Paz & Ranzato, GEM, NeurIPS 2017): final accuracy ACC = mean_j R[T, j];
        forgetting = -BWT = mean_{j<T} (R[j, j] - R[T, j]), the drop of old classes' accuracy
Starts: MAML (order 2, 1); training from scratch (random init); plain fine-tuning of a network pre-trained
on the pooled training classes (its head replaced by a zero head for the new classes).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metagrad.algorithms import MAML
from metagrad.core import Adapter, Params, TaskBatch
from metagrad.evaluation import mean_ci95
from metagrad.experiments import experiment
from metagrad.experiments.starts import plot_curves, train
from metagrad.models import MLP
from metagrad.runs import Run
from metagrad.tasks.continual import ClassIncremental


@dataclass
class Config:
    """Hyper-parameters (MAML paper names); `inner_steps` SGD steps per arriving class."""

    ways: int = 5
    shots: int = 5
    query_shots: int = 20
    hidden: int = 64
    inner_lr: float = 0.1
    inner_steps: int = 2
    outer_lr: float = 1e-3
    meta_batch: int = 16
    iterations: int = 500
    pretrain_iterations: int = 1000
    eval_tasks: int = 500
    seed: int = 0


@dataclass(frozen=True)
class ClassByClass(Adapter):
    """The adapter of a task whose classes arrive one at a time: `steps` inner steps on each class's
    support examples in turn (support `[ways * shots, ...]` grouped by class); the trajectory holds the
    parameters after each arriving class."""

    ways: int = 5

    def trajectory(self, params: Params, support: tuple[Tensor, Tensor]) -> list[Params]:
        x, y = support
        shots = x.shape[0] // self.ways
        after = [params]
        for c in range(self.ways):
            part = slice(c * shots, (c + 1) * shots)
            after.append(Adapter.trajectory(self, after[-1], (x[part], y[part]))[-1])
        return after


class SequentialMAML(MAML):
    """MAML whose inner loop learns the task's classes one after another."""

    def __init__(self, model: nn.Module, ways: int, **kwargs) -> None:
        super().__init__(model, loss_fn=F.cross_entropy, path="loop", **kwargs)
        self.ways = ways

    def adapter(self, iteration: int | None = None, steps: int | None = None, order: int | None = None) -> Adapter:
        base = super().adapter(iteration, steps, order)
        return ClassByClass(**{f.name: getattr(base, f.name) for f in fields(Adapter)}, ways=self.ways)


@torch.no_grad()
def accuracy_matrix(alg: SequentialMAML, test: TaskBatch) -> Tensor:
    """R `[tasks, ways, ways]`: R[:, t, j] = query accuracy on class j after learning classes 0..t (j <= t)."""
    ways = alg.ways
    R = torch.zeros(len(test), ways, ways)
    after = alg.trajectories(test.support, alg.inner_steps)  # {name: [tasks, 1 + ways, ...]}: after each class
    for i in range(len(test)):
        qx, qy = test.query_x[i], test.query_y[i]
        for t in range(ways):
            p = {n: v[i, t + 1] for n, v in after.items()}
            pred = alg.f(p, qx)[:, : t + 1].argmax(-1)
            for j in range(t + 1):
                R[i, t, j] = (pred[qy == j] == j).float().mean()
    return R


def pretrain(model: nn.Module, tasks: ClassIncremental, iterations: int, lr: float, ways: int,
             generator: torch.Generator) -> nn.Module:
    """Train a classifier of all training classes on pooled examples, then give it a zero head for `ways` classes."""
    body, head = model[:-1], model[-1]
    wide = nn.Sequential(*body, nn.Linear(head.in_features, tasks.train_classes))
    opt = torch.optim.Adam(wide.parameters(), lr=lr)
    for _ in range(iterations):
        x, y = tasks.pooled(256, generator)
        opt.zero_grad()
        F.cross_entropy(wide(x), y).backward()
        opt.step()
    new_head = nn.Linear(head.in_features, ways)
    nn.init.zeros_(new_head.weight)
    nn.init.zeros_(new_head.bias)
    return nn.Sequential(*wide[:-1], new_head)


@experiment("continual-learning", "classes learned one at a time: forgetting from the MAML start vs scratch vs "
            "fine-tuning a pre-trained network", Config)
def run(cfg: Config, run: Run) -> dict:
    """Train the starts, run the class sequence of held-out tasks from each, report accuracy and forgetting."""
    torch.manual_seed(cfg.seed)
    kw = {"ways": cfg.ways, "shots": cfg.shots, "query_shots": cfg.query_shots}
    tasks, held_out = ClassIncremental(split="train", **kw), ClassIncremental(split="test", **kw)
    test = held_out.sample(cfg.eval_tasks, torch.Generator().manual_seed(cfg.seed + 10_000))
    init = MLP((tasks.dim, cfg.hidden, cfg.hidden, cfg.ways))
    starts = {}
    for name, order in (("MAML (order 2)", 2), ("MAML (order 1)", 1)):
        alg = SequentialMAML(copy.deepcopy(init), cfg.ways, inner_lr=cfg.inner_lr, inner_steps=cfg.inner_steps,
                             order=order)
        train(alg, tasks, cfg.iterations, cfg.meta_batch, cfg.outer_lr, cfg.seed + 1,
              run, name)
        starts[name] = alg
    starts["scratch (random init)"] = SequentialMAML(copy.deepcopy(init), cfg.ways, inner_lr=cfg.inner_lr,
                                                     inner_steps=cfg.inner_steps)
    pre = pretrain(copy.deepcopy(init), tasks, cfg.pretrain_iterations, cfg.outer_lr, cfg.ways,
                   torch.Generator().manual_seed(cfg.seed + 2))
    starts["fine-tuning (pre-trained)"] = SequentialMAML(pre, cfg.ways, inner_lr=cfg.inner_lr,
                                                         inner_steps=cfg.inner_steps)
    T = cfg.ways - 1
    rows, seen_curves, final_curves, matrices, summary = [], {}, {}, {}, {}
    for name, alg in starts.items():
        R = accuracy_matrix(alg, test)
        matrices[name] = R.mean(0).tolist()
        acc = R[:, T].mean(-1)
        forgetting = (torch.diagonal(R, dim1=1, dim2=2)[:, :T] - R[:, T, :T]).mean(-1)
        summary[name] = {"final_accuracy": mean_ci95(acc), "forgetting": mean_ci95(forgetting),
                         "accuracy_when_learned": mean_ci95(torch.diagonal(R, dim1=1, dim2=2).mean(-1))}
        rows.append({"start": name, **{k: "{:.3f} ± {:.3f}".format(*v) for k, v in summary[name].items()}})
        old = [mean_ci95(R[:, t, :t].mean(-1)) for t in range(1, cfg.ways)]
        seen_curves[name] = ([m for m, _ in old], [c for _, c in old])
        final = [mean_ci95(R[:, T, j]) for j in range(cfg.ways)]
        final_curves[name] = ([m for m, _ in final], [c for _, c in final])
    plot_curves(seen_curves, run, "old_class_accuracy", f"{cfg.ways} new classes, {cfg.shots} shots each",
                "query accuracy on the earlier classes", "classes learned so far", x=list(range(2, cfg.ways + 1)))
    plot_curves(final_curves, run, "final_accuracy_by_class", "after the whole sequence", "final query accuracy",
                "arrival position of the class", x=list(range(1, cfg.ways + 1)))
    return {"config": asdict(cfg), "table": rows, "summary": summary, "accuracy_matrices": matrices}
