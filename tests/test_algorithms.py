"""Every algorithm against its definition: hand-written references, closed forms and finite differences (float64)."""

import inspect

import numpy as np
import pytest
import torch
from helpers import finite_difference, rel_err
from torch import nn

from metagrad import TaskBatch, core
from metagrad.algorithms import ALGORITHMS, ANIL, IMAML, MAML, MetaSGD, OptimumAverage, Pretrain, Reptile
from metagrad.algorithms.imaml import conjugate_gradient
from metagrad.algorithms.maml import multi_step_weights
from metagrad.evaluation import mean_ci95
from metagrad.models import MLP, Conv4
from metagrad.tasks import Sinusoid


def mlp(sizes=(1, 5, 5, 1)) -> nn.Module:
    torch.manual_seed(0)
    return MLP(sizes).double()


def sine_batch(gen: torch.Generator, tasks: int = 3, shots: int = 5, query_shots: int = 4) -> TaskBatch:
    return Sinusoid(shots=shots, query_shots=query_shots, dtype=torch.float64).sample(tasks, gen)


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.flatten() for t in tensors])


def meta_grad(alg) -> callable:
    return lambda batch: torch.autograd.grad(alg.meta_loss(batch), list(alg.parameters()))


def assert_matches_finite_differences(alg, batch: TaskBatch, tol: float) -> None:
    analytic = flat(meta_grad(alg)(batch))
    numeric = flat(finite_difference(lambda: alg.meta_loss(batch), list(alg.parameters())))
    assert rel_err(analytic, numeric) < tol


def gd_fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float, steps: int, loss_fn=core.mse_loss,
           start: dict | None = None, names=None) -> dict:
    """Reference: `steps` plain gradient-descent steps of one task, written out with torch.autograd."""
    f = core.functional(model)
    p = {n: t.detach().clone() for n, t in (start or dict(model.named_parameters())).items()}
    names = list(p) if names is None else names
    for _ in range(steps):
        for n in names:
            p[n].requires_grad_(True)
        g = torch.autograd.grad(loss_fn(f(p, x), y), [p[n] for n in names])
        p = {**{n: t.detach() for n, t in p.items()}, **{n: (p[n] - lr * gi).detach() for n, gi in zip(names, g)}}
    return p


# -- registry and bad input ---------------------------------------------------------------------------------------

def test_registry_builds_every_algorithm_and_names_the_known_ones_on_a_typo():
    expected = {"maml", "fomaml", "maml++", "reptile", "anil", "metasgd", "imaml", "pretrain", "optimum-average", "l2o"}
    assert set(ALGORITHMS) == expected
    with pytest.raises(KeyError, match="unknown algorithm 'mamll'; known: anil, fomaml, imaml, l2o, maml, maml\\+\\+"):
        ALGORITHMS["mamll"]
    assert ALGORITHMS["fomaml"](mlp()).order == 1
    plus = ALGORITHMS["maml++"](mlp(), inner_steps=3)
    assert plus.inner_opt.name == "per_layer_per_step_lr" and plus.multi_step_loss_iters == 5000
    assert plus.order_anneal_iters == 25000 and plus.current_order() == 1 and plus.order == 2
    assert ALGORITHMS["maml++"](mlp(), order_anneal_iters=0).current_order() == 2
    # The factories show MAML's arguments (with their own defaults) to `inspect`, which the CLI uses to check flags.
    sig = inspect.signature(ALGORITHMS["maml++"]).parameters
    assert sig["lslr"].default is True and "inner_lr" in sig and "eval_steps" in sig
    assert inspect.signature(ALGORITHMS["fomaml"]).parameters["order"].default == 1


@pytest.mark.parametrize("build, match", [
    (lambda: MAML(mlp(), order=3), "order must be 1 .* or 2"),
    (lambda: ALGORITHMS["fomaml"](mlp(), order=2), "fomaml is MAML with order=1"),
    (lambda: Reptile(mlp(), order=2), "Reptile is first order"),
    (lambda: Pretrain(mlp(), order=2), "order must be 1"),
    (lambda: MAML(mlp(), inner_steps=-1), "inner_steps must be a non-negative integer, got -1"),
    (lambda: MAML(mlp(), inner_steps=1.5), "inner_steps must be a non-negative integer"),
    (lambda: ANIL(mlp(), eval_steps=-2), "eval_steps must be a non-negative integer, got -2"),
    (lambda: OptimumAverage(mlp(), fit_steps=-1), "fit_steps must be a non-negative integer"),
    (lambda: IMAML(mlp(), lam=0.0), "lam .* must be positive"),
    (lambda: IMAML(mlp(), cg_steps=-1), "cg_steps must be a non-negative integer"),
    (lambda: MetaSGD(mlp(), inner_lr=0.0), "inner_lr .* must be positive"),
    (lambda: MAML(mlp(), inner_lr=-0.1), "inner_lr must be positive"),
    (lambda: ANIL(mlp(), head=["nope.weight"]), "adapt_names \\['nope.weight'\\] are not parameters"),
    (lambda: ANIL(nn.Sequential(nn.Conv1d(1, 1, 1))), "last nn.Linear.*head="),
])
def test_bad_arguments_give_clear_errors(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_bad_batches_and_step_counts_give_clear_errors(gen):
    alg = MAML(mlp(), inner_lr=0.1)
    x, y = torch.zeros(2, 5, 1), torch.zeros(2, 5, 1)
    with pytest.raises(ValueError, match="disagree on the number of tasks"):
        TaskBatch(x, y, torch.zeros(3, 4, 1), torch.zeros(3, 4, 1))
    with pytest.raises(ValueError, match="support_x has 5 shots but support_y has 4"):
        TaskBatch(x, torch.zeros(2, 4, 1), x, y)
    with pytest.raises(ValueError, match="same example shape"):
        TaskBatch(x, y, torch.zeros(2, 5, 3), y)
    with pytest.raises(ValueError, match="shape \\[tasks, shots, ...\\]"):
        TaskBatch(torch.zeros(5), y, x, y)
    with pytest.raises(TypeError, match="expected a metagrad.TaskBatch, got tuple"):
        alg.meta_loss((x, y, x, y))
    with pytest.raises(ValueError, match="at least one task, one support and one query example"):
        alg.meta_loss(TaskBatch(torch.zeros(2, 0, 1), torch.zeros(2, 0, 1), x, y))
    batch = sine_batch(gen)
    with pytest.raises(ValueError, match="steps must be a non-negative integer, got -1"):
        alg.adapt(batch, steps=-1)
    with pytest.raises(ValueError, match="max_steps must be a non-negative integer"):
        alg.select_eval_steps(batch, -3)
    with pytest.raises(ValueError, match="eval_steps must be a non-negative integer"):
        alg.eval_steps = -1


# -- Reptile --------------------------------------------------------------------------------------------------------

def test_reptile_outer_update_equals_its_definition(gen):
    model, batch, eps, lr, k = mlp(), sine_batch(gen, tasks=4), 0.3, 0.05, 3
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    # Reference: W_i = k GD steps on the task's support and query points, theta + eps (mean W_i - theta).
    ws = [gd_fit(model, torch.cat([batch.support_x[i], batch.query_x[i]]),
                 torch.cat([batch.support_y[i], batch.query_y[i]]), lr, k) for i in range(len(batch))]
    expected = {n: theta[n] + eps * (torch.stack([w[n] for w in ws]).mean(0) - theta[n]) for n in theta}
    query_loss = np.mean([float(core.mse_loss(core.functional(model)(w, batch.query_x[i]), batch.query_y[i]))
                          for i, w in enumerate(ws)])

    alg = Reptile(model, inner_lr=lr, inner_steps=k)
    metrics = alg.meta_step(batch, torch.optim.SGD(alg.parameters(), lr=eps))
    for n, p in model.named_parameters():
        assert rel_err(p.detach(), expected[n]) < 1e-12
    assert metrics["meta_loss"] == pytest.approx(query_loss, rel=1e-12)

    # Adam's first step is lr * sign(gradient) (up to its epsilon): every weight moves toward mean W_i.
    model2 = mlp()
    alg2 = Reptile(model2, inner_lr=lr, inner_steps=k)
    alg2.meta_step(batch, torch.optim.Adam(alg2.parameters(), lr=1e-3))
    for n, p in model2.named_parameters():
        toward = torch.sign(torch.stack([w[n] for w in ws]).mean(0) - theta[n])
        assert torch.allclose(p.detach() - theta[n], 1e-3 * toward, atol=1e-6)


def test_reptile_meta_test_adapts_on_the_support_set_only(gen):
    model, batch = mlp(), sine_batch(gen)
    alg = Reptile(model, inner_lr=0.05, inner_steps=2)
    adapted = alg.adapt(batch)
    for i in range(len(batch)):
        ref = gd_fit(model, batch.support_x[i], batch.support_y[i], 0.05, 2)
        for n in ref:
            assert rel_err(adapted[n][i], ref[n]) < 1e-12


# -- Meta-SGD, MAML++ (LSLR, multi-step loss, order annealing), ANIL ---------------------------------------------------

def test_metasgd_learned_rates_get_the_right_gradient(gen):
    alg = MetaSGD(mlp(), inner_lr=0.05, inner_steps=2)
    with torch.no_grad():  # different rates everywhere, so that a mixed-up rate would show
        for r in alg.inner_meta_params.values():
            r.uniform_(0.01, 0.1, generator=gen)
    assert sum(r.numel() for r in alg.inner_meta_params.values()) == sum(p.numel() for p in alg.model.parameters())
    assert_matches_finite_differences(alg, sine_batch(gen), 1e-6)
    rate_grads = meta_grad(alg)(sine_batch(gen))[-len(alg.inner_meta_params):]
    assert all(g.abs().sum() > 0 for g in rate_grads)


def test_lslr_gradients_match_finite_differences(gen):
    alg = MAML(mlp(), inner_lr=0.05, inner_steps=3, order=2, lslr=True)
    with torch.no_grad():  # a different rate per layer and step, so that a mixed-up index would show
        for r in alg.inner_meta_params.values():
            r.uniform_(0.01, 0.1, generator=gen)
    assert [tuple(r.shape) for r in alg.inner_meta_params.values()] == [(3,)] * 6
    assert_matches_finite_differences(alg, sine_batch(gen), 1e-6)


def test_lslr_rates_gradient_is_exact_at_first_order_with_one_step(gen):
    # theta' = theta - r g with g held constant: dL/dr = -g . grad L_query(theta') is exact even at order 1.
    alg = MAML(mlp(), inner_lr=0.05, inner_steps=1, order=1, lslr=True)
    batch, rates = sine_batch(gen), list(alg.inner_meta_params.values())
    analytic = flat(torch.autograd.grad(alg.meta_loss(batch), rates))
    assert rel_err(analytic, flat(finite_difference(lambda: alg.meta_loss(batch), rates))) < 1e-6


def test_multi_step_loss_weights_follow_the_maml_plus_plus_code():
    # 5 steps, 10 annealing iterations: decay 1/5/10 = 0.02 per iteration, floor 0.03/5 = 0.006.
    assert np.allclose(multi_step_weights(5, 0, 10), [0.2] * 5)
    assert np.allclose(multi_step_weights(5, 4, 10), [0.12, 0.12, 0.12, 0.12, 0.52])
    assert np.allclose(multi_step_weights(5, 10, 10), [0.006] * 4 + [0.976])
    assert np.allclose(multi_step_weights(5, 100, 10), [0.006] * 4 + [0.976])
    for it in range(12):
        assert multi_step_weights(5, it, 10).sum() == pytest.approx(1.0)


def test_multi_step_loss_is_the_weighted_per_step_query_loss_then_the_last_step(gen):
    alg = MAML(mlp(), inner_lr=0.05, inner_steps=3, multi_step_loss_iters=4)
    batch = sine_batch(gen)
    per_step, _ = core.query_losses(alg.f, alg.loss_fn, alg.params(), batch, alg.inner_opt, 3, 2, "loop",
                                    all_steps=True)  # [tasks, 4]: after 0..3 steps
    # 3 steps, 4 annealing iterations: decay 1/12 per iteration; from iteration 4 on, the last step only.
    for it, w in ((0, [1 / 3] * 3), (2, [1 / 6, 1 / 6, 2 / 3]), (4, [0.0, 0.0, 1.0]), (9, [0.0, 0.0, 1.0])):
        alg.iteration.fill_(it)
        expected = float((per_step[:, 1:].detach().numpy() @ np.array(w)).mean())
        assert alg.meta_loss(batch).item() == pytest.approx(expected, rel=1e-12)


def test_order_annealing_switches_from_first_to_second_order_at_the_given_iteration(gen):
    batch = sine_batch(gen)
    first = meta_grad(MAML(mlp(), inner_lr=0.1, inner_steps=2, order=1))(batch)
    second = meta_grad(MAML(mlp(), inner_lr=0.1, inner_steps=2, order=2))(batch)
    assert rel_err(flat(first), flat(second)) > 1e-3
    alg = MAML(mlp(), inner_lr=0.1, inner_steps=2, order=2, order_anneal_iters=2)
    frozen = torch.optim.SGD(alg.parameters(), lr=0.0)  # advances the iteration, keeps the weights
    for it in range(4):
        assert alg.current_order() == (1 if it < 2 else 2)
        expected = first if it < 2 else second
        assert rel_err(flat(meta_grad(alg)(batch)), flat(expected)) < 1e-12
        alg.meta_step(batch, frozen)


@pytest.mark.parametrize("order", [1, 2])
def test_anil_adapts_only_the_head_and_its_gradients_match_finite_differences(order, gen):
    model, batch = mlp(), sine_batch(gen)
    alg = ANIL(model, inner_lr=0.1, inner_steps=2, order=order)
    assert alg.adapt_names == ["4.weight", "4.bias"]
    adapted = alg.adapt(batch)
    theta = dict(model.named_parameters())
    for n, p in adapted.items():
        moved = (p - theta[n].detach()).abs().amax(dim=tuple(range(1, p.dim())))  # [tasks]
        assert (moved > 1e-6).all() if n.startswith("4.") else (moved == 0).all()
        ref = gd_fit(model, batch.support_x[0], batch.support_y[0], 0.1, 2, names=["4.weight", "4.bias"])
        assert rel_err(p[0], ref[n]) < 1e-12
    if order == 2:
        assert_matches_finite_differences(alg, batch, 1e-6)
    else:
        # First order: the meta-gradient is the query gradient at (body, adapted head).
        got = meta_grad(alg)(batch)
        expected = [torch.zeros_like(p) for p in model.parameters()]
        for i in range(len(batch)):
            p = {n: t[i].detach().requires_grad_() for n, t in adapted.items()}
            g = torch.autograd.grad(core.mse_loss(alg.f(p, batch.query_x[i]), batch.query_y[i]), list(p.values()))
            expected = [e + gi / len(batch) for e, gi in zip(expected, g)]
        assert rel_err(flat(got), flat(expected)) < 1e-12
    assert ANIL(model, head=["0.bias"]).adapt_names == ["0.bias"]


# -- iMAML -------------------------------------------------------------------------------------------------------------

def half_sum_squares(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((pred - target) ** 2).sum()


def quadratic_tasks(gen: torch.Generator, tasks: int = 3, dim: int = 4) -> tuple[TaskBatch, list]:
    """L_i(phi) = 0.5 (phi - c_i)^T A_i (phi - c_i) as linear regression:
    x = B_i `[dim+2, dim]`, y = B_i c_i, A_i = B_i^T B_i; for the support and the query set."""
    def side():
        b = torch.randn(tasks, dim + 2, dim, generator=gen, dtype=torch.float64)
        c = torch.randn(tasks, dim, 1, generator=gen, dtype=torch.float64)
        return b, b @ c, b.transpose(1, 2) @ b, c

    bs, ys, a_s, c_s = side()
    bq, yq, a_q, c_q = side()
    return TaskBatch(bs, ys, bq, yq), [a_s, c_s, a_q, c_q]


def implicit_gradient(theta: torch.Tensor, lam: float, a_s, c_s, a_q, c_q) -> torch.Tensor:
    """Closed form: phi* = (A_s + lam I)^-1 (A_s c_s + lam theta); grad = lam (A_s + lam I)^-1 A_q (phi* - c_q)."""
    eye = torch.eye(theta.shape[0], dtype=theta.dtype)
    m = a_s + lam * eye
    phi = torch.linalg.solve(m, a_s @ c_s + lam * theta[:, None])
    return (lam * torch.linalg.solve(m, a_q @ (phi - c_q)))[..., 0].mean(0)


def test_imaml_gradient_equals_the_closed_form_implicit_gradient_on_quadratics(gen):
    batch, (a_s, c_s, a_q, c_q) = quadratic_tasks(gen)
    lam = 2.0
    lr = 1.0 / float(torch.linalg.eigvalsh(a_s).max() + lam)  # stable GD on the regularised inner problem
    model = nn.Linear(4, 1, bias=False).double()
    expected = implicit_gradient(model.weight.detach()[0], lam, a_s, c_s, a_q, c_q)

    def error(inner_steps: int, cg_steps: int) -> float:
        alg = IMAML(model, inner_lr=lr, inner_steps=inner_steps, lam=lam, cg_steps=cg_steps, cg_damping=0.0,
                    loss_fn=half_sum_squares)
        return rel_err(meta_grad(alg)(batch)[0][0], expected)

    # CG exact (dim = 4 steps): the error is the inner solver's, and shrinks geometrically with its steps.
    by_inner = [error(k, 4) for k in (10, 40, 160)]
    assert all(a > 100 * b for a, b in zip(by_inner, by_inner[1:])), by_inner
    assert by_inner[-1] < 1e-10
    # Inner problem solved to round-off: the error is CG's, and vanishes at dim steps.
    by_cg = [error(640, c) for c in (1, 2, 3, 4)]
    assert all(a > b for a, b in zip(by_cg, by_cg[1:])) and by_cg[0] > 0.1 and by_cg[-1] < 1e-12, by_cg
    alg = IMAML(model, inner_lr=lr, inner_steps=640, lam=lam, cg_steps=4, cg_damping=0.0, loss_fn=half_sum_squares)

    # The value is the query loss at phi; the regularised optimum is also what adapt() finds at meta-test.
    phi_star = torch.linalg.solve(a_s + lam * torch.eye(4, dtype=torch.float64),
                                  a_s @ c_s + lam * model.weight.detach()[0][:, None])
    query = 0.5 * ((phi_star - c_q).transpose(1, 2) @ a_q @ (phi_star - c_q)).squeeze()
    assert alg.meta_loss(batch).item() == pytest.approx(float(query.mean()), rel=1e-9)
    assert rel_err(alg.adapt(batch)["weight"][:, 0], phi_star[..., 0]) < 1e-9

    # Damping d solves ((1 + d) I + A_s / lam) v = grad L_query(phi*) instead.
    damped = IMAML(model, inner_lr=lr, inner_steps=640, lam=lam, cg_steps=4, cg_damping=0.5, loss_fn=half_sum_squares)
    v = torch.linalg.solve(1.5 * torch.eye(4, dtype=torch.float64) + a_s / lam, a_q @ (phi_star - c_q))
    assert rel_err(meta_grad(damped)(batch)[0][0], v[..., 0].mean(0)) < 1e-10


def test_conjugate_gradient_solves_spd_systems_and_stops_at_negative_curvature(gen):
    m = torch.randn(5, 5, generator=gen, dtype=torch.float64)
    a, b = m @ m.T + 0.5 * torch.eye(5, dtype=torch.float64), torch.randn(5, generator=gen, dtype=torch.float64)
    x = conjugate_gradient(lambda v: {"v": a @ v["v"]}, {"v": b}, 5)["v"]
    assert rel_err(x, torch.linalg.solve(a, b)) < 1e-10
    # diag(2, -1), b = (1, 1): the first step (curvature 1 along b) gives x = (2, 2); the next direction
    # (6, 12) has curvature -72, so CG stops there instead of stepping toward the saddle.
    indefinite = torch.tensor([2.0, -1.0], dtype=torch.float64)
    x = conjugate_gradient(lambda v: {"v": indefinite * v["v"]}, {"v": torch.ones(2, dtype=torch.float64)}, 5)
    assert torch.equal(x["v"], torch.tensor([2.0, 2.0], dtype=torch.float64))


def test_imaml_first_order_is_the_query_gradient_at_the_regularised_solution(gen):
    batch, _ = quadratic_tasks(gen)
    model = nn.Linear(4, 1, bias=False).double()
    alg = IMAML(model, inner_lr=0.01, inner_steps=3, order=1, lam=0.5, loss_fn=half_sum_squares)
    phis = alg.adapt(batch)["weight"]  # [tasks, 1, 4]
    expected = torch.stack([(bq.T @ (bq @ w.T - yq)).T for bq, yq, w in zip(batch.query_x, batch.query_y, phis)])
    assert rel_err(meta_grad(alg)(batch)[0], expected.mean(0)) < 1e-12


def test_imaml_on_a_network_matches_the_hessian_solved_exactly(gen):
    """Beyond quadratics: v = (I + H/lam)^-1 g with H from torch.func.hessian, on a small MLP."""
    model, batch, lam = mlp((1, 3, 1)), sine_batch(gen, tasks=2), 4.0
    n_params = sum(p.numel() for p in model.parameters())
    alg = IMAML(model, inner_lr=0.02, inner_steps=5, lam=lam, cg_steps=n_params, cg_damping=0.0)
    phis = alg.adapt(batch)
    expected = []
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]

    def unflat(v):
        return {n: t.view(s) for n, t, s in zip(names, torch.split(v, [s.numel() for s in shapes]), shapes)}

    for i in range(len(batch)):
        phi = flat(phis[n][i] for n in names)
        sx, sy, qx, qy = (t[i] for t in batch.tensors())
        hess = torch.func.hessian(lambda v, sx=sx, sy=sy: core.mse_loss(alg.f(unflat(v), sx), sy))(phi)
        g = torch.func.grad(lambda v, qx=qx, qy=qy: core.mse_loss(alg.f(unflat(v), qx), qy))(phi)
        # CG's premise: I + H/lam positive definite (true for this seed; a failure here means the data changed).
        assert torch.linalg.eigvalsh(torch.eye(n_params, dtype=phi.dtype) + hess / lam).min() > 0
        expected.append(torch.linalg.solve(torch.eye(n_params, dtype=phi.dtype) + hess / lam, g))
    assert rel_err(flat(meta_grad(alg)(batch)), torch.stack(expected).mean(0)) < 1e-8


# -- baselines --------------------------------------------------------------------------------------------------------

def test_pretrain_gradient_is_the_plain_loss_on_all_task_data(gen):
    model, batch = mlp(), sine_batch(gen)
    alg = Pretrain(model, inner_lr=0.05)
    x = torch.cat([batch.support_x, batch.query_x], 1)
    y = torch.cat([batch.support_y, batch.query_y], 1)
    reference = torch.stack([core.mse_loss(model(x[i]), y[i]) for i in range(len(batch))]).mean()
    expected = torch.autograd.grad(reference, list(model.parameters()))
    loss = alg.meta_loss(batch)
    assert float(loss) == pytest.approx(float(reference), rel=1e-12)
    assert rel_err(flat(torch.autograd.grad(loss, list(alg.parameters()))), flat(expected)) < 1e-12
    # Meta-test: fine-tuning with SGD at inner_lr.
    ref = gd_fit(model, batch.support_x[1], batch.support_y[1], 0.05, 1)
    assert all(rel_err(alg.adapt(batch)[n][1], ref[n]) < 1e-12 for n in ref)


def test_optimum_average_sets_theta_to_the_average_of_the_optima(gen):
    model, batch = mlp(), sine_batch(gen)
    optima = [gd_fit(model, torch.cat([batch.support_x[i], batch.query_x[i]]),
                     torch.cat([batch.support_y[i], batch.query_y[i]]), 0.05, 20) for i in range(len(batch))]
    alg = OptimumAverage(model, inner_lr=0.05, fit_steps=20)
    alg.meta_step(batch, torch.optim.SGD(alg.parameters(), lr=1.0))
    for n, p in model.named_parameters():
        assert rel_err(p.detach(), torch.stack([o[n] for o in optima]).mean(0)) < 1e-12


# -- execution paths ---------------------------------------------------------------------------------------------------

FEW_STEPS = {"optimum-average": {"fit_steps": 3}}  # its default of 100 fitting steps is slow for a path check


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_vmap_path_equals_loop_path(name, gen):
    batch = sine_batch(gen, tasks=4)
    grads, values, adapted = {}, {}, {}
    for path in ("loop", "vmap"):
        alg = ALGORITHMS[name](mlp(), inner_lr=0.05, inner_steps=2, path=path, **FEW_STEPS.get(name, {}))
        assert alg.exec_path() == path
        loss = alg.meta_loss(batch)
        values[path] = float(loss)
        grads[path] = flat(torch.autograd.grad(loss, list(alg.parameters())))
        adapted[path] = flat(alg.adapt(batch).values())
    assert values["vmap"] == pytest.approx(values["loop"], rel=1e-12)
    assert rel_err(grads["vmap"], grads["loop"]) < 1e-10
    assert rel_err(adapted["vmap"], adapted["loop"]) < 1e-12


@pytest.mark.parametrize("name", ["anil", "imaml", "optimum-average", "reptile"])
def test_cnn_paths_agree_with_task_and_native_batchnorm(name, gen):
    """A small Conv4 with per-task batch norm: vmap equals the loop. With torch BatchNorm (batch statistics)
    the same at every order: vmap runs it written out (core.for_vmap); `auto`'s rule takes the loop."""
    x = torch.randn(3, 6, 1, 16, 16, generator=gen, dtype=torch.float64)
    y = torch.arange(3).repeat(2).expand(3, 6).contiguous()
    batch = TaskBatch(x, y, x.flip(1), y.flip(1))
    grads = {}
    for path in ("loop", "vmap"):
        torch.manual_seed(0)
        cnn = Conv4(ways=3, hidden=4, pool="max", batchnorm="task").double()
        alg = ALGORITHMS[name](cnn, inner_lr=0.1, inner_steps=2, loss_fn=nn.functional.cross_entropy, path=path,
                               **FEW_STEPS.get(name, {}))
        grads[path] = flat(torch.autograd.grad(alg.meta_loss(batch), list(alg.parameters())))
    assert rel_err(grads["vmap"], grads["loop"]) < 1e-10

    def native(path: str):
        torch.manual_seed(0)
        return ALGORITHMS[name](Conv4(ways=3, hidden=4, pool="max").double(), inner_lr=0.1, inner_steps=2,
                                loss_fn=nn.functional.cross_entropy, path=path, **FEW_STEPS.get(name, {}))

    assert native("auto").exec_path() == "loop"
    native_grads = [flat(torch.autograd.grad(a.meta_loss(batch), list(a.parameters())))
                    for a in (native("loop"), native("vmap"))]
    assert rel_err(native_grads[1], native_grads[0]) < 1e-10
    assert rel_err(native_grads[0], grads["loop"]) < 1e-10  # the same function, the same weights


# -- every algorithm learns --------------------------------------------------------------------------------------------

ITERATIONS, META_BATCH = 200, 8
LEARN = {  # name: (constructor arguments, outer optimizer, outer_lr)
    "maml": (dict(inner_lr=0.01, inner_steps=1), "adam", 3e-3),
    "fomaml": (dict(inner_lr=0.01, inner_steps=1), "adam", 3e-3),
    "maml++": (dict(inner_lr=0.01, inner_steps=2), "adam", 3e-3),
    "reptile": (dict(inner_lr=0.02, inner_steps=5), "sgd", 1.0),
    "anil": (dict(inner_lr=0.01, inner_steps=1), "adam", 3e-3),
    "metasgd": (dict(inner_lr=0.01, inner_steps=1), "adam", 3e-3),
    # At 3e-3 the network grows sharp enough for the fixed-rate inner GD to diverge on some tasks.
    "imaml": (dict(inner_lr=0.02, inner_steps=5, cg_steps=2), "adam", 1e-3),
    "pretrain": (dict(inner_lr=0.01, inner_steps=1), "adam", 3e-3),
    "optimum-average": (dict(inner_lr=0.02, inner_steps=1, fit_steps=10), "sgd", 0.1),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(LEARN))
def test_every_algorithm_learns_sinusoids(name):
    """200 meta-iterations (meta_batch 8, seed 0) lower the post-adaptation query MSE on 200 held-out tasks:
    the per-task improvement's 95% CI excludes 0 and the mean drops by more than 15%."""
    kwargs, kind, outer_lr = LEARN[name]
    family = Sinusoid(shots=10, query_shots=10)
    torch.manual_seed(0)
    alg = ALGORITHMS[name](MLP((1, 40, 40, 1)), **kwargs)
    test_tasks = family.sample(200, torch.Generator().manual_seed(123))
    before = alg.adaptation_curve(test_tasks, alg.eval_steps)[0][:, -1]  # [tasks]
    opt = (torch.optim.SGD if kind == "sgd" else torch.optim.Adam)(alg.parameters(), lr=outer_lr)
    gen = torch.Generator().manual_seed(1)
    for _ in range(ITERATIONS):
        alg.meta_step(family.sample(META_BATCH, gen), opt)
    after = alg.adaptation_curve(test_tasks, alg.eval_steps)[0][:, -1]
    gain, ci = mean_ci95(before - after)
    assert gain - ci > 0, (float(before.mean()), float(after.mean()), gain, ci)
    assert after.mean() < 0.85 * before.mean(), (float(before.mean()), float(after.mean()))
