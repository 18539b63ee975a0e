"""Every execution path against the reference per-task loop (itself checked against finite differences
in test_core.py) in float64, plus finite differences for the process-per-core path, and the accuracy
cost of bfloat16 autocast measured against float64. (torchrun jobs: test_distributed.py.)"""

import warnings

import pytest
import torch
from helpers import finite_difference, rel_err
from torch import nn

from metagrad import TaskBatch, core, distributed
from metagrad.algorithms import MAML
from metagrad.inner import per_parameter_lr
from metagrad.models import MLP, Conv4
from metagrad.tasks import Sinusoid

CE = nn.functional.cross_entropy


@pytest.fixture(autouse=True)
def stop_workers():
    yield
    distributed.shutdown()


def small_cnn(pool: str = "max", dtype: torch.dtype = torch.float64) -> nn.Module:
    torch.manual_seed(0)
    return Conv4(ways=3, in_channels=1, hidden=4, pool=pool).to(dtype)


def image_batch(gen: torch.Generator, tasks: int = 3, dtype: torch.dtype = torch.float64) -> TaskBatch:
    x = torch.randn(tasks, 6, 1, 16, 16, generator=gen, dtype=dtype)
    y = torch.arange(3).repeat(2).expand(tasks, 6).contiguous()
    qx = torch.randn(tasks, 9, 1, 16, 16, generator=gen, dtype=dtype)
    return TaskBatch(x, y, qx, torch.arange(3).repeat(3).expand(tasks, 9).contiguous())


def flat_grad(alg: MAML, batch: TaskBatch) -> torch.Tensor:
    alg.zero_grad(set_to_none=True)
    alg.meta_backward(batch)
    return torch.cat([p.grad.flatten() for p in alg.parameters()])


def test_path_specs_parse_and_bad_ones_are_refused():
    assert core.parse_path("loop+cl+bf16") == ("loop", frozenset({"cl", "bf16"}))
    assert core.parse_path("parallel") == ("auto", frozenset({"parallel"}))
    cnn, mlp, cpu = small_cnn(), MLP((1, 4, 1)), torch.device("cpu")
    assert core.choose_path(cnn, 2, cpu, "auto") == "loop"
    assert core.choose_path(mlp, 2, cpu, "auto") == "vmap"
    assert core.choose_path(cnn, 2, cpu, "bf16+parallel+cl") == "loop+cl+bf16+parallel"
    for bad in ("fast", "loop+vmap", "loop+bf16+bf16", "loop+", "LOOP"):
        with pytest.raises(ValueError, match="path"):
            core.parse_path(bad)
    assert core.choose_path(cnn, 2, cpu, "vmap+bf16") == "vmap+bf16"  # batch-statistics BN: written out
    tracked = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))
    with pytest.raises(ValueError, match="BatchNorm"):
        core.choose_path(tracked, 2, cpu, "vmap+bf16")


def test_bf16_on_a_cpu_without_onednn_bf16_kernels_warns_for_conv_nets(monkeypatch):
    """Without oneDNN bf16 kernels (an AVX2-only CPU) torch runs bf16 convolutions in its slow reference
    kernel (6.6x slower per Omniglot meta-iteration, README): the user is told; MLPs and float32 are not affected."""
    from metagrad import paths

    cnn, mlp, cpu = small_cnn(), MLP((1, 4, 1)), torch.device("cpu")
    monkeypatch.setattr(paths, "cpu_has_fast_bf16", lambda: False)
    with pytest.warns(RuntimeWarning, match="slow reference kernel"):
        assert core.choose_path(cnn, 2, cpu, "loop+bf16") == "loop+bf16"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        core.choose_path(cnn, 2, cpu, "loop")
        core.choose_path(mlp, 2, cpu, "vmap+bf16")
        monkeypatch.setattr(paths, "cpu_has_fast_bf16", lambda: True)
        core.choose_path(cnn, 2, cpu, "loop+bf16")


def test_the_bf16_kernel_check_matches_which_convolution_torch_runs():
    """cpu_has_fast_bf16 is what decides torch's choice: oneDNN's convolution with it, the slow one without."""
    from metagrad import paths

    x, w = torch.randn(2, 1, 8, 8, dtype=torch.bfloat16), torch.randn(4, 1, 3, 3, dtype=torch.bfloat16)
    with torch.profiler.profile() as prof:
        nn.functional.conv2d(x, w, stride=2, padding=1)
    ops = {e.key for e in prof.key_averages()}
    assert ("aten::mkldnn_convolution" in ops) == paths.cpu_has_fast_bf16()
    assert ("aten::_slow_conv2d_forward" in ops) == (not paths.cpu_has_fast_bf16())


@pytest.mark.parametrize("faster", ["loop", "vmap"])
def test_auto_times_loop_and_vmap_on_a_cpu_conv_net_and_keeps_the_faster(faster, gen):
    """`auto` on a CPU conv net runs loop and vmap in turn (a warm-up and TIMED_RUNS timed runs each), then
    keeps the one with the lower median time for that workload; every run's meta-gradient is the loop's."""
    from metagrad.algorithms.base import TIMED_RUNS
    from metagrad.train import identity, load_checkpoint

    cpu = torch.device("cpu")
    assert core.path_candidates(small_cnn(), 2, cpu) == ["loop", "vmap"]
    assert core.path_candidates(small_cnn(), 2, cpu, "loop") == ["loop"]
    assert core.path_candidates(MLP((1, 4, 1)), 2, cpu) == ["vmap"]
    batch = image_batch(gen)
    ref = flat_grad(MAML(small_cnn(), inner_lr=0.1, inner_steps=2, loss_fn=CE, path="loop"), batch)
    alg = MAML(small_cnn(), inner_lr=0.1, inner_steps=2, loss_fn=CE)
    ran, time_path = [], alg._time_path
    # A fixed clock instead of the real one, so the choice is known: `faster` takes 1 s, the other 2 s.
    alg._time_path = lambda b, p, s: (ran.append(p), time_path(b, p, 1.0 if p == faster else 2.0))
    runs = 2 * (TIMED_RUNS + 1)
    for _ in range(runs + 2):
        assert rel_err(flat_grad(alg, batch), ref) < 1e-10
    assert ran == ["loop", "vmap"] * (TIMED_RUNS + 1) + [faster] * 2
    assert list(alg.tuned_paths.values()) == [faster]
    # Another workload (more tasks) is timed afresh; a checkpoint carries the choices.
    flat_grad(alg, image_batch(gen, tasks=2))
    assert ran[-1] == "loop" and len(alg.tuned_paths) == 1
    fresh = MAML(small_cnn(), inner_lr=0.1, inner_steps=2, loss_fn=CE)
    load_checkpoint(fresh, {"identity": identity(alg), "algorithm": alg.state_dict(), "paths": alg.path_state()})
    assert fresh.tuned_paths == alg.tuned_paths and fresh._path_for(batch) == faster
    assert fresh._path_for(image_batch(gen, tasks=2)) == "vmap"  # the timing under way goes on where it was


@pytest.mark.parametrize("pool", ["max", "stride"])
@pytest.mark.parametrize("path", ["loop+cl", "loop+bf16", "loop+cl+bf16", "loop+parallel", "loop+cl+parallel"])
def test_cnn_paths_equal_the_reference_loop_at_order2(path, pool, gen):
    """float64: channels-last and the process split change only rounding; autocast leaves float64 alone,
    so bf16 paths must equal the loop exactly here (their float32 accuracy is measured below)."""
    batch = image_batch(gen)
    ref = flat_grad(MAML(small_cnn(pool), inner_lr=0.1, inner_steps=2, loss_fn=CE, path="loop"), batch)
    got = flat_grad(MAML(small_cnn(pool), inner_lr=0.1, inner_steps=2, loss_fn=CE, path=path), batch)
    assert rel_err(got, ref) < 1e-12


@pytest.mark.parametrize("order", [1, 2])
def test_parallel_matches_finite_differences_with_learned_rates_and_all_steps(order, gen):
    """Meta-SGD's learned rates and the per-step losses of MAML++ flow through the process split."""
    def alg(path: str) -> MAML:
        torch.manual_seed(0)
        model = MLP((1, 6, 1)).double()
        return MAML(model, inner_steps=3, order=order, inner_opt=per_parameter_lr(core.named_params(model), 0.05),
                    multi_step_loss_iters=10, path=path)

    batch = Sinusoid(shots=4, query_shots=4, dtype=torch.float64).sample(5, gen)
    par, loop = alg("loop+parallel"), alg("loop")
    got = par.meta_gradient(batch)
    ref = loop.meta_gradient(batch)
    assert par.exec_path() == "loop+parallel" and len(distributed.worker_pids()) == distributed.default_workers() - 1
    assert list(got) == list(ref) and any("inner_meta_params" in n for n in got)
    assert rel_err(torch.cat([g.flatten() for g in got.values()]), torch.cat([g.flatten() for g in ref.values()])) \
        < 1e-12
    assert got.metrics["meta_loss"] == pytest.approx(ref.metrics["meta_loss"], rel=1e-12)
    if order == 2:
        numeric = finite_difference(lambda: loop.meta_loss(batch), list(loop.parameters()))
        assert rel_err(torch.cat([g.flatten() for g in got.values()]), torch.cat([n.flatten() for n in numeric])) \
            < 1e-7
    par.close()
    assert distributed.worker_pids() == []


def test_parallel_workers_persist_across_steps_and_stop_on_close(gen):
    alg = MAML(small_cnn(), inner_lr=0.1, loss_fn=CE, path="parallel")
    batch = image_batch(gen, tasks=4)
    opt = torch.optim.SGD(alg.parameters(), lr=0.01)
    alg.meta_step(batch, opt)
    pids = distributed.worker_pids()
    assert len(pids) == distributed.default_workers() - 1
    alg.meta_step(batch, opt)
    assert distributed.worker_pids() == pids
    # The second step started from the updated weights in every process: compare with the loop.
    ref = MAML(small_cnn(), inner_lr=0.1, loss_fn=CE, path="loop")
    ref.load_state_dict(alg.state_dict())
    assert rel_err(flat_grad(alg, batch), flat_grad(ref, batch)) < 1e-12
    alg.close()
    assert distributed.worker_pids() == []
    with MAML(small_cnn(), inner_lr=0.1, loss_fn=CE, path="parallel") as scoped:  # a context manager too
        scoped.meta_gradient(batch)
        assert len(distributed.worker_pids()) == distributed.default_workers() - 1
    assert distributed.worker_pids() == []


def test_parallel_with_more_processes_than_tasks(gen, monkeypatch):
    monkeypatch.setenv("METAGRAD_WORKERS", "3")
    batch = image_batch(gen, tasks=2)
    alg = MAML(small_cnn(), inner_lr=0.1, loss_fn=CE, path="parallel")  # its workers live as long as it does
    got = flat_grad(alg, batch)
    assert len(distributed.worker_pids()) == 2
    ref = flat_grad(MAML(small_cnn(), inner_lr=0.1, loss_fn=CE, path="loop"), batch)
    assert rel_err(got, ref) < 1e-12
    del alg  # collected: its workers stop
    assert distributed.worker_pids() == []


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()))


def test_bf16_gradient_accuracy_against_float64(gen):
    """bf16 autocast really runs (its error is far above float32's) and costs accuracy: on these random
    image tasks the meta-gradient is ~30% off float64 (cosine ~0.95), as measured at orders 1 and 2 for
    widths 4 to 64 (benchmarks/README.md); float32 is ~1e-6 off. Hence bf16 is never chosen by 'auto'."""
    batch64 = image_batch(gen, tasks=4)
    ref = flat_grad(MAML(small_cnn(), inner_lr=0.1, inner_steps=1, loss_fn=CE, path="loop"), batch64)
    batch32 = batch64.to(dtype=torch.float32)
    grads = {}
    for path in ("loop", "loop+bf16", "loop+cl+bf16"):
        alg = MAML(small_cnn(dtype=torch.float32), inner_lr=0.1, inner_steps=1, loss_fn=CE, path=path)
        grads[path] = flat_grad(alg, batch32).double()
    fp32 = rel_err(grads["loop"], ref)
    assert fp32 < 1e-5
    for path in ("loop+bf16", "loop+cl+bf16"):
        assert 1000 * fp32 < rel_err(grads[path], ref) < 0.5
        assert cosine(grads[path], ref) > 0.9


@pytest.mark.parametrize("order", [1, 2])
def test_vmap_bf16_for_mlp_is_close_to_float64(order, gen):
    torch.manual_seed(0)
    model = MLP((1, 40, 40, 1))
    batch = Sinusoid(shots=10, query_shots=10).sample(8, gen)
    model64 = MLP((1, 40, 40, 1)).double()
    model64.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    ref = flat_grad(MAML(model64, inner_lr=0.01, order=order, path="loop"), batch.to(dtype=torch.float64))
    fp32 = rel_err(flat_grad(MAML(model, inner_lr=0.01, order=order, path="vmap"), batch).double(), ref)
    bf16 = rel_err(flat_grad(MAML(model, inner_lr=0.01, order=order, path="vmap+bf16"), batch).double(), ref)
    assert fp32 < 1e-5
    assert 100 * fp32 < bf16 < 0.5


def test_vmap_runs_the_tasks_as_one_batched_then_one_grouped_convolution(gen):
    """The kernel-changing path of issue 14 is the vmap path: the support pass at the shared start is one
    convolution over all tasks' images, and every pass with adapted (per-task) weights is one convolution
    with a group per task, not a convolution per task as on the loop."""
    from torch.utils._python_dispatch import TorchDispatchMode

    calls = []

    class Convolutions(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.convolution.default:
                calls.append((args[0].shape[0], args[-1]))  # (images in the call, groups)
            return func(*args, **(kwargs or {}))

    tasks, batch = 3, image_batch(gen, tasks=3)  # 6 support and 9 query images per task
    for path in ("vmap", "loop"):
        alg = MAML(small_cnn("stride"), inner_lr=0.1, inner_steps=1, loss_fn=CE, path=path)
        calls.clear()
        with Convolutions():
            alg.meta_backward(batch)
        if path == "vmap":
            assert (tasks * 6, 1) in calls and (9, tasks) in calls, sorted(set(calls))
            assert (6, 1) not in calls and (9, 1) not in calls  # no convolution of one task alone
        else:
            assert (6, 1) in calls and (9, 1) in calls and {g for _, g in calls} == {1}, sorted(set(calls))


def test_conv4_relu_after_maxpool_is_the_paper_block_exactly(gen):
    """Conv4 applies ReLU after max-pooling (faster); conv-BN-ReLU-pool must give the same meta-gradient."""
    model = small_cnn("max")
    layers = list(model.features)
    paper_order = []
    for i in range(0, len(layers), 4):
        conv, bn, pool, relu = layers[i:i + 4]
        assert isinstance(pool, nn.MaxPool2d) and isinstance(relu, nn.ReLU)
        paper_order += [conv, bn, relu, pool]
    paper = nn.Module()
    paper.features, paper.head = nn.Sequential(*paper_order), model.head
    paper.forward = lambda x: paper.head(paper.features(x).mean(dim=(2, 3)))
    batch = image_batch(gen)
    got = flat_grad(MAML(model, inner_lr=0.1, inner_steps=2, loss_fn=CE, path="loop"), batch)
    ref = flat_grad(MAML(paper, inner_lr=0.1, inner_steps=2, loss_fn=CE, path="loop"), batch)
    assert rel_err(got, ref) < 1e-13


def test_parallel_without_grad_runs_in_process(gen):
    model = MLP((1, 4, 1)).double()
    batch = Sinusoid(shots=3, query_shots=3, dtype=torch.float64).sample(4, gen)
    alg = MAML(model, inner_lr=0.1, order=1, path="loop+parallel")
    losses, _ = alg.adaptation_curve(batch, 1)  # evaluation: no meta-gradient, so no processes are needed
    assert distributed.worker_pids() == []
    ref, _ = MAML(model, inner_lr=0.1, order=1, path="loop").adaptation_curve(batch, 1)
    assert rel_err(losses, ref) < 1e-14


def test_parallel_without_torchrun_refuses_a_batch_off_the_cpu():
    meta = TaskBatch(*(torch.empty(2, 3, 1, device="meta") for _ in range(4)))
    with pytest.raises(ValueError, match="torchrun"):
        MAML(MLP((1, 4, 1)), inner_lr=0.1, path="loop+parallel").meta_gradient(meta)
    assert distributed.worker_pids() == []
