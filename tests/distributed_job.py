"""A torchrun job for test_distributed.py, and the single-process reference it is compared with.

Run as `torchrun ... tests/distributed_job.py OUT`: every rank computes the sharded meta-gradient of
the same global batch (float64) for MAML order 2 on the BatchNorm Conv4, Reptile and Meta-SGD, then
meta-trains each for 20 iterations with `meta_train` (a run folder that only rank 0 may write), and
saves its results to OUT/rank<r>.pt. `results(out)` computes the same in one process.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

from metagrad import TaskBatch, distributed
from metagrad.algorithms import MAML, MetaSGD, Reptile
from metagrad.models import MLP, Conv4
from metagrad.runs import Run
from metagrad.tasks import Sinusoid
from metagrad.train import meta_train

META_BATCH = 5  # not a multiple of 2: the shards differ in size
ITERATIONS = 20


class RandomImages:
    """3-way tasks of random 16x16 images (float64): enough to exercise the Conv4's convolutions and BatchNorm."""

    ways = 3

    def sample(self, n: int, generator: torch.Generator | None = None) -> TaskBatch:
        x = torch.randn(n, 6, 1, 16, 16, generator=generator, dtype=torch.float64)
        qx = torch.randn(n, 9, 1, 16, 16, generator=generator, dtype=torch.float64)
        y = torch.arange(3).repeat(2).expand(n, 6).contiguous()
        return TaskBatch(x, y, qx, torch.arange(3).repeat(3).expand(n, 9).contiguous())


def build(name: str) -> tuple[nn.Module, object]:
    """The algorithm and its task family, seeded: the same on every rank and in the reference."""
    torch.manual_seed(0)
    if name == "maml-conv4":
        return (MAML(Conv4(ways=3, in_channels=1, hidden=4, pool="max").double(), inner_lr=0.1, inner_steps=2,
                     order=2, loss_fn=nn.functional.cross_entropy, path="loop"), RandomImages())
    sinusoid = Sinusoid(shots=5, query_shots=5, dtype=torch.float64)
    if name == "reptile":
        return Reptile(MLP((1, 16, 16, 1)).double(), inner_lr=0.02, inner_steps=3), sinusoid
    return MetaSGD(MLP((1, 16, 16, 1)).double(), inner_lr=0.02, inner_steps=1, order=2), sinusoid


NAMES = ("maml-conv4", "reptile", "metasgd")


def results(out: Path) -> dict[str, torch.Tensor]:
    """Each algorithm's meta-gradient of one global batch and its parameters after ITERATIONS iterations."""
    found = {}
    for name in NAMES:
        alg, tasks = build(name)
        batch = tasks.sample(META_BATCH, torch.Generator().manual_seed(1))
        grads = distributed.meta_gradient(alg, batch, 0)
        found[f"{name}/grad"] = torch.cat([g.flatten() for g in grads.values()])
        run = Run(out / name, {"algorithm": name}) if distributed.is_writer() else None
        # SGD for the Conv4: its conv biases feed a BatchNorm, so their true meta-gradient is 0 and what is
        # computed is rounding noise (~1e-17), which Adam would scale up to full-size steps that differ
        # with the order of any sum, sharded or not. Adam for the others.
        opt = torch.optim.SGD(alg.parameters(), lr=0.1) if name == "maml-conv4" else None
        meta_train(alg, tasks, ITERATIONS, META_BATCH, outer_lr=1e-2, run=run, seed=3, optimizer=opt, log_every=5,
                   checkpoint_every=10, progress=False)
        found[f"{name}/params"] = torch.cat([p.detach().flatten() for p in alg.parameters()])
    return found


if __name__ == "__main__":
    torch.set_num_threads(1)
    distributed.init_from_env()
    out = Path(sys.argv[1])
    torch.save(results(out), out / f"rank{distributed.rank()}.pt")
