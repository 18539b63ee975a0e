"""Higher-way training: a classifier meta-trained on tasks of more classes, tested on fewer (`train.narrowed`)."""

import pytest
import torch
from torch.nn import functional as F

from metagrad.tasks.graph_sbm import GraphSBM
from metagrad.train import build, narrowed


def spec(algorithm: str, args: dict, ways: int = 5) -> dict:
    return {"algorithm": algorithm, "algorithm_args": {"inner_lr": 0.3, "inner_steps": 2, **args},
            "model": "gcn", "model_args": {"ways": ways}, "tasks": "graph-sbm", "task_args": {"ways": ways}}


@pytest.mark.parametrize("algorithm, args", [("maml", {"lslr": True}), ("metasgd", {}), ("anil", {})])
def test_narrowed_classifier_is_the_wide_one_over_its_first_outputs(algorithm, args):
    s = spec(algorithm, args)
    wide, _ = build(s, seed=0)
    with torch.no_grad():  # a trained state, every tensor apart from its initialisation (Meta-SGD's rates too)
        for p in wide.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    narrow = narrowed(wide, s, 3)
    assert narrow.model.conv2.out_features == 3 and wide.model.conv2.out_features == 5
    batch = GraphSBM(ways=3).sample(4, torch.Generator().manual_seed(1))
    got = narrow.predict(narrow.adapt(batch), batch.query_x)  # [tasks, query, 3]
    # Reference: the wide classifier adapted and read over its first 3 outputs only (softmax over those 3).
    wide.loss_fn = lambda out, y: F.cross_entropy(out[..., :3], y)
    ref = wide.predict(wide.adapt(batch), batch.query_x)[..., :3]
    assert got.shape == ref.shape == (4, 15, 3)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    # The wide classifier adapted over all 5 outputs differs: the absent classes' logits enter its softmax.
    wide.loss_fn = F.cross_entropy
    assert not torch.allclose(wide.predict(wide.adapt(batch), batch.query_x)[..., :3], ref, atol=1e-3)
    assert narrow.eval_steps == wide.eval_steps and narrow.training == wide.training


def test_narrowed_refuses_more_classes_than_outputs_and_a_spec_without_ways():
    s = spec("maml", {})
    wide, _ = build(s, seed=0)
    with pytest.raises(ValueError, match="5 outputs cannot be narrowed to 6"):
        narrowed(wide, s, 6)
    with pytest.raises(ValueError, match="no `ways`"):
        narrowed(wide, {**s, "model_args": {}}, 3)
