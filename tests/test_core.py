"""The core's meta-gradients against finite differences (float64) and across execution paths."""

import pytest
import torch
from helpers import finite_difference, rel_err
from torch import nn

from metagrad import TaskBatch, core
from metagrad.algorithms import MAML
from metagrad.models import MLP, Conv4
from metagrad.tasks import Sinusoid


def small_cnn(batchnorm: str = "native") -> nn.Module:
    torch.manual_seed(0)
    return Conv4(ways=3, in_channels=1, hidden=4, pool="max", batchnorm=batchnorm).double()


def image_batch(gen: torch.Generator, tasks: int = 2) -> TaskBatch:
    x = torch.randn(tasks, 6, 1, 16, 16, generator=gen, dtype=torch.float64)
    y = torch.arange(3).repeat(2).expand(tasks, 6).contiguous()
    qx = torch.randn(tasks, 6, 1, 16, 16, generator=gen, dtype=torch.float64)
    return TaskBatch(x, y, qx, y.clone())


def check_against_fd(alg: MAML, batch: TaskBatch, tol: float) -> None:
    params = list(alg.parameters())
    loss = alg.meta_loss(batch)
    analytic = torch.autograd.grad(loss, params)
    numeric = finite_difference(lambda: alg.meta_loss(batch), params)
    scale = torch.cat([n.flatten() for n in numeric]).norm()
    assert rel_err(torch.cat([a.flatten() for a in analytic]), torch.cat([n.flatten() for n in numeric])) < tol
    for a, n in zip(analytic, numeric):
        # Per tensor too, against the whole gradient's size: conv biases before batch norm have 0 gradient.
        assert float((a - n).norm()) < tol * float(scale)


@pytest.mark.parametrize("steps", [1, 3])
def test_maml_order2_mlp_matches_finite_differences(steps, gen):
    torch.manual_seed(0)
    alg = MAML(MLP((1, 8, 8, 1)).double(), inner_lr=0.05, inner_steps=steps, order=2)
    batch = Sinusoid(shots=5, query_shots=5, dtype=torch.float64).sample(3, gen)
    check_against_fd(alg, batch, 1e-6)


@pytest.mark.parametrize("steps", [1, 3])
def test_maml_order2_cnn_batchnorm_matches_finite_differences(steps, gen):
    alg = MAML(small_cnn(), inner_lr=0.1, inner_steps=steps, order=2, loss_fn=nn.functional.cross_entropy)
    assert alg.exec_path() == "loop"
    check_against_fd(alg, image_batch(gen), 1e-5)


def test_order2_differs_from_order1_and_conv_bias_before_batchnorm_has_zero_gradient(gen):
    alg = MAML(small_cnn(), inner_lr=0.1, inner_steps=2, order=2, loss_fn=nn.functional.cross_entropy)
    batch = image_batch(gen)
    g2 = torch.autograd.grad(alg.meta_loss(batch), list(alg.parameters()))
    names = [n for n, _ in alg.named_parameters()]
    # A bias right before batch norm is cancelled by the mean subtraction: its exact gradient is 0.
    for n, g in zip(names, g2):
        if n.endswith("features.0.bias"):
            assert g.abs().max() < 1e-12
    alg.order = 1
    g1 = torch.autograd.grad(alg.meta_loss(batch), list(alg.parameters()))
    assert max(rel_err(a, b) for a, b in zip(g1, g2)) > 1e-3


@pytest.mark.parametrize("order", [1, 2])
def test_vmap_path_equals_loop_path(order, gen):
    torch.manual_seed(0)
    model = MLP((1, 16, 16, 1)).double()
    batch = Sinusoid(shots=5, query_shots=7, dtype=torch.float64).sample(4, gen)
    grads = {}
    for path in ("loop", "vmap"):
        alg = MAML(model, inner_lr=0.02, inner_steps=2, order=order, path=path)
        grads[path] = torch.autograd.grad(alg.meta_loss(batch), list(alg.parameters()))
    for a, b in zip(grads["loop"], grads["vmap"]):
        assert rel_err(a, b) < 1e-12


def test_vmap_with_task_batchnorm_is_exact_at_second_order(gen):
    grads = {}
    for path in ("loop", "vmap"):
        alg = MAML(small_cnn("task"), inner_lr=0.1, inner_steps=2, order=2,
                   loss_fn=nn.functional.cross_entropy, path=path)
        grads[path] = torch.autograd.grad(alg.meta_loss(image_batch(gen.manual_seed(1))), list(alg.parameters()))
    flat = {k: torch.cat([g.flatten() for g in v]) for k, v in grads.items()}
    assert rel_err(flat["vmap"], flat["loop"]) < 1e-10


@pytest.mark.parametrize("steps", [1, 3])
def test_vmap_over_native_batchnorm_is_exact_at_second_order(steps, gen):
    """torch's BatchNorm on batch statistics is written out under vmap (core.for_vmap): the order-2
    meta-gradient equals finite differences, and the conv bias before it gets exactly 0, which the
    native op under vmap gets wrong in torch 2.13 (../shared/notes/peers.md)."""
    alg = MAML(small_cnn(), inner_lr=0.1, inner_steps=steps, order=2, loss_fn=nn.functional.cross_entropy,
               path="vmap")
    assert alg.exec_path() == "vmap" and core.for_vmap(alg.f) is not alg.f
    check_against_fd(alg, image_batch(gen), 1e-5)
    loop = MAML(small_cnn(), inner_lr=0.1, inner_steps=steps, order=2, loss_fn=nn.functional.cross_entropy,
                path="loop")
    batch = image_batch(gen.manual_seed(1), tasks=3)
    g = {a.path: torch.cat([t.flatten() for t in torch.autograd.grad(a.meta_loss(batch), list(a.parameters()))])
         for a in (alg, loop)}
    assert rel_err(g["vmap"], g["loop"]) < 1e-10
    names = [n for n, _ in alg.named_parameters()]
    bias = torch.autograd.grad(alg.meta_loss(batch), list(alg.parameters()))[names.index("model.features.0.bias")]
    assert bias.abs().max() < 1e-12


def test_written_out_batchnorm_shares_parameters_and_keeps_the_native_op_in_the_loop():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, affine=False, track_running_stats=False), nn.ReLU())
    f = core.functional(model)
    fv = core.for_vmap(f)
    assert isinstance(model[1], nn.BatchNorm1d)  # the user's module is untouched
    x = torch.randn(5, 3, dtype=torch.float64)
    model.double()
    params = core.named_params(model)
    assert rel_err(fv(params, x).detach(), f(params, x).detach()) < 1e-12
    # Nothing to write out: the same function back.
    mlp = core.functional(MLP((1, 4, 1)))
    assert core.for_vmap(mlp) is mlp


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape", [(5, 4, 6, 6), (7, 3)])
def test_written_out_batch_norm_equals_the_native_op_to_second_order(affine, shape, gen):
    """core.batch_norm against torch's batch norm on batch statistics (float64): outputs, gradients with
    respect to the input, weight and bias, and the gradient of a function of those gradients (what MAML's
    order 2 differentiates)."""
    x = torch.randn(*shape, generator=gen, dtype=torch.float64).mul(3).add(1).requires_grad_()
    channels = shape[1]
    w = torch.randn(channels, generator=gen, dtype=torch.float64).requires_grad_() if affine else None
    b = torch.randn(channels, generator=gen, dtype=torch.float64).requires_grad_() if affine else None
    g = torch.randn(*shape, generator=gen, dtype=torch.float64)
    inputs = [t for t in (x, w, b) if t is not None]
    results = []
    for bn in (lambda: core.batch_norm(x, w, b, 1e-5),
               lambda: nn.functional.batch_norm(x, None, None, w, b, training=True, eps=1e-5)):
        y = bn()
        first = torch.autograd.grad((y * g).sum(), inputs, create_graph=True)
        # A different weight per derivative, so that errors in two of them cannot cancel in the sum.
        outer = sum((t.square() * (i + 1)).sum() for i, t in enumerate(first))
        # The bias enters linearly: no second derivative to compare.
        results.append((y.detach(), [t.detach() for t in first], torch.autograd.grad(outer, inputs[:2])))
    (y0, first0, second0), (y1, first1, second1) = results
    assert rel_err(y0, y1) < 1e-12
    for a, c in zip(first0 + list(second0), first1 + list(second1)):
        assert c.norm() > 1e-6 and rel_err(a, c) < 1e-10


def test_batch_norm_under_vmap_and_func_grad_equals_the_native_op_task_by_task(gen):
    """The vmap path's use of core.batch_norm: an inner gradient by torch.func.grad inside vmap, then autograd
    through it (MAML's order 2), against torch's native op one task at a time (float64)."""
    x = torch.randn(3, 4, 5, 6, 6, generator=gen, dtype=torch.float64).mul(2).add(0.5).requires_grad_()
    w = torch.randn(5, generator=gen, dtype=torch.float64).requires_grad_()
    b = torch.randn(5, generator=gen, dtype=torch.float64).requires_grad_()

    def meta_gradient(bn, batched):
        def task(xt):
            def inner(p):
                return (bn(xt * p[0], p[1], p[2]).tanh() * torch.linspace(0.5, 2, 36, dtype=xt.dtype).view(6, 6)).sum()
            g = torch.func.grad(inner)((torch.ones((), dtype=xt.dtype), w, b))
            return (bn(xt * (1 - 0.1 * g[0]), w - 0.1 * g[1], b - 0.1 * g[2]) ** 3).mean()
        out = torch.func.vmap(task)(x).sum() if batched else sum(task(xt) for xt in x)
        return torch.autograd.grad(out, (x, w, b))

    native = meta_gradient(lambda x, w, b: nn.functional.batch_norm(x, None, None, w, b, training=True), False)
    ours = meta_gradient(lambda x, w, b: core.batch_norm(x, w, b, 1e-5), True)
    for a, c in zip(ours, native):
        assert c.norm() > 1e-3 and rel_err(a, c) < 1e-12


def test_vmap_refused_for_batchnorm_with_running_statistics_at_order2():
    torch.manual_seed(0)
    tracked = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(3))
    with pytest.raises(ValueError, match="running"):
        core.choose_path(tracked, 2, torch.device("cpu"), "vmap")
    assert core.choose_path(tracked, 1, torch.device("cpu"), "vmap") == "vmap"
    assert core.path_candidates(tracked, 2, torch.device("cpu")) == ["loop"]
    assert core.choose_path(small_cnn(), 2, torch.device("cpu"), "vmap") == "vmap"


def test_order1_equals_its_definition(gen):
    """First-order MAML: the meta-gradient is the query gradient at the adapted params."""
    torch.manual_seed(0)
    model = MLP((1, 8, 1)).double()
    batch = Sinusoid(shots=5, query_shots=5, dtype=torch.float64).sample(3, gen)
    alg = MAML(model, inner_lr=0.03, inner_steps=2, order=1)
    got = torch.autograd.grad(alg.meta_loss(batch), list(alg.parameters()))
    f = core.functional(model)
    expected = [torch.zeros_like(p) for p in model.parameters()]
    for i in range(len(batch)):
        p = {n: t.detach().clone() for n, t in model.named_parameters()}
        for _ in range(2):
            p = {n: t.requires_grad_() for n, t in p.items()}
            g = torch.autograd.grad(core.mse_loss(f(p, batch.support_x[i]), batch.support_y[i]), list(p.values()))
            p = {n: (t - 0.03 * gi).detach() for (n, t), gi in zip(p.items(), g)}
        p = {n: t.requires_grad_() for n, t in p.items()}
        gq = torch.autograd.grad(core.mse_loss(f(p, batch.query_x[i]), batch.query_y[i]), list(p.values()))
        expected = [e + gi / len(batch) for e, gi in zip(expected, gq)]
    for a, b in zip(got, expected):
        assert rel_err(a, b) < 1e-12


def test_meta_backward_in_chunks_equals_meta_loss_gradient(gen):
    torch.manual_seed(0)
    alg = MAML(MLP((1, 8, 1)).double(), inner_lr=0.03, inner_steps=1, path="loop")
    batch = Sinusoid(shots=5, query_shots=5, dtype=torch.float64).sample(5, gen)
    expected = torch.autograd.grad(alg.meta_loss(batch), list(alg.parameters()))
    alg.zero_grad()
    alg.meta_backward(batch)
    for p, e in zip(alg.parameters(), expected):
        assert rel_err(p.grad, e) < 1e-12
