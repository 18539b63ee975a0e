"""Personalised medicine: a new patient's linear response model from 1-3 measurements.

    for shots in (1, 2, 3):
        tasks   = patients of the linear mixed-effects model (metagrad.tasks.personalised_medicine)
        MAML    = linear model meta-trained (order 2 and order 1) so that `inner_steps` SGD steps on a
                  patient's measurements fit the patient
        pooled  = the same linear model fitted to all patients' measurements at once
        zero    = all coefficients 0 (what fitting a single patient from scratch starts from)
        score every start on 1,000 held-out patients after 0..eval_steps SGD steps at inner_lr

inner_lr is small (0.05) because with one measurement x the loss curvature is 2 (|x|^2 + 1), often
above 10, and larger fixed rates diverge within a few steps. The MAML start should land near the
population coefficients and beat the zero start after one or two steps. In this linear-Gaussian model
the best start is the population mean itself, so the pooled fit (which estimates it too) is expected to
match MAML: the table shows whether it does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from metagrad.experiments import experiment
from metagrad.experiments.starts import compare, maml_and_pooled, plot_curves, seeded, start, table
from metagrad.runs import Run
from metagrad.tasks.personalised_medicine import PersonalisedMedicine


@dataclass
class Config:
    """Hyper-parameters of the personalised-medicine comparison."""

    seed: int = 0
    shots: tuple[int, ...] = (1, 2, 3)
    query_shots: int = 10
    inner_lr: float = 0.05
    inner_steps: int = 2
    eval_steps: int = 5
    iterations: int = 500
    meta_batch: int = 25
    outer_lr: float = 0.01
    test_tasks: int = 1000


def distance_to_population(model: nn.Linear, family: PersonalisedMedicine) -> float:
    """Euclidean distance between the model's (coefficients, intercept) and the population's."""
    coef, intercept = family.population()
    theta = torch.cat([model.weight.detach().flatten(), model.bias.detach()])
    return float((theta - torch.cat([coef, intercept[None]])).norm())


@experiment("personalised-medicine", "a new patient's linear response model from 1-3 measurements: MAML start "
            "vs pooled fit vs zero", Config)
def personalised_medicine(cfg: Config, run: Run) -> dict:
    """Compare the starts for every number of measurements in `cfg.shots`."""
    rows, curves, distances = [], {}, {}
    for shots in cfg.shots:
        family = PersonalisedMedicine(shots=shots, query_shots=cfg.query_shots)
        test = family.sample(cfg.test_tasks, torch.Generator().manual_seed(cfg.seed + 1))

        def linear() -> nn.Linear:
            return seeded(lambda: nn.Linear(family.covariates, 1), cfg.seed)  # noqa: B023 (called in the loop)

        starts, _ = maml_and_pooled(linear, family, cfg, run, f"shots{shots}/")
        zero = linear()
        nn.init.zeros_(zero.weight)
        nn.init.zeros_(zero.bias)
        starts["zero"] = start(zero, cfg.inner_lr)

        results = compare(starts, test, cfg.eval_steps)
        dist = {name: distance_to_population(alg.model, family) for name, alg in starts.items()}
        rows += table(results, [0, 1, 2, cfg.eval_steps],
                      {name: {"shots": shots, "|start - population|": round(d, 4)} for name, d in dist.items()})
        curves[f"shots={shots}"] = {name: r.as_dict() for name, r in results.items()}
        distances[f"shots={shots}"] = dist
        plot_curves(results, run, f"curves_shots{shots}",
                    f"personalised medicine: new patient from {shots} measurement(s)", "query MSE", log=True)
    return {"table": rows, "curves": curves, "distance_to_population": distances,
            "population": list(PersonalisedMedicine().population_coef) + [PersonalisedMedicine().population_intercept]}
