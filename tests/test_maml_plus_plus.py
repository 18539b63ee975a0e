"""MAML++'s per-step batch norm (weights, biases, running statistics) and the ensemble of the best checkpoints."""

import pytest
import torch
from helpers import finite_difference, rel_err
from torch import nn

from metagrad import TaskBatch, core
from metagrad.algorithms import MAML
from metagrad.evaluation import (
    ensemble_predict,
    evaluate,
    evaluate_ensemble,
    rotated_task,
    rotation_views,
    shift_views,
    shifted,
    tta_views,
    with_shifted_support,
)
from metagrad.models import MLP, Conv4, PerStepBatchNorm
from metagrad.runs import Run, read_checkpoint
from metagrad.tasks import Sinusoid
from metagrad.train import meta_train

CE = nn.functional.cross_entropy


def conv4(per_step_bn: int = 3, running_stats: bool = False, seed: int = 0) -> Conv4:
    torch.manual_seed(seed)
    model = Conv4(ways=3, hidden=4, per_step_bn=per_step_bn, running_stats=running_stats).double()
    with torch.no_grad():  # a different weight and bias per step, so that a mixed-up step index would show
        for m in model.modules():
            if isinstance(m, PerStepBatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model


def image_batch(gen: torch.Generator, tasks: int = 2) -> TaskBatch:
    """3-way 1-shot, 2 query per class, 12x12 images: `[tasks, 3, 1, 12, 12]` and `[tasks, 6, 1, 12, 12]`."""
    sx = torch.rand(tasks, 3, 1, 12, 12, generator=gen, dtype=torch.float64)
    qx = torch.rand(tasks, 6, 1, 12, 12, generator=gen, dtype=torch.float64)
    return TaskBatch(sx, torch.arange(3).repeat(tasks, 1), qx, torch.arange(3).repeat(tasks, 2))


def test_per_step_bn_meta_gradient_matches_finite_differences(gen):
    # 2 inner steps: set 0 normalises the first support pass, set 1 the second, set 2 the query pass.
    alg = MAML(conv4(), inner_lr=0.1, inner_steps=2, order=2, loss_fn=CE, lslr=True, path="loop")
    assert not set(alg.model.meta_only) & set(alg.adapt_names)  # outer loop only, as in MAML++
    batch = image_batch(gen, tasks=1)
    grads = alg.meta_gradient(batch)
    numeric = finite_difference(lambda: alg.meta_loss(batch), [alg.model.features[4].weight])[0]  # [3 sets, 4]
    assert rel_err(grads["model.features.4.weight"], numeric) < 1e-6
    assert all(grads["model.features.4.weight"][k].abs().sum() > 1e-4 for k in range(3))  # every set is read


def test_first_order_sees_only_the_query_pass_set(gen):
    # Order 1 treats the inner gradients as constants: the sets of the support passes get no meta-gradient.
    alg = MAML(conv4(), inner_lr=0.1, inner_steps=2, order=1, loss_fn=CE, path="loop")
    w = alg.meta_gradient(image_batch(gen))["model.features.4.weight"]
    assert torch.equal(w[:2], torch.zeros_like(w[:2])) and w[2].abs().sum() > 1e-4


def test_per_step_bn_vmap_equals_the_loop(gen):
    batch = image_batch(gen, tasks=3)
    grads = [MAML(conv4(), inner_lr=0.1, inner_steps=2, order=2, loss_fn=CE, path=p).meta_gradient(batch)
             for p in ("loop", "vmap")]
    # Over all parameters at once: the conv biases before batch norm have a meta-gradient of exactly 0, so
    # theirs alone would compare rounding noise.
    assert rel_err(torch.cat([g.flatten() for g in grads[1].values()]),
                   torch.cat([g.flatten() for g in grads[0].values()])) < 1e-10


def test_running_statistics_are_kept_per_step(gen):
    alg = MAML(conv4(running_stats=True), inner_lr=0.1, inner_steps=1, order=2, loss_fn=CE, path="loop")
    # The same weights without running statistics: its forward passes write nothing.
    twin = MAML(conv4(running_stats=False), inner_lr=0.1, inner_steps=1, order=2, loss_fn=CE, path="loop")
    batch = image_batch(gen, tasks=1)
    alg.meta_gradient(batch)
    # Reference: the first block's input to batch norm, conv(x) at theta (support pass) and at theta' (query).
    theta = twin.params()
    adapted = twin.adapter(order=0).replace(path=core.ExecPath("loop")).adapt(theta, (batch.support_x[0],
                                                                                        batch.support_y[0]))
    bn = alg.model.features[1]
    for k, (params, x) in enumerate([(theta, batch.support_x[0]), (adapted, batch.query_x[0])]):
        h = nn.functional.conv2d(x, params["features.0.weight"],
                                 params["features.0.bias"], stride=2, padding=1)
        mean, var = h.mean((0, 2, 3)), h.var((0, 2, 3), unbiased=True)
        assert torch.allclose(bn.running_mean[k], 0.1 * mean, atol=1e-12)  # momentum 0.1 from 0
        assert torch.allclose(bn.running_var[k], 0.9 + 0.1 * var, atol=1e-12)  # from 1
    assert torch.equal(bn.running_mean[2], torch.zeros(4))  # a set no pass reached is untouched
    # Eval mode normalises with set k's running statistics.
    alg.model.eval()
    x = torch.rand(5, 4, 3, 3, generator=gen, dtype=torch.float64)
    k = 1
    expected = (x - bn.running_mean[k].view(1, -1, 1, 1)) / torch.sqrt(bn.running_var[k].view(1, -1, 1, 1) + 1e-5) \
        * bn.weight[k].view(1, -1, 1, 1) + bn.bias[k].view(1, -1, 1, 1)
    assert torch.allclose(bn(x, step=k), expected, atol=1e-12)
    assert torch.equal(bn(x, step=7), bn(x, step=2))  # more steps than sets: the last set


def test_paths_that_cannot_write_running_statistics_are_refused(gen):
    model = conv4(running_stats=True)
    for path in ("vmap", "parallel"):
        with pytest.raises(ValueError, match="running statistics"):
            MAML(model, inner_lr=0.1, loss_fn=CE, path=path).meta_gradient(image_batch(gen))
    alg = MAML(model, inner_lr=0.1, loss_fn=CE, path="auto")
    assert alg.meta_gradient(image_batch(gen)).path == "loop"
    model.eval()  # nothing is written in eval mode: vmap is exact there
    assert MAML(model, inner_lr=0.1, loss_fn=CE, path="vmap").meta_gradient(image_batch(gen)).path == "vmap"


# -- the ensemble of the best validation checkpoints ---------------------------------------------------------
def reference_prediction(alg: MAML, batch: TaskBatch) -> torch.Tensor:
    """One member's class probabilities `[tasks, query, ways]`, by a hand-written SGD inner loop over the module."""
    model, out = alg.model, []
    for i in range(len(batch)):
        p = {n: t.detach().requires_grad_(n in alg.adapt_names) for n, t in model.named_parameters()}
        for k in range(alg.eval_steps):
            loss = CE(torch.func.functional_call(model, p, (batch.support_x[i],), {"step": k}), batch.support_y[i])
            grads = torch.autograd.grad(loss, [p[n] for n in alg.adapt_names])
            p = {**p, **{n: (p[n] - 0.1 * g).detach().requires_grad_(True) for n, g in zip(alg.adapt_names, grads)}}
        with torch.no_grad():
            out.append(torch.func.functional_call(model, p, (batch.query_x[i],), {"step": alg.eval_steps}).softmax(-1))
    return torch.stack(out)


def test_the_ensemble_predicts_the_mean_of_its_members_predictions(gen):
    members = [MAML(conv4(seed=s), inner_lr=0.1, inner_steps=2, loss_fn=CE, path="loop") for s in range(3)]
    batch = image_batch(gen, tasks=4)
    refs = [reference_prediction(m, batch) for m in members]
    mean = ensemble_predict(members, batch)
    assert torch.allclose(mean, torch.stack(refs).mean(0), atol=1e-12)
    assert not torch.allclose(refs[0], refs[1], atol=1e-3)  # the members differ: the mean is a real average
    result = evaluate_ensemble(members, batch)
    assert result.mean == pytest.approx(float((mean.argmax(-1) == batch.query_y).double().mean()), abs=1e-12)
    single = evaluate_ensemble(members[:1], batch)  # one member: the model's own accuracy
    assert single.mean == pytest.approx(evaluate(members[0], batch).mean, abs=1e-12)


# -- test-time augmentation: the mean prediction over shifted views of the query images -----------------------
def shifted_by_hand(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Pixel (i, j) of the output is pixel (i - dy, j - dx) of the input, clamped to the frame."""
    h, w = x.shape[-2:]
    rows = [min(max(i - dy, 0), h - 1) for i in range(h)]
    cols = [min(max(j - dx, 0), w - 1) for j in range(w)]
    return x[..., rows, :][..., cols]


def test_shifted_moves_the_image_and_repeats_its_edge(gen):
    x = torch.rand(2, 3, 1, 7, 9, generator=gen)
    for dy, dx in [(1, 0), (-1, 0), (0, 2), (0, -3), (2, -1), (-2, 3), (0, 0)]:
        assert torch.equal(shifted(x, dy, dx), shifted_by_hand(x, dy, dx)), (dy, dx)
    assert torch.equal(shifted(x, 1, 0)[..., 1:, :], x[..., :-1, :])  # one row down, the top row repeated
    assert torch.equal(shifted(x, 1, 0)[..., 0, :], x[..., 0, :])
    with pytest.raises(ValueError, match="out of its frame"):
        shifted(x, 7, 0)


def test_shift_views_are_every_shift_within_the_radius_the_image_itself_first():
    assert shift_views(0) == [(0, 0)]
    views = shift_views(1)
    assert views[0] == (0, 0) and len(views) == len(set(views)) == 9
    assert set(views) == {(a, b) for a in (-1, 0, 1) for b in (-1, 0, 1)}
    assert len(shift_views(2)) == 25
    with pytest.raises(ValueError):
        shift_views(-1)


def test_test_time_augmentation_predicts_the_mean_over_the_shifted_query_views(gen):
    members = [MAML(conv4(seed=s), inner_lr=0.1, inner_steps=2, loss_fn=CE, path="loop") for s in range(2)]
    batch = image_batch(gen, tasks=3)
    views = shift_views(1)
    moved = [TaskBatch(batch.support_x, batch.support_y, shifted_by_hand(batch.query_x, dy, dx), batch.query_y)
             for dy, dx in views]
    refs = [[reference_prediction(m, b) for b in moved] for m in members]  # [members][views]
    one = ensemble_predict(members[:1], batch, views)
    assert torch.allclose(one, torch.stack(refs[0]).mean(0), atol=1e-12)
    assert not torch.allclose(refs[0][0], refs[0][1], atol=1e-3)  # the views differ: the mean is a real average
    both = ensemble_predict(members, batch, views)  # members and views: one mean over all of them
    assert torch.allclose(both, torch.stack([r for rs in refs for r in rs]).mean(0), atol=1e-12)
    assert torch.equal(ensemble_predict(members[:1], batch, [(0, 0)]), ensemble_predict(members[:1], batch))
    result = evaluate_ensemble(members[:1], batch, query_shifts=views)
    assert result.mean == pytest.approx(float((one.argmax(-1) == batch.query_y).double().mean()), abs=1e-12)
    with pytest.raises(ValueError, match="at least one view"):
        ensemble_predict(members, batch, [])


def test_support_augmentation_adapts_on_every_shifted_copy_of_the_support_images(gen):
    alg = MAML(conv4(seed=3), inner_lr=0.1, inner_steps=2, loss_fn=CE, path="loop")
    batch = image_batch(gen, tasks=3)
    s_views, q_views = shift_views(1), [(0, 0), (1, -1)]
    sx = torch.cat([shifted_by_hand(batch.support_x, dy, dx) for dy, dx in s_views], 1)  # [tasks, 3 * 9, 1, 12, 12]
    sy = torch.cat([batch.support_y] * len(s_views), 1)
    refs = [reference_prediction(alg, TaskBatch(sx, sy, shifted_by_hand(batch.query_x, dy, dx), batch.query_y))
            for dy, dx in q_views]
    got = ensemble_predict([alg], batch, q_views, support_shifts=s_views)
    assert torch.allclose(got, torch.stack(refs).mean(0), atol=1e-12)
    plain = ensemble_predict([alg], batch, q_views)
    assert not torch.allclose(got, plain, atol=1e-3)  # the shifted copies change the adapted model
    assert torch.equal(with_shifted_support(batch, [(0, 0)]).support_x, batch.support_x)
    with pytest.raises(ValueError, match="at least one view"):
        with_shifted_support(batch, [])


def turned_by_hand(x: torch.Tensor, turns: int) -> torch.Tensor:
    """Each image `[..., n, n]` turned counter-clockwise `turns` times: pixel (i, j) of one turn is (j, n - 1 - i)."""
    for _ in range(turns % 4):
        n = x.shape[-1]
        x = torch.stack([torch.stack([x[..., j, n - 1 - i] for j in range(n)], -1) for i in range(n)], -2)
    return x


def test_task_rotations_average_the_predictions_on_the_whole_task_turned(gen):
    alg = MAML(conv4(seed=5), inner_lr=0.1, inner_steps=2, loss_fn=CE, path="loop")
    batch = image_batch(gen, tasks=3)
    assert rotation_views(1) == [0] and rotation_views(2) == [0, 2] and rotation_views(4) == [0, 1, 2, 3]
    turned = {k: TaskBatch(turned_by_hand(batch.support_x, k), batch.support_y,
                           turned_by_hand(batch.query_x, k), batch.query_y) for k in range(4)}
    for k in range(4):
        assert torch.equal(rotated_task(batch, k).support_x, turned[k].support_x)
        assert torch.equal(rotated_task(batch, k).query_x, turned[k].query_x)
    refs = {k: reference_prediction(alg, turned[k]) for k in range(4)}
    assert not torch.allclose(refs[0], refs[1], atol=1e-3)  # a turned task is another view: the mean is a real one
    for turns in (2, 4):
        got = ensemble_predict([alg], batch, **tta_views(0, 0, turns))
        assert torch.allclose(got, torch.stack([refs[k] for k in rotation_views(turns)]).mean(0), atol=1e-12)
    assert torch.equal(ensemble_predict([alg], batch, task_rotations=[0]), ensemble_predict([alg], batch))
    # With shifts too: every rotation adapts on its own shifted support copies and averages its query views.
    s_views, q_views = [(0, 0), (1, 0)], [(0, 0), (0, -1)]
    refs = []
    for k in (0, 2):
        t = turned[k]
        sx = torch.cat([shifted_by_hand(t.support_x, dy, dx) for dy, dx in s_views], 1)
        sy = torch.cat([t.support_y] * len(s_views), 1)
        refs += [reference_prediction(alg, TaskBatch(sx, sy, shifted_by_hand(t.query_x, dy, dx), t.query_y))
                 for dy, dx in q_views]
    got = ensemble_predict([alg], batch, q_views, s_views, task_rotations=[0, 2])
    assert torch.allclose(got, torch.stack(refs).mean(0), atol=1e-12)
    result = evaluate_ensemble([alg], batch, task_rotations=[0, 2])
    mean = ensemble_predict([alg], batch, task_rotations=[0, 2])
    assert result.mean == pytest.approx(float((mean.argmax(-1) == batch.query_y).double().mean()), abs=1e-12)
    with pytest.raises(ValueError, match="1 \\(none\\), 2"):
        rotation_views(3)
    with pytest.raises(ValueError, match="at least one view"):
        ensemble_predict([alg], batch, task_rotations=[])
    wide = TaskBatch(batch.support_x[..., :10], batch.support_y, batch.query_x[..., :10], batch.query_y)
    with pytest.raises(ValueError, match="square images"):
        rotated_task(wide, 1)


def test_support_augmentation_adapts_the_tasks_in_chunks_that_hold_the_plain_batchs_memory(gen):
    alg = MAML(conv4(seed=4), inner_lr=0.1, inner_steps=1, loss_fn=CE, path="vmap")
    batch, views = image_batch(gen, tasks=10), shift_views(1)
    adapt, seen = alg.adapt, []
    alg.adapt = lambda b: seen.append(b.support_x.shape[:2]) or adapt(b)
    got = ensemble_predict([alg], batch, [(0, 0), (1, 0)], views)
    # 10 tasks, 9 views: chunks of 2 tasks, each 2 x 27 support images, under the plain batch's 10 x 3.
    assert seen == [torch.Size([2, 27])] * 5
    one_by_one = torch.cat([ensemble_predict([alg], batch[i:i + 1], [(0, 0), (1, 0)], views) for i in range(10)])
    assert torch.allclose(got, one_by_one, atol=1e-12)
    with pytest.raises(ValueError, match="at least one view"):
        ensemble_predict([alg], batch, [(0, 0)], [])


def test_meta_train_keeps_the_best_validation_checkpoints(tmp_path, gen):
    torch.manual_seed(0)
    alg = MAML(MLP((1, 8, 1)), inner_lr=0.01, inner_steps=1)
    run = Run(tmp_path / "run")
    tasks = Sinusoid(shots=5, query_shots=5)
    meta_train(alg, tasks, iterations=6, meta_batch=4, outer_lr=0.05, run=run, val_tasks=tasks, val_every=1,
               val_n_tasks=8, log_every=1, progress=False, keep_best=2)
    losses = {m["step"]: m["meta_test_loss"] for m in run.metrics() if "meta_test_loss" in m}
    best = sorted(losses, key=lambda s: (losses[s], s))[:2]
    assert [e["iteration"] for e in run.best()] == best  # lower loss is better, best first
    assert sorted(p.name for p in (run.dir / "best").glob("*.safetensors")) == sorted(e["file"] for e in run.best())
    assert read_checkpoint(run.best_paths()[0])["iteration"] == best[0]
    run.truncate_best(min(best))  # a resumed run forgets what it will validate again
    assert [e["iteration"] for e in run.best()] == [min(best)] and len(list((run.dir / "best").glob("*.s*"))) == 1
    with pytest.raises(ValueError, match="keep_best"):
        meta_train(alg, tasks, iterations=1, meta_batch=2, keep_best=2, progress=False)
