"""feature-reuse: a frozen pre-trained body helps only on new tasks that need its features.

Setting. Regression tasks y = x . w + noise, x in R^dim, where the task weights w of a family lie in a
k-dimensional subspace: the family's "features" are the k directions x . u_j. Pre-training tasks use
the subspace U. New tasks use the rotated subspace cos(phi) U + sin(phi) V (V orthogonal to U),
phi = (1 - overlap) * pi / 2: overlap 1 is the pre-training family, overlap 0 needs entirely new features.

A body is pre-trained on the U family with ANIL (inner loop on the head only), network MLP
dim-hidden-hidden-1. Then on the new tasks:
  frozen body (feature reuse, ANIL-style): the body stays frozen and each task's head is the best
      linear head on its features, ridge least squares on the support set (`ridge`, bias unpenalised),
      so its failure is the features' and not the head's optimiser;
  MAML: from the same pre-trained network, `iterations` meta-training steps on the new family with the
      whole network in the inner and outer loop; at meta-test its inner loop adapts every weight.
The frozen body cannot represent directions it discarded, so on new features its error stays near
the task's variance whatever the head does; MAML rebuilds the body. The gap closes as the overlap grows.

Where adapting the whole network does not help: without meta-training on the new family, a few SGD
steps on all weights from the pre-trained network (the inner loop alone) do not create the new
features either (column `mse_all_weights_no_new_training`): in a handful of steps full adaptation also mostly
reuses features (Raghu et al. 2020); the body has to be re-learned in the outer loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from metagrad.algorithms import ANIL, MAML
from metagrad.core import TaskBatch
from metagrad.evaluation import mean_ci95
from metagrad.experiments import experiment
from metagrad.models import MLP
from metagrad.runs import Run
from metagrad.tasks.quadratic import LinearGaussian, random_rotation


@dataclass
class Config:
    dim: int = 8
    features: int = 2           # k, dimension of each family's weight subspace
    hidden: int = 40
    shots: int = 20
    query_shots: int = 20
    noise: float = 0.1
    inner_lr: float = 0.05
    inner_steps: int = 5
    outer_lr: float = 0.003          # MAML on the new family
    pretrain_outer_lr: float = 0.001  # ANIL's head-only inner loop is unstable at larger outer rates here
    meta_batch: int = 16
    pretrain_iterations: int = 600   # ANIL on the pre-training family (learns the body)
    iterations: int = 300            # MAML's meta-training on each new family
    ridge: float = 1.0               # the frozen body's per-task head: ridge least squares
    overlaps: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    n_test_tasks: int = 400
    seed: int = 0


def subspaces(cfg: Config, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Orthonormal training subspace U and an orthogonal one V, each `[features, dim]`."""
    if 2 * cfg.features > cfg.dim:
        raise ValueError(f"need 2 * features <= dim for two orthogonal subspaces, got features={cfg.features}, "
                         f"dim={cfg.dim}")
    q = random_rotation(1, cfg.dim, generator)[0]
    return q[:cfg.features], q[cfg.features:2 * cfg.features]


def family_at(cfg: Config, u: Tensor, v: Tensor, overlap: float) -> LinearGaussian:
    """Tasks whose weights lie in cos(phi) U + sin(phi) V, phi = (1 - overlap) pi / 2."""
    phi = (1.0 - overlap) * math.pi / 2
    return LinearGaussian(dim=cfg.dim, shots=cfg.shots, query_shots=cfg.query_shots, prior_std=1.0, noise=cfg.noise,
                          subspace=math.cos(phi) * u + math.sin(phi) * v, dtype=torch.float32)


def meta_train(algo, fam: LinearGaussian, cfg: Config, outer_lr: float, iterations: int,
               generator: torch.Generator) -> list[float]:
    """Adam at `outer_lr` over `iterations` meta-batches of `fam`; the meta-loss curve."""
    opt = torch.optim.Adam(algo.parameters(), lr=outer_lr)
    return [algo.meta_step(fam.sample(cfg.meta_batch, generator), opt)["meta_loss"] for _ in range(iterations)]


def query_losses(algo, batch: TaskBatch) -> Tensor:
    """Query MSE `[tasks]` after the algorithm's inner loop."""
    losses, _ = algo.adaptation_curve(batch, algo.inner_steps)
    return losses[:, -1]


def frozen_body_losses(net: torch.nn.Module, batch: TaskBatch, ridge: float) -> Tensor:
    """Query MSE `[tasks]` of each task's ridge least-squares head on the frozen body `net[:-1]`."""
    with torch.no_grad():
        def feats(x: Tensor) -> Tensor:  # [tasks, n, dim] -> [tasks, n, hidden + 1]: features and a bias column
            h = net[:-1](x)
            return torch.cat([h, torch.ones_like(h[..., :1])], -1).double()

        fs, fq = feats(batch.support_x), feats(batch.query_x)
        penalty = torch.eye(fs.shape[-1], dtype=fs.dtype)
        penalty[-1, -1] = 0.0
        head = torch.linalg.solve(fs.mT @ fs + ridge * penalty, fs.mT @ batch.support_y.double())
        return ((fq @ head - batch.query_y.double()) ** 2).mean((1, 2)).float()


def compare(cfg: Config) -> dict:
    """Pre-train the body; per overlap, the frozen body's best heads vs MAML meta-trained on the new family."""
    g = torch.Generator().manual_seed(cfg.seed)
    u, v = subspaces(cfg, g)
    torch.manual_seed(cfg.seed)  # nn.Linear's initialisation
    net = MLP((cfg.dim, cfg.hidden, cfg.hidden, 1))
    pre = ANIL(net, cfg.inner_lr, cfg.inner_steps)
    curves = {"pre-training (ANIL, U family)": meta_train(pre, family_at(cfg, u, v, 1.0), cfg, cfg.pretrain_outer_lr,
                                                          cfg.pretrain_iterations, g)}
    rows = []
    for overlap in cfg.overlaps:
        fam = family_at(cfg, u, v, overlap)
        test = fam.sample(cfg.n_test_tasks, g)
        copy = MLP((cfg.dim, cfg.hidden, cfg.hidden, 1))
        copy.load_state_dict(net.state_dict())
        maml = MAML(copy, cfg.inner_lr, cfg.inner_steps)
        full0 = query_losses(maml, test)
        curves[f"MAML, overlap {overlap}"] = meta_train(maml, fam, cfg, cfg.outer_lr, cfg.iterations, g)
        lf, lm = frozen_body_losses(net, test, cfg.ridge), query_losses(maml, test)
        gap, ci = mean_ci95(lf - lm)
        rows.append({"overlap": overlap, "mse_frozen_body": mean_ci95(lf)[0], "ci95_frozen": mean_ci95(lf)[1],
                     "mse_maml": mean_ci95(lm)[0], "ci95_maml": mean_ci95(lm)[1],
                     "gap_frozen_minus_maml": gap, "gap_ci95": ci,
                     "mse_all_weights_no_new_training": mean_ci95(full0)[0],
                     "mse_predict_zero": mean_ci95((test.query_y ** 2).mean((1, 2)))[0]})
    return {"table": rows, "curves": curves}


@experiment("feature-reuse", "A frozen pre-trained body fails on tasks needing new features; MAML adapts", Config)
def run_feature_reuse(cfg: Config, run: Run) -> dict:
    """Table of query MSE vs feature overlap; plots of the gap and the meta-training curves."""
    import matplotlib.pyplot as plt

    r = compare(cfg)
    rows = r["table"]
    fig, ax = plt.subplots(1, 2, figsize=(13, 4.8))
    x = [row["overlap"] for row in rows]
    ax[0].errorbar(x, [row["mse_frozen_body"] for row in rows], yerr=[row["ci95_frozen"] for row in rows],
                   marker="o", capsize=3, label="frozen pre-trained body, best head (feature reuse)")
    ax[0].errorbar(x, [row["mse_maml"] for row in rows], yerr=[row["ci95_maml"] for row in rows],
                   marker="o", capsize=3, label="MAML on the new family, whole network adapted")
    ax[0].plot(x, [row["mse_all_weights_no_new_training"] for row in rows], "--", color="tab:orange", alpha=0.6,
               label="pre-trained net, all weights adapted, no new meta-training")
    ax[0].plot(x, [row["mse_predict_zero"] for row in rows], "k:", label="predict 0 (task variance)")
    ax[0].set(xlabel="overlap of the new tasks' features with the pre-training features", ylabel="query MSE",
              title=f"{cfg.shots}-shot linear tasks in R^{cfg.dim}, {cfg.features} features per family")
    ax[0].legend(fontsize=7)
    for name, curve in r["curves"].items():
        if "overlap" in name and not name.endswith(f"overlap {cfg.overlaps[0]}"):
            continue
        c = torch.tensor(curve)
        k = max(1, len(c) // 50)
        ax[1].semilogy(c[: len(c) // k * k].view(-1, k).mean(1), label=name)
    ax[1].set(xlabel="iteration (means over bins of 1/50 of the run)", ylabel="meta-loss", title="meta-training")
    ax[1].legend(fontsize=7)
    run.save_figure(fig, "feature_reuse")
    return {"table": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()} for row in rows]}
