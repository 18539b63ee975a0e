"""The learned optimizer (inner.learned_lstm) and its meta-training by truncated BPTT (algorithms/l2o.py)."""

import math

import pytest
import torch
from helpers import finite_difference, rel_err
from torch import nn

from metagrad import TaskBatch, core
from metagrad.algorithms import MAML
from metagrad.algorithms.l2o import L2O, detach_state
from metagrad.inner import adam, learned_lstm, preprocess_gradient, sgd
from metagrad.models import MLP
from metagrad.tasks import Sinusoid
from metagrad.tasks.quadratic import Quadratic


def quadratic_tasks(gen: torch.Generator, tasks: int = 2, dim: int = 3, kappa: float = 20.0,
                    noise: float = 0.1, dtype: torch.dtype = torch.float64, center: float = 0.0) -> TaskBatch:
    """Bowls with diagonal Hessians (eigenvalues log-uniform in [1, kappa]) and noisy support targets."""
    return Quadratic(dim, center, 1.0, (1.0, kappa), rotate=False, noise=noise, dtype=dtype).sample(tasks, gen)


def linear_model(dim: int = 3) -> nn.Module:
    model = nn.Linear(dim, 1, bias=False).double()
    nn.init.zeros_(model.weight)
    return model


def randomised_lstm(seed: int = 1, **kw) -> object:
    """A learned optimizer with non-zero output heads, so that every weight has a gradient."""
    opt = learned_lstm(0.05, dtype=torch.float64, seed=seed, **kw)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in ("w_gain", "w_out"):
            opt.meta_params[name].copy_(0.5 * torch.randn(opt.meta_params[name].shape, generator=gen,
                                                          dtype=torch.float64))
    return opt


def test_preprocess_gradient_matches_the_paper():
    p = 10.0
    g = torch.tensor([2.0, -1e-3, 1e-6, -2e-5, 0.0], dtype=torch.float64)
    x = preprocess_gradient(g, p)
    big = g.abs() >= math.exp(-p)
    expect = torch.stack([torch.where(big, g.abs().clamp_min(1e-300).log() / p, torch.tensor(-1.0, dtype=g.dtype)),
                          torch.where(big, g.sign(), g * math.exp(p))], -1)
    assert torch.allclose(x, expect, rtol=1e-14, atol=0)
    assert x[0].tolist() == [math.log(2.0) / p, 1.0] and x[2, 0] == -1.0


def test_untrained_lstm_is_sgd_and_adam_matches_its_definition(gen):
    params = {"a": torch.randn(3, 2, generator=gen, dtype=torch.float64), "b": torch.randn(4, generator=gen,
                                                                                            dtype=torch.float64)}
    opt = learned_lstm(0.03, dtype=torch.float64)
    state = opt.init(params)
    for step in range(3):
        grads = {n: torch.randn(p.shape, generator=gen, dtype=torch.float64) for n, p in params.items()}
        updates, state = opt.update(grads, state, params, step)
        for n in params:
            assert torch.allclose(updates[n], -0.03 * grads[n], rtol=1e-14, atol=0)
    assert state[0].shape == (2, 10, 20)
    # Adam: hand-written reference with bias correction.
    a = adam(0.1, betas=(0.8, 0.9), eps=1e-8)
    p = {"w": torch.zeros(2, dtype=torch.float64)}
    st = a.init(p)
    gs = [torch.tensor([1.0, -2.0], dtype=torch.float64), torch.tensor([0.5, 3.0], dtype=torch.float64)]
    m = v = torch.zeros(2, dtype=torch.float64)
    for t, g in enumerate(gs):
        upd, st = a.update({"w": g}, st, p, t)
        m, v = 0.8 * m + 0.2 * g, 0.9 * v + 0.1 * g * g
        ref = -0.1 * (m / (1 - 0.8 ** (t + 1))) / torch.sqrt(v / (1 - 0.9 ** (t + 1)) + 1e-16)
        assert torch.allclose(upd["w"], ref, rtol=1e-14, atol=0)


@pytest.mark.parametrize("path", ["loop", "vmap"])
def test_full_bptt_gradient_matches_finite_differences(path, gen):
    torch.manual_seed(0)
    alg = L2O(linear_model(), inner_opt=randomised_lstm(hidden=3, layers=2), inner_steps=3, unroll=3, order=2,
              path=path)
    batch = quadratic_tasks(gen)
    weights = list(alg.inner_meta_params.values())
    analytic = torch.autograd.grad(alg.meta_loss(batch), weights)
    numeric = finite_difference(lambda: alg.meta_loss(batch), weights)
    cat = lambda ts: torch.cat([t.flatten() for t in ts])  # noqa: E731
    assert cat(numeric).norm() > 1e-3
    assert rel_err(cat(analytic), cat(numeric)) < 1e-6


def test_truncated_bptt_gradient_and_update_match_reference(gen):
    """Each truncation's gradient is the segment loss's gradient with the segment start held fixed
    (finite differences), and meta_step applies one outer step per truncation."""
    alg = L2O(linear_model(), inner_opt=randomised_lstm(hidden=3, layers=1), inner_steps=4, unroll=2, order=2)
    batch = quadratic_tasks(gen)
    weights = list(alg.inner_meta_params.values())
    phi0 = [w.detach().clone() for w in weights]

    def segment_loss(start):
        return alg.segment(*start, batch, 2, 2)[0].mean()

    params, state = alg.initial(batch)
    loss1, params, state = alg.segment(params, state, batch, 0, 2)
    g1 = torch.autograd.grad(loss1.mean(), weights)
    start2 = detach_state((params, state))
    g2_at_phi0 = torch.autograd.grad(segment_loss(start2), weights)
    fd = finite_difference(lambda: segment_loss(start2), weights)
    for a, n in zip(g2_at_phi0, fd):
        assert float((a - n).norm()) < 1e-6 * max(float(n.norm()), 1e-3)

    # Reference for meta_step with SGD(lr): phi1 = phi0 - lr g1(phi0); phi2 = phi1 - lr g2(phi1; start2).
    lr = 0.1
    with torch.no_grad():
        for w, g in zip(weights, g1):
            w -= lr * g
    g2 = torch.autograd.grad(segment_loss(start2), weights)
    expect = [w.detach() - lr * g for w, g in zip(weights, g2)]
    with torch.no_grad():
        for w, p in zip(weights, phi0):
            w.copy_(p)
    alg.meta_step(batch, torch.optim.SGD(alg.parameters(), lr=lr))
    for w, e in zip(weights, expect):
        assert torch.allclose(w, e, rtol=1e-12, atol=1e-14)
    assert int(alg.iteration) == 1


def test_order1_drops_the_second_derivative(gen):
    alg = L2O(linear_model(), inner_opt=randomised_lstm(hidden=3, layers=1), inner_steps=3, unroll=3, order=2)
    batch = quadratic_tasks(gen)
    weights = list(alg.inner_meta_params.values())
    g2 = torch.cat([g.flatten() for g in torch.autograd.grad(alg.meta_loss(batch), weights)])
    alg.order = 1
    g1 = torch.cat([g.flatten() for g in torch.autograd.grad(alg.meta_loss(batch), weights)])
    assert rel_err(g1, g2) > 1e-2  # curvature matters on these quadratics


def test_maml_with_learned_lstm_gradient_matches_finite_differences(gen):
    torch.manual_seed(0)
    alg = MAML(MLP((1, 4, 1)).double(), inner_steps=2, order=2, inner_opt=randomised_lstm(hidden=2, layers=1),
               path="vmap")
    batch = Sinusoid(shots=4, query_shots=4, dtype=torch.float64).sample(2, gen)
    params = list(alg.parameters())
    assert len(params) == 4 + 7  # the MLP's 4 tensors; the LSTM's w_ih, w_hh, b and 2 heads x (w, b)
    analytic = torch.cat([g.flatten() for g in torch.autograd.grad(alg.meta_loss(batch), params)])
    numeric = torch.cat([g.flatten() for g in finite_difference(lambda: alg.meta_loss(batch), params)])
    assert rel_err(analytic, numeric) < 1e-6


def test_maml_meta_trains_with_the_learned_optimizer():
    """MAML(model, inner_opt=learned_lstm(...)) trains start and optimizer together: on quadratics whose
    optima sit around (1, ..., 1), the held-out post-adaptation loss falls 10x and the LSTM's weights move."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)

    def sample(n: int, g: torch.Generator) -> TaskBatch:
        return quadratic_tasks(g, n, 6, 100.0, noise=0.0, dtype=torch.float32, center=1.0)

    test = sample(300, torch.Generator().manual_seed(1))
    model = nn.Linear(6, 1, bias=False)
    nn.init.zeros_(model.weight)
    alg = MAML(model, inner_steps=3, order=2, inner_opt=learned_lstm(0.01, hidden=8, layers=1))
    with torch.no_grad():
        before = float(alg.meta_loss(test))
    opt = torch.optim.Adam(alg.parameters(), 1e-2)
    lstm0 = [w.detach().clone() for w in alg.inner_meta_params.values()]
    for _ in range(300):
        alg.meta_step(sample(16, gen), opt)
    with torch.no_grad():
        after = float(alg.meta_loss(test))
    assert after < before / 10, (before, after)
    assert max(float((a - b.detach()).abs().max()) for a, b in zip(lstm0, alg.inner_meta_params.values())) > 1e-2


def test_l2o_beats_sgd_on_ill_conditioned_quadratics():
    """After a short meta-training, the learned optimizer's loss after 10 steps is < 1/3 of SGD's
    at the best fixed rate (grid) on held-out ill-conditioned quadratics (kappa = 100)."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    dim, kappa, steps = 6, 100.0, 10

    def sample(n: int, g: torch.Generator) -> TaskBatch:
        return quadratic_tasks(g, n, dim, kappa, noise=0.0, dtype=torch.float32)

    test = sample(300, torch.Generator().manual_seed(1))
    model = nn.Linear(dim, 1, bias=False)
    nn.init.zeros_(model.weight)
    f = core.functional(model)

    def final_loss(opt) -> float:
        losses, _ = core.query_losses(f, core.mse_loss, core.named_params(model), test, opt, steps, 0, "vmap")
        return float(losses.mean())

    best_sgd = min(final_loss(sgd(lr)) for lr in (0.005, 0.01, 0.015, 0.02))  # stable below 2 / kappa
    alg = L2O(model, inner_opt=learned_lstm(0.01, hidden=10, layers=1), inner_steps=steps, unroll=5, order=1)
    opt = torch.optim.Adam(alg.parameters(), 3e-3)
    for _ in range(300):
        alg.meta_step(sample(16, gen), opt)
    learned = final_loss(alg.inner_opt)
    assert learned < best_sgd / 3, (learned, best_sgd)


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="init_lr"):
        learned_lstm(0.0)
    with pytest.raises(ValueError, match="hidden"):
        learned_lstm(0.1, hidden=0)
    with pytest.raises(ValueError, match="unroll"):
        L2O(linear_model(), unroll=0)
    with pytest.raises(ValueError, match="something to learn"):
        L2O(linear_model(), inner_opt=sgd(0.1))
