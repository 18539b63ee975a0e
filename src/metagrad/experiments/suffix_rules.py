"""Suffix rules: a new inflection rule (an affine map between word vectors) from one or two examples.

    for shots in (1, 2):
        tasks    = rules y = A_r x + c_r (near a translation, metagrad.tasks.suffix_rules), `shots`
                   (stem, inflected) pairs each
        model    = one affine map nn.Linear(dim, dim)
        MAML     = its start meta-trained (order 2 and order 1) for `inner_steps` SGD steps at inner_lr
        Meta-SGD = MAML with a learned rate for every parameter (metagrad.inner.per_parameter_lr)
        pooled   = the affine map that fits all rules' pairs best
        identity = A = I, c = 0 ("the inflected word is the stem"); zero = A = 0, c = 0
        offset   = the vector-offset method (Mikolov et al. 2013): A = I and c = mean(y - x) of the examples,
                   which is one SGD step on c alone at rate dim / 2 (so it is flat after step 1)
        score every start on held-out rules after 0..eval_steps steps: query MSE per vector entry

A linear model's adapted parameters are affine in its start, so the MAML start and the pooled fit both
sit at the mean rule and adapt alike; what a fixed-rate gradient step lacks here is conditioning (the
offset is learned dim times slower than the matrix), which learned per-parameter rates supply: Meta-SGD's
learned rate for c approaches dim / 2, i.e. it rediscovers the vector-offset method (`metasgd_mean_rates`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from metagrad.algorithms import MAML
from metagrad.algorithms.base import Algorithm
from metagrad.core import named_params
from metagrad.experiments import experiment
from metagrad.experiments.starts import compare, maml_and_pooled, plot_curves, seeded, start, table, train
from metagrad.inner import per_parameter_lr
from metagrad.runs import Run
from metagrad.tasks.suffix_rules import SuffixRules


@dataclass
class Config:
    """Hyper-parameters of the suffix-rule comparison."""

    seed: int = 0
    shots: tuple[int, ...] = (1, 2)
    query_shots: int = 10
    dim: int = 16
    inner_lr: float = 0.5
    inner_steps: int = 1
    eval_steps: int = 5
    iterations: int = 1000
    meta_batch: int = 25
    outer_lr: float = 0.01
    test_tasks: int = 1000


@experiment("suffix-rules", "a new inflection rule (affine map of word vectors) from 1-2 examples: MAML, Meta-SGD, "
            "pooled fit, identity, vector offset", Config)
def suffix_rules(cfg: Config, run: Run) -> dict:
    """Compare the starts for every number of examples in `cfg.shots`."""
    rows, curves, rates = [], {}, {}
    for shots in cfg.shots:
        family = SuffixRules(shots=shots, query_shots=cfg.query_shots, dim=cfg.dim)
        test = family.sample(cfg.test_tasks, torch.Generator().manual_seed(cfg.seed + 1))

        def affine(kind: str = "random") -> nn.Linear:
            m = seeded(lambda: nn.Linear(cfg.dim, cfg.dim), cfg.seed)
            if kind in ("zero", "identity"):
                nn.init.zeros_(m.bias)
                (nn.init.eye_ if kind == "identity" else nn.init.zeros_)(m.weight)
            return m

        starts, _ = maml_and_pooled(affine, family, cfg, run, f"shots{shots}/")
        model = affine()
        metasgd = MAML(model, inner_steps=cfg.inner_steps,
                       inner_opt=per_parameter_lr(named_params(model), cfg.inner_lr))
        train(metasgd, family, cfg.iterations, cfg.meta_batch, cfg.outer_lr, cfg.seed, run, f"shots{shots}/metasgd")
        starts["Meta-SGD (order 2)"] = metasgd
        starts["pooled fit"] = starts.pop("pooled fit")  # rows in the order MAML, Meta-SGD, pooled
        starts["identity"] = start(affine("identity"), cfg.inner_lr)
        starts["zero"] = start(affine("zero"), cfg.inner_lr)
        starts["vector offset"] = Algorithm(affine("identity"), inner_lr=cfg.dim / 2, inner_steps=0,
                                            adapt_names=["bias"])

        results = compare(starts, test, cfg.eval_steps)
        rows += table(results, [0, 1, 2, cfg.eval_steps], {name: {"shots": shots} for name in starts})
        curves[f"shots={shots}"] = {name: r.as_dict() for name, r in results.items()}
        rates[f"shots={shots}"] = {n: float(r.detach().mean()) for n, r in metasgd.inner_opt.meta_params.items()}
        plot_curves(results, run, f"curves_shots{shots}", f"suffix rules: a new rule from {shots} example(s)",
                    "query MSE per vector entry", log=True)
    return {"table": rows, "curves": curves, "metasgd_mean_rates": rates, "offset_rate": cfg.dim / 2}
