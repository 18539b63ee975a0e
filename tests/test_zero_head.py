"""The zeroing trick (`zero_head`, Kao et al. 2022): every adaptation starts with the head at zero.

Checked against explicit references: the meta-gradient equals plain MAML's on a copy of the model whose head
is zero (the head's own meta-gradient is zero), and ANIL's first inner step from a zero head is the closed form
of one gradient step of softmax regression from zero."""

import math

import pytest
import torch
from helpers import rel_err
from test_anil_body_once import conv_batch
from torch import nn

from metagrad.algorithms import ALGORITHMS, ANIL, MAML
from metagrad.experiments.omniglot import Omniglot20w1sConfig, spec
from metagrad.models import Conv4

CE = nn.functional.cross_entropy
HEAD = ("head.weight", "head.bias")


def conv4(zero: bool = False) -> nn.Module:
    torch.manual_seed(0)
    model = Conv4(ways=3, hidden=8).double()
    with torch.no_grad():
        model.head.bias.normal_()  # a head far from zero, so that a start from it differs from a start from zero
        if zero:
            model.head.weight.zero_()
            model.head.bias.zero_()
    return model


@pytest.mark.parametrize("cls,path,order", [(MAML, "loop", 2), (MAML, "vmap", 2), (MAML, "loop", 1),
                                            (ANIL, "loop", 2), (ANIL, "vmap", 2)])
def test_zero_head_meta_gradient_is_plain_maml_on_a_zeroed_copy(cls, path, order, gen):
    batch = conv_batch(gen)
    kw = dict(inner_lr=0.3, inner_steps=2, order=order, loss_fn=CE, path=path)
    got = cls(conv4(), zero_head=True, **kw).meta_gradient(batch)
    want = cls(conv4(zero=True), **kw).meta_gradient(batch)
    plain = cls(conv4(), **kw).meta_gradient(batch)
    body = [n for n in got if not n.endswith(HEAD)]
    cat = lambda g: torch.cat([g[n].flatten() for n in body])  # noqa: E731
    assert rel_err(cat(got), cat(want)) < 1e-12
    assert abs(got.metrics["meta_loss"] - want.metrics["meta_loss"]) < 1e-12
    assert rel_err(cat(got), cat(plain)) > 1e-3  # the start from the stored head is a different objective
    for n in got:
        if n.endswith(HEAD):
            assert torch.equal(got[n], torch.zeros_like(got[n])) and want[n].abs().sum() > 0


def test_anil_zero_head_first_step_is_softmax_regressions_closed_form(gen):
    batch = conv_batch(gen, ways=3, tasks=2)
    lr = 0.7
    anil = ANIL(conv4(), inner_lr=lr, inner_steps=1, loss_fn=CE, path="loop", zero_head=True)
    losses, acc = anil.adaptation_curve(batch, 1)
    assert torch.allclose(losses[:, 0], torch.full((2,), math.log(3), dtype=torch.float64), atol=1e-12)
    def body(x: torch.Tensor) -> torch.Tensor:  # Conv4's head input: its features, averaged over the map
        return anil.model.features(x).mean(dim=(2, 3)).detach()

    for t in range(2):
        h_s, h_q = body(batch.support_x[t]), body(batch.query_x[t])
        # From W = 0, b = 0 every class has p = 1/N: one step of the mean cross-entropy's gradient is
        # W = lr/n sum_i (y_i - 1/N) h_i^T, b = lr/n sum_i (y_i - 1/N).
        r = nn.functional.one_hot(batch.support_y[t], 3).double() - 1 / 3
        w, b = lr / len(h_s) * r.T @ h_s, lr / len(h_s) * r.sum(0)
        logits = h_q @ w.T + b
        assert abs(float(losses[t, 1]) - float(CE(logits, batch.query_y[t]))) < 1e-10
        assert abs(float(acc[t, 1]) - float((logits.argmax(1) == batch.query_y[t]).double().mean())) < 1e-12


def test_zero_head_leaves_the_stored_head_untouched_by_training(gen):
    alg = ANIL(conv4(), inner_lr=0.3, inner_steps=1, loss_fn=CE, path="loop", zero_head=True)
    before = {n: p.detach().clone() for n, p in alg.model.named_parameters()}
    opt = torch.optim.Adam(alg.parameters(), lr=1e-2)
    for _ in range(2):
        alg.train_step(conv_batch(gen), opt)
    after = dict(alg.model.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in HEAD)
    assert not torch.equal(before["features.0.weight"], after["features.0.weight"])
    adapted = alg.adapt(conv_batch(gen), steps=0)  # zero steps: the start itself
    assert all(adapted[n].abs().sum() == 0 for n in HEAD)


def test_zero_head_names_and_the_omniglot_config_key():
    assert MAML(conv4(), zero_head=True).zero_names == list(HEAD)
    assert MAML(conv4(), zero_head=["head.bias"]).zero_names == ["head.bias"]
    assert MAML(conv4()).zero_names == []
    with pytest.raises(ValueError, match="not parameters"):
        MAML(conv4(), zero_head=["head.nope"])
    assert ALGORITHMS["maml++"](conv4(), zero_head=True).zero_names == list(HEAD)
    for algorithm in ("anil", "maml", "fomaml", "maml++"):
        s = spec(Omniglot20w1sConfig(algorithm=algorithm, zero_head=True))
        assert ALGORITHMS[s["algorithm"]](conv4(), loss_fn=CE, **s["algorithm_args"]).zero_names == list(HEAD)
    assert "zero_head" not in spec(Omniglot20w1sConfig(algorithm="anil"))["algorithm_args"]
