"""System identification: a robot joint's payload mass from a few (state, torque, next velocity) records.

    tasks   = payloads m ~ U[0.5, 5] kg on the joint (I0 + m l^2) dw/dt = tau - b w - m g l sin q
              (metagrad.tasks.system_id); each gives `shots` records
    model   = that equation itself, one Euler step, with log m as its only parameter (metagrad.models.physical)
    MAML    = the start of log m meta-trained (order 2 and order 1) for `inner_steps` SGD steps
    pooled  = the single mass that fits all payloads' records best
    guesses = uninformed starts: a nominal 1 kg, and far-off 0.05 kg and 50 kg
    score every start on held-out payloads after 0..eval_steps SGD steps at inner_lr: the query MSE of the
    predicted velocity, and the relative error |m_hat - m| / m of the identified mass

With one parameter the MAML start and the pooled fit both land mid-range, so the interesting contrast is
with the guesses: near a far-off guess the loss is either flat (heavy: gravity and inertia cancel the
mass out of the velocity) or very steep (light), and a fixed-rate gradient step recovers slowly or not at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from metagrad.experiments import experiment
from metagrad.experiments.starts import (
    compare,
    curve_result,
    maml_and_pooled,
    plot_curves,
    start,
    table,
    trajectories,
)
from metagrad.models.physical import PayloadJoint
from metagrad.runs import Run
from metagrad.tasks.system_id import SystemID


@dataclass
class Config:
    """Hyper-parameters of the payload identification comparison."""

    seed: int = 0
    shots: int = 5
    query_shots: int = 20
    inner_lr: float = 0.5
    inner_steps: int = 3
    eval_steps: int = 10
    iterations: int = 300
    meta_batch: int = 25
    outer_lr: float = 0.05
    test_tasks: int = 1000
    guesses: tuple[float, ...] = (1.0, 0.05, 50.0)


@experiment("system-id", "a robot payload's mass from a few torque/velocity records: MAML start vs pooled fit "
            "vs uninformed guesses", Config)
def system_id(cfg: Config, run: Run) -> dict:
    """Compare the starts of the one-parameter physical model on held-out payloads."""
    family = SystemID(shots=cfg.shots, query_shots=cfg.query_shots)
    test, mass = family.sample_with_params(cfg.test_tasks, torch.Generator().manual_seed(cfg.seed + 1))

    starts, _ = maml_and_pooled(lambda: PayloadJoint(**family.model_kwargs()), family, cfg, run)
    for m0 in cfg.guesses:
        starts[f"guess {m0:g} kg"] = start(PayloadJoint(mass=m0, **family.model_kwargs()), cfg.inner_lr)

    mse = compare(starts, test, cfg.eval_steps)
    mass_error = {name: curve_result("relative mass error",
                                     (trajectories(alg, test, cfg.eval_steps)["log_mass"][..., 0].exp()
                                      - mass[:, None]).abs() / mass[:, None])
                  for name, alg in starts.items()}
    show = sorted({0, 1, cfg.inner_steps, cfg.eval_steps})
    start_mass = {name: {"start mass (kg)": round(float(alg.model.mass().detach()), 3)} for name, alg in starts.items()}
    rows = [{**r, "metric": "query MSE"} for r in table(mse, show, start_mass)]
    rows += [{**r, "metric": "|m_hat - m| / m"} for r in table(mass_error, show, start_mass)]
    plot_curves(mse, run, "curves", "system identification: payload mass from "
                f"{cfg.shots} records", "query MSE of next velocity ((rad/s)^2)", log=True)
    plot_curves(mass_error, run, "mass_error", "system identification: identified mass",
                "relative mass error |m_hat - m| / m", log=True)
    return {"table": rows, "query_mse": {n: r.as_dict() for n, r in mse.items()},
            "mass_error": {n: r.as_dict() for n, r in mass_error.items()},
            "start_mass_kg": {n: v["start mass (kg)"] for n, v in start_mass.items()}}
