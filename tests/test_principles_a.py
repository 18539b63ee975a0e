"""Principles of meta-learning, items 1-5: task families with known optima, and each experiment's claim."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import rel_err
from torch import nn

from metagrad.algorithms import MAML
from metagrad.experiments import get
from metagrad.runs import Run
from metagrad.tasks import get_family
from metagrad.tasks.quadratic import (
    LinearGaussian,
    Quadratic,
    adapt_quadratic,
    least_squares,
    maml_optimum,
    quadratic_loss,
)


def run_experiment(name: str, tmp_path, **overrides) -> dict:
    """Run a registered experiment with overrides; check it wrote a plot and a non-empty table."""
    e = get(name)
    out = e.fn(e.make_config(overrides), Run(tmp_path / name, {}))
    assert list((tmp_path / name).glob("*.png")), f"{name} wrote no PNG"
    assert out["table"] and all(isinstance(row, dict) for row in out["table"])
    return out


# -- task families ------------------------------------------------------------------------------------

def test_quadratic_family_is_the_stated_loss(gen):
    fam = Quadratic(dim=3, eigen_range=(0.3, 2.0), curvature_shift=1.0)
    c, a = fam.sample_params(5, gen)
    assert torch.allclose(a, a.mT) and bool((torch.linalg.eigvalsh(a) > 0.29).all())
    model = nn.Linear(3, 1, bias=False).double()
    theta = model.weight.detach()[0]
    batch = fam.batch(c, a)
    # MAML's MSE on the encoded rows is 1/2 (theta - c)^T A (theta - c); k steps land where the closed form says.
    for steps in (0, 1, 3):
        maml = MAML(model, inner_lr=0.4, inner_steps=steps)
        expected = quadratic_loss(adapt_quadratic(theta, c, a, 0.4, steps), c, a).mean()
        assert abs(maml.meta_loss(batch).detach().item() - expected.item()) < 1e-12
    assert get_family("quadratic") is Quadratic and get_family("linear-gaussian") is LinearGaussian


def test_quadratic_noise_moves_only_the_support(gen):
    fam = Quadratic(dim=2, noise=0.5)
    b = fam.sample(4, gen)
    assert torch.equal(b.support_x, b.query_x)
    assert float((b.support_y - b.query_y).abs().max()) > 0.01


def test_linear_gaussian_subspace_and_least_squares(gen):
    basis = torch.linalg.qr(torch.randn(5, 2, generator=gen, dtype=torch.float64))[0].T  # [2, 5] orthonormal
    fam = LinearGaussian(dim=5, shots=12, noise=0.0, subspace=basis, mean=0.0)
    w = fam.sample_params(6, gen)
    # w lies in the row space of the basis: projecting onto it changes nothing.
    assert rel_err(w @ basis.T @ basis, w) < 1e-12
    x, y = fam.points(w, 12, gen)
    assert rel_err(least_squares(x, y), w) < 1e-10


@pytest.mark.parametrize("kwargs, message", [
    ({"eigen_range": (0.0, 1.0)}, "eigen_range"),
    ({"dim": 0}, "dim"),
    ({"center": (1.0, 2.0, 3.0)}, "center"),
])
def test_quadratic_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Quadratic(**{"dim": 2, **kwargs})


def test_linear_gaussian_bad_subspace():
    with pytest.raises(ValueError, match="subspace"):
        LinearGaussian(dim=3, subspace=torch.eye(2))


# -- 1. task-center -------------------------------------------------------------------------------------

def test_task_center(tmp_path):
    out = run_experiment("task-center", tmp_path, n_test_tasks=8000, iterations=150)
    rows = {r["start"]: r for r in out["table"]}
    # By optimisation: gradient descent on the meta-objective lands on the sample mean of the optima.
    assert out["gd_minus_sample_mean"] < 1e-6
    assert rows["OptimumAverage (metagrad)"]["theta"] == rows["sample mean of train optima"]["theta"]
    # Analytically: each start pays exactly ||theta - mu||^2 over the mean (paired 95% CI over held-out tasks).
    for r in out["table"]:
        assert abs(r["excess_vs_mean"] - r["predicted_excess"]) <= r["excess_ci95"] + 1e-3, r["start"]
    for name in ("coordinate-wise median", "geometric median", "origin (centre of big cluster)"):
        assert rows[name]["excess_vs_mean"] - rows[name]["excess_ci95"] > 0.1, name
    # The regime where the mean is not best: the (unsquared) distance favours the geometric median.
    mean, med = rows["population mean (analytic)"], rows["geometric median"]
    assert mean["E_dist"] - med["E_dist"] > mean["E_dist_ci95"] + med["E_dist_ci95"]


# -- 2. pool-vs-average ---------------------------------------------------------------------------------

def test_pool_vs_average(tmp_path):
    out = run_experiment("pool-vs-average", tmp_path, diversities=(0.0, 1.0), imbalances=(1, 64), repeats=600)
    cell = {(r["diversity"], r["imbalance"]): r for r in out["table"]}
    alike, diverse = cell[(0.0, 64)], cell[(1.0, 64)]
    # Identical tasks: pooling uses every point and wins by a clear ratio; diverse tasks: averaging does.
    assert alike["winner"] == "pool" and alike["mse_pool"] < 0.3 * alike["mse_average"]
    assert diverse["winner"] == "average" and diverse["mse_average"] < 0.3 * diverse["mse_pool"]
    for r in out["table"]:  # precision weighting (oracle) is never clearly worse than the better of the two
        assert r["mse_oracle"] <= 1.1 * min(r["mse_pool"], r["mse_average"])


# -- 3. quadratic-maml ----------------------------------------------------------------------------------

@pytest.mark.parametrize("steps", [1, 2])
def test_maml_closed_form_is_stationary(gen, steps):
    fam = Quadratic(dim=3, eigen_range=(0.1, 3.0), curvature_shift=1.0)
    c, a = fam.sample_params(10, gen)
    theta = maml_optimum(c, a, 0.5, steps).requires_grad_(True)
    loss = quadratic_loss(adapt_quadratic(theta, c, a, 0.5, steps), c, a).mean()
    (grad,) = torch.autograd.grad(loss, theta)
    assert float(grad.norm()) < 1e-12
    # inner_steps=0 is the pooled optimum (sum A_i)^-1 sum A_i c_i.
    pooled = torch.linalg.solve(a.sum(0), (a @ c.unsqueeze(-1)).sum(0)).squeeze(-1)
    assert rel_err(maml_optimum(c, a, 0.5, 0), pooled) < 1e-12


def test_quadratic_maml(tmp_path):
    out = run_experiment("quadratic-maml", tmp_path, n_train_tasks=128, n_test_tasks=3000, iterations=300)
    assert out["trained_vs_closed_rel_err"] < 1e-8  # metagrad's MAML converges to the closed form
    rows = {r["tasks"]: r for r in out["table"]}
    for name in ("same family (fresh tasks)", "softer Hessians"):  # MAML's post-step loss is lower (95% CI)
        assert rows[name]["winner"] == "MAML", rows[name]
        assert rows[name]["loss: MAML trained (metagrad)"] < 0.9 * rows[name]["loss: pooled optimum"]
    # The regime where it is not: the curvature-optimum link reversed on the held-out tasks.
    assert rows["reversed curvature-optimum link"]["winner"] == "pooled"


# -- 5. meta-gradient -----------------------------------------------------------------------------------

def test_first_order_on_one_bowl_is_the_exact_gradient_times_a_factor():
    # One 1-D bowl, curvature lam: exact = (1 - a lam)^2 lam (theta - c), first order = (1 - a lam) lam (theta - c).
    from metagrad.experiments.meta_gradient import meta_grads

    fam = Quadratic(dim=1, rotate=False)
    for alpha_lam in (0.01, 0.5, 1.5):
        lam, theta, c = 2.0, 0.7, -0.3
        a = torch.full((1, 1, 1), lam, dtype=torch.float64)
        model = nn.Linear(1, 1, bias=False).double()
        with torch.no_grad():
            model.weight.fill_(theta)
        exact, first = meta_grads(model, fam.batch(torch.tensor([[c]], dtype=torch.float64), a), alpha_lam / lam, 1)
        assert abs(float(exact) - (1 - alpha_lam) ** 2 * lam * (theta - c)) < 1e-12
        assert abs(float(first) - (1 - alpha_lam) * lam * (theta - c)) < 1e-12
    # alpha lam = 1.5 (overshoot): first order points the wrong way.
    assert float(exact) * float(first) < 0


def test_meta_gradient(tmp_path):
    out = run_experiment("meta-gradient", tmp_path, dim=3, n_tasks=4, curvatures=(0.01, 0.5, 1.5),
                         inner_steps=(1, 3), mlp_inner_lrs=(0.001, 0.05), mlp_tasks=2, fd_coords=10)
    quad = [r for r in out["table"] if r["tasks"] == "quadratic"]
    mlp = [r for r in out["table"] if r["tasks"] == "sinusoid MLP"]
    for r in quad:  # order 2 is exact: closed form and finite differences
        assert r["order2_vs_closed_form"] < 1e-10 and r["order2_vs_fd"] < 1e-6
        assert r["order1_vs_closed_form"] < 1e-10
    for r in mlp:
        assert r["order2_vs_fd"] < 1e-6
    # First order is as good where alpha * curvature is small and loses where it is large.
    small = [r for r in quad + mlp if r["alpha_lambda_max"] < 0.05]
    assert small and all(r["cos_order1_order2"] > 0.995 for r in small)
    q_big = [r for r in quad if r["alpha_lambda_max"] == 1.5]
    assert min(r["cos_order1_order2"] for r in q_big) < 0.5
    assert all(r["order1_fixed_point_excess"] > 0.02 for r in q_big)
    m = {(r["inner_lr"], r["inner_steps"]): r["cos_order1_order2"] for r in mlp}
    assert m[(0.05, 3)] < m[(0.001, 3)] - 0.1


# -- 4. feature-reuse -----------------------------------------------------------------------------------

@pytest.mark.slow
def test_feature_reuse(tmp_path):
    out = run_experiment("feature-reuse", tmp_path, overlaps=(0.0, 1.0), pretrain_iterations=400, iterations=200,
                         n_test_tasks=300)
    new, same = out["table"]
    # New features: the frozen body is no better than predicting 0; MAML adapts (gap far outside its CI).
    assert new["mse_frozen_body"] > 0.8 * new["mse_predict_zero"]
    assert new["mse_maml"] < 0.2 * new["mse_frozen_body"] and new["gap_frozen_minus_maml"] > 3 * new["gap_ci95"]
    # Shared features: the frozen body works and the gap closes.
    assert same["mse_frozen_body"] < 0.15 * same["mse_predict_zero"]
    assert same["gap_frozen_minus_maml"] < 0.1 * new["gap_frozen_minus_maml"]
    assert math.isfinite(same["mse_maml"])
