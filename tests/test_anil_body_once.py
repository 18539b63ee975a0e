"""ANIL runs its body once per task and set: the same losses, meta-gradients and adaptation curves as the
inner loop over the whole model (MAML masked to the head), and fewer body passes."""

import pytest
import torch
from helpers import finite_difference, rel_err
from torch import nn

from metagrad import TaskBatch
from metagrad.algorithms import ALGORITHMS, ANIL, MAML
from metagrad.experiments.omniglot import Omniglot20w1sConfig, spec
from metagrad.models import Conv4


def conv_batch(gen: torch.Generator, ways: int = 3, tasks: int = 3) -> TaskBatch:
    """A random 16x16 image per class in the support set; in the query, two noisy copies of it; float64."""
    def labels(k: int) -> torch.Tensor:
        return torch.arange(ways).repeat(k).expand(tasks, -1)
    support = torch.randn(tasks, ways, 1, 16, 16, generator=gen, dtype=torch.float64)
    query = support.repeat(1, 2, 1, 1, 1) + 0.1 * torch.randn(tasks, 2 * ways, 1, 16, 16, generator=gen,
                                                              dtype=torch.float64)
    return TaskBatch(support, labels(1), query, labels(2))


def body_passes(model: nn.Module, run) -> int:
    """How many times `run()` calls the model's first convolution (under vmap: one call covers every task)."""
    calls = []
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    handle = first.register_forward_hook(lambda *_: calls.append(1))
    try:
        run()
    finally:
        handle.remove()
    return len(calls)


def pair(model_fn, **kw) -> tuple[ANIL, MAML]:
    """ANIL and the reference: MAML whose inner loop runs the whole model and adapts the same head."""
    anil = ANIL(model_fn(), **kw)
    return anil, MAML(model_fn(), adapt_names=anil.adapt_names, **kw)


def conv4() -> nn.Module:
    torch.manual_seed(0)
    return Conv4(ways=3, hidden=8).double()


@pytest.mark.parametrize("path", ["loop", "vmap", "loop+cl"])
@pytest.mark.parametrize("order,msl", [(2, 0), (1, 0), (2, 10)])
def test_anil_body_once_gives_the_whole_model_inner_loops_meta_gradient(path, order, msl, gen):
    batch = conv_batch(gen)
    anil, ref = pair(conv4, inner_lr=0.3, inner_steps=3, order=order, loss_fn=nn.functional.cross_entropy, path=path)
    anil.multi_step_loss_iters = ref.multi_step_loss_iters = msl
    got, want = anil.meta_gradient(batch), ref.meta_gradient(batch)
    assert rel_err(torch.cat([g.flatten() for g in got.values()]),
                   torch.cat([g.flatten() for g in want.values()])) < 1e-12
    assert abs(got.metrics["meta_loss"] - want.metrics["meta_loss"]) < 1e-12
    assert got["model.head.weight"].abs().sum() > 0 and got["model.features.0.weight"].abs().sum() > 0
    per_call = 1 if path == "vmap" else len(batch)  # vmap runs every task in one call
    assert body_passes(anil.model, lambda: anil.meta_gradient(batch)) == 2 * per_call  # support once, query once
    # The whole model: each inner step, and the query after the last step (after every step with the msl).
    assert body_passes(ref.model, lambda: ref.meta_gradient(batch)) == (3 + (3 + 1 if msl else 1)) * per_call


def test_anil_body_once_gives_the_same_adaptation_curve(gen):
    batch = conv_batch(gen)
    anil, ref = pair(conv4, inner_lr=0.5, inner_steps=2, loss_fn=nn.functional.cross_entropy, path="loop")
    (la, aa), (lr_, ar) = anil.adaptation_curve(batch, 4), ref.adaptation_curve(batch, 4)
    assert la.shape == (3, 5) and rel_err(la, lr_) < 1e-12 and torch.equal(aa, ar)
    assert (la[:, -1] < la[:, 0]).all()  # adapting the head to the support images fits their copies
    assert body_passes(anil.model, lambda: anil.adaptation_curve(batch, 4)) == 2 * len(batch)


class HeadThenTanh(nn.Module):
    """A model whose last linear layer feeds a later operation: its output is not the model's."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.head = nn.Conv2d(1, 4, 3), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.head(self.body(x).mean(dim=(2, 3))))


def test_anil_runs_the_whole_model_where_the_head_is_not_the_last_operation(gen):
    batch = conv_batch(gen)

    def model() -> nn.Module:
        torch.manual_seed(0)
        return HeadThenTanh().double()

    anil, ref = pair(model, inner_lr=0.3, inner_steps=2, loss_fn=nn.functional.cross_entropy, path="loop")
    got, want = anil.meta_gradient(batch), ref.meta_gradient(batch)
    assert rel_err(torch.cat([g.flatten() for g in got.values()]),
                   torch.cat([g.flatten() for g in want.values()])) < 1e-12
    assert body_passes(anil.model, lambda: anil.meta_gradient(batch)) == (2 + 1) * len(batch)  # after its first probe


def test_anil_runs_the_whole_model_with_per_step_batch_norm(gen):
    batch = conv_batch(gen)

    def model() -> nn.Module:
        torch.manual_seed(0)
        return Conv4(ways=3, hidden=8, per_step_bn=3).double()

    anil, ref = pair(model, inner_lr=0.3, inner_steps=2, loss_fn=nn.functional.cross_entropy, path="loop")
    got, want = anil.meta_gradient(batch), ref.meta_gradient(batch)
    assert rel_err(torch.cat([g.flatten() for g in got.values()]),
                   torch.cat([g.flatten() for g in want.values()])) < 1e-12
    assert body_passes(anil.model, lambda: anil.meta_gradient(batch)) == (2 + 1) * len(batch)


@pytest.mark.parametrize("path", ["loop", "vmap"])
def test_anil_learned_per_step_head_rates_give_the_whole_model_inner_loops_meta_gradient(path, gen):
    batch = conv_batch(gen)
    anil, ref = pair(conv4, inner_lr=0.3, inner_steps=3, loss_fn=nn.functional.cross_entropy, path=path, lslr=True)
    # One rate per head tensor and step, none for the body; different everywhere, so a mixed-up index would show.
    assert {n: tuple(r.shape) for n, r in anil.inner_meta_params.items()} == \
        {n: tuple(r.shape) for n, r in ref.inner_meta_params.items()} and len(anil.inner_meta_params) == 2
    assert all(tuple(r.shape) == (3,) for r in anil.inner_meta_params.values())
    with torch.no_grad():
        for a, r in zip(anil.inner_meta_params.values(), ref.inner_meta_params.values()):
            a.copy_(torch.empty_like(a).uniform_(0.05, 0.6, generator=gen))
            r.copy_(a)
    got, want = anil.meta_gradient(batch), ref.meta_gradient(batch)
    assert list(got) == list(want)
    assert rel_err(torch.cat([g.flatten() for g in got.values()]),
                   torch.cat([g.flatten() for g in want.values()])) < 1e-12
    rates = [g for n, g in got.items() if not n.startswith("model.")]
    assert len(rates) == 2 and all((g != 0).all() for g in rates)  # every step's rate has a gradient
    assert body_passes(anil.model, lambda: anil.meta_gradient(batch)) == 2 * (1 if path == "vmap" else len(batch))


def test_anil_learned_head_rates_gradient_matches_finite_differences(gen):
    batch = conv_batch(gen, tasks=2)
    anil = ANIL(conv4(), inner_lr=0.3, inner_steps=2, loss_fn=nn.functional.cross_entropy, path="loop", lslr=True)
    rates = list(anil.inner_meta_params.values())
    with torch.no_grad():
        for r in rates:
            r.uniform_(0.1, 0.5, generator=gen)
    analytic = torch.cat([g.flatten() for g in torch.autograd.grad(anil.meta_loss(batch), rates)])
    numeric = torch.cat([g.flatten() for g in finite_difference(lambda: anil.meta_loss(batch), rates)])
    assert rel_err(analytic, numeric) < 1e-7


def test_anil_takes_maml_plus_plus_schedules_and_the_omniglot_config_keys():
    anil = ANIL(conv4(), inner_steps=5, multi_step_loss_iters=100, order_anneal_iters=50)
    assert (anil.multi_step_loss_iters, anil.current_order(), anil.order) == (100, 1, 2)
    s = spec(Omniglot20w1sConfig(algorithm="anil", lslr=True, multi_step_loss_iters=10))
    assert s["algorithm_args"]["lslr"] is True and s["algorithm_args"]["multi_step_loss_iters"] == 10
    alg = ALGORITHMS[s["algorithm"]](Conv4(**s["model_args"]), **s["algorithm_args"])
    assert isinstance(alg, ANIL) and alg.inner_opt.name == "per_layer_per_step_lr"
    assert [tuple(r.shape) for r in alg.inner_meta_params.values()] == [(5,), (5,)]  # the head's weight and bias
    assert alg.multi_step_loss_iters == 10
