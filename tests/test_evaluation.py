"""The evaluation protocol and the early stopping of the inner loop, against direct computations."""

import math

import pytest
import torch
from torch import nn

from metagrad import TaskBatch, core
from metagrad.algorithms import MAML, Reptile
from metagrad.evaluation import evaluate, mean_ci95
from metagrad.models import MLP
from metagrad.tasks import Sinusoid


def scalar_tasks(tasks: int = 4) -> TaskBatch:
    """y = w x with x = 1: the support target is 2, the query target 1.75 (the same for every task)."""
    ones = torch.ones(tasks, 1, 1, dtype=torch.float64)
    return TaskBatch(ones, 2.0 * ones, ones, 1.75 * ones)


def scalar_model() -> nn.Module:
    model = nn.Linear(1, 1, bias=False).double()
    with torch.no_grad():
        model.weight.zero_()
    return model


def test_select_eval_steps_picks_the_step_count_with_the_lowest_validation_loss():
    # mse (w - 2)^2 at rate 0.25 halves the distance to 2: w_k = 2 (1 - 0.5^k) = 0, 1, 1.5, 1.75, 1.875, ...
    # so the query loss (w_k - 1.75)^2 is 3.0625, 0.5625, 0.0625, 0, 0.015625, ...: minimum after 3 steps.
    alg = MAML(scalar_model(), inner_lr=0.25, inner_steps=1)
    val = scalar_tasks()
    losses, _ = alg.adaptation_curve(val, 6)
    assert torch.allclose(losses[0, :5], torch.tensor([3.0625, 0.5625, 0.0625, 0.0, 0.015625], dtype=torch.float64))
    assert alg.eval_steps == 1
    assert alg.select_eval_steps(val, 6) == 3
    assert alg.eval_steps == 3
    assert alg.select_eval_steps(val, 2) == 2  # the curve is cut at max_steps
    alg.select_eval_steps(val, 6)
    # evaluate and adapt use the chosen count by default; it travels in the state dict (checkpoints).
    result = evaluate(alg, val)
    assert result.steps == 3 and result.mean == pytest.approx(0.0, abs=1e-24)
    assert alg.adapt(val)["weight"][0].item() == pytest.approx(1.75)
    restored = MAML(scalar_model(), inner_lr=0.25, inner_steps=1)
    restored.load_state_dict(alg.state_dict())
    assert restored.eval_steps == 3


def test_select_eval_steps_is_the_argmin_of_the_mean_validation_curve_on_sinusoids(gen):
    """Reptile (meta-test adaptation on the support set): the curve computed directly, its argmin chosen."""
    torch.manual_seed(0)
    model = MLP((1, 20, 20, 1)).double()
    alg = Reptile(model, inner_lr=0.02, inner_steps=3)
    val = Sinusoid(shots=5, query_shots=10, dtype=torch.float64).sample(20, gen)
    f = core.functional(model)
    curve = torch.zeros(9, dtype=torch.float64)
    for i in range(len(val)):
        p = {n: t.detach().clone() for n, t in model.named_parameters()}
        for k in range(9):
            curve[k] += core.mse_loss(f(p, val.query_x[i]), val.query_y[i]).detach() / len(val)
            p = {n: t.requires_grad_() for n, t in p.items()}
            g = torch.autograd.grad(core.mse_loss(f(p, val.support_x[i]), val.support_y[i]), list(p.values()))
            p = {n: (t - 0.02 * gi).detach() for (n, t), gi in zip(p.items(), g)}
    assert alg.select_eval_steps(val, 8) == int(curve.argmin())


def test_evaluate_mean_and_ci_equal_a_direct_computation(gen):
    torch.manual_seed(0)
    model = MLP((1, 10, 1)).double()
    alg = MAML(model, inner_lr=0.05, inner_steps=2)
    tasks = Sinusoid(shots=5, query_shots=8, dtype=torch.float64).sample(30, gen)
    f = core.functional(model)
    finals, starts = [], []
    for i in range(len(tasks)):
        p = {n: t.detach().clone() for n, t in model.named_parameters()}
        starts.append(float(core.mse_loss(f(p, tasks.query_x[i]), tasks.query_y[i])))
        for _ in range(2):
            p = {n: t.requires_grad_() for n, t in p.items()}
            g = torch.autograd.grad(core.mse_loss(f(p, tasks.support_x[i]), tasks.support_y[i]), list(p.values()))
            p = {n: (t - 0.05 * gi).detach() for (n, t), gi in zip(p.items(), g)}
        finals.append(float(core.mse_loss(f(p, tasks.query_x[i]), tasks.query_y[i])))
    mean = sum(finals) / len(finals)
    sd = math.sqrt(sum((v - mean) ** 2 for v in finals) / (len(finals) - 1))
    result = evaluate(alg, tasks, batch_size=7)  # several batches, one of them short
    assert result.metric == "loss" and result.n_tasks == 30 and result.steps == 2
    assert result.mean == pytest.approx(mean, rel=1e-12)
    assert result.ci95 == pytest.approx(1.96 * sd / math.sqrt(30), rel=1e-10)
    assert result.curve[0] == pytest.approx(sum(starts) / 30, rel=1e-12)
    assert len(result.curve) == len(result.curve_ci95) == 3


def test_evaluate_reports_accuracy_for_labels(gen):
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    x = torch.randn(10, 6, 3, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 2, (10, 6), generator=gen)
    tasks = TaskBatch(x, y, x.clone(), y.clone())
    alg = MAML(model, inner_lr=0.05, inner_steps=0, loss_fn=nn.functional.cross_entropy)
    result = evaluate(alg, tasks)
    per_task = (model(x).argmax(-1) == y).double().mean(1)
    assert result.metric == "accuracy"
    # The core averages accuracies in float32.
    assert (result.mean, result.ci95) == pytest.approx(mean_ci95(per_task), rel=1e-6)


def test_evaluate_on_a_distribution_is_reproducible_and_checks_its_arguments():
    torch.manual_seed(0)
    alg = MAML(MLP((1, 10, 1)), inner_lr=0.05, inner_steps=1)
    family = Sinusoid(shots=5, query_shots=5)
    a, b, c = (evaluate(alg, family, n_tasks=50, generator=torch.Generator().manual_seed(s), batch_size=20)
               for s in (3, 3, 4))
    assert a.n_tasks == 50 and a.as_dict() == b.as_dict() and a.mean != c.mean
    with pytest.raises(ValueError, match="n_tasks must be positive"):
        evaluate(alg, family, n_tasks=0)
    with pytest.raises(ValueError, match="steps must be a non-negative integer, got -1"):
        evaluate(alg, family, n_tasks=5, steps=-1)
