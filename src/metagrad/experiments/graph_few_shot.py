"""Few-shot node classification: a small GCN classifies the rest of a new graph's nodes from a few labelled ones.

    for shots in (1, 2):
        tasks  = graphs of the contextual stochastic block model (metagrad.tasks.graph_sbm): `ways` blocks,
                 class means of the node features drawn fresh per graph, `shots` labelled nodes per class,
                 every other node scored
        model  = two graph convolutions on plain torch (metagrad.models.gnn.GCN)
        MAML   = its start meta-trained (order 2 and order 1) for `inner_steps` SGD steps at inner_lr
        pooled = the GCN pre-trained on all graphs' labelled nodes at once (then fine-tuned like the others)
        random = torch's default initialisation (training a GCN on the new graph from scratch)
        score every start on held-out graphs after 0..eval_steps SGD steps: query accuracy

Because a class's features change from graph to graph, no start can classify before adapting (1/ways at
step 0); what a start can do is make the first few steps count.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from metagrad.experiments import experiment
from metagrad.experiments.starts import compare, maml_and_pooled, plot_curves, seeded, start, table
from metagrad.models.gnn import GCN
from metagrad.runs import Run
from metagrad.tasks.graph_sbm import GraphSBM


@dataclass
class Config:
    """Hyper-parameters of the few-shot node classification comparison."""

    seed: int = 0
    shots: tuple[int, ...] = (1, 2)
    ways: int = 3
    nodes_per_class: int = 10
    features: int = 8
    class_sd: float = 0.6
    hidden: int = 32
    inner_lr: float = 0.5
    inner_steps: int = 3
    eval_steps: int = 10
    iterations: int = 500
    meta_batch: int = 16
    outer_lr: float = 0.005
    test_tasks: int = 500


@experiment("graph-few-shot", "few-shot node classification on new SBM graphs with a plain-torch GCN: MAML start "
            "vs pre-trained vs random", Config)
def graph_few_shot(cfg: Config, run: Run) -> dict:
    """Compare the GCN starts for every number of labelled nodes per class in `cfg.shots`."""
    rows, curves = [], {}
    for shots in cfg.shots:
        family = GraphSBM(ways=cfg.ways, shots=shots, query_shots=cfg.nodes_per_class - shots,
                          nodes_per_class=cfg.nodes_per_class, features=cfg.features, class_sd=cfg.class_sd)
        test = family.sample(cfg.test_tasks, torch.Generator().manual_seed(cfg.seed + 1))

        def gcn() -> GCN:
            return seeded(lambda: GCN(cfg.features, cfg.hidden, cfg.ways), cfg.seed)

        starts, _ = maml_and_pooled(gcn, family, cfg, run, f"shots{shots}/", F.cross_entropy)
        starts["pre-trained (pooled)"] = starts.pop("pooled fit")
        starts["random init"] = start(gcn(), cfg.inner_lr, F.cross_entropy)

        results = compare(starts, test, cfg.eval_steps)
        show = sorted({k for k in (0, 1, cfg.inner_steps, 5) if k <= cfg.eval_steps} | {cfg.eval_steps})
        rows += table(results, show, {name: {"shots": shots} for name in starts})
        curves[f"shots={shots}"] = {name: r.as_dict() for name, r in results.items()}
        plot_curves(results, run, f"curves_shots{shots}", f"GCN on new {cfg.ways}-class SBM graphs, {shots} labelled "
                    "node(s) per class")
    return {"table": rows, "curves": curves}
