"""The second core: tasks of any structure with their own loss, the adapter (adapt and evaluate apart),
the one map over tasks on every path for every algorithm, optax-style inner optimizers, and the pure
meta-gradient (against finite differences and the reference loop, float64)."""

from __future__ import annotations

import pytest
import torch
from helpers import finite_difference, rel_err
from torch import nn

from metagrad import TaskBatch, core, distributed
from metagrad.algorithms import ALGORITHMS, ANIL, MAML
from metagrad.core import Adapter, ExecPath, Tasks
from metagrad.experiments.fairness import fair_loss, fairness_curves
from metagrad.experiments.inverse_design import graph_bytes
from metagrad.inner import adam, chain, masked, per_layer_per_step_lr, scale, sgd
from metagrad.models import MLP, Conv4
from metagrad.tasks import Sinusoid
from metagrad.tasks.fairness import Fairness

CE = nn.functional.cross_entropy


@pytest.fixture(autouse=True)
def stop_workers():
    yield
    distributed.shutdown()


def flat(grads) -> torch.Tensor:
    return torch.cat([g.flatten() for g in (grads.values() if isinstance(grads, dict) else grads)])


# -- tasks that are not x and y ------------------------------------------------------------------------
def weighted_regression(gen: torch.Generator, tasks: int = 4) -> Tasks:
    """Each task's data is a dict: inputs, targets and a weight per example (a pytree, not four tensors)."""
    def part(n: int) -> dict[str, torch.Tensor]:
        x = torch.randn(tasks, n, 2, generator=gen, dtype=torch.float64)
        w_true = torch.randn(tasks, 1, 2, generator=gen, dtype=torch.float64)
        return {"x": x, "y": (x * w_true).sum(-1, keepdim=True),
                "weight": torch.rand(tasks, n, generator=gen, dtype=torch.float64) + 0.5}

    return Tasks(part(6), part(5))


def weighted_mse(f, params, data) -> torch.Tensor:
    """A task loss of the task's own structure: example weights travel with the data."""
    err = ((f(params, data["x"]) - data["y"]) ** 2).sum(-1)
    return (data["weight"] * err).sum() / data["weight"].sum()


def test_a_task_of_any_structure_with_its_own_loss_matches_finite_differences(gen):
    batch = weighted_regression(gen)
    torch.manual_seed(0)
    grads = {}
    for path in ("loop", "vmap"):
        alg = MAML(MLP((2, 8, 1)).double(), inner_lr=0.1, inner_steps=2, order=2, task_loss=weighted_mse, path=path)
        grads[path] = flat(alg.meta_gradient(batch))
        torch.manual_seed(0)
    numeric = finite_difference(lambda: alg.meta_loss(batch), list(alg.parameters()))
    assert rel_err(grads["loop"], flat(numeric)) < 1e-7
    assert rel_err(grads["vmap"], grads["loop"]) < 1e-12
    # Its pieces: slicing keeps the structure, and a mismatch in the number of tasks is refused.
    assert len(batch[1:3]) == 2 and set(batch[1:3].support) == {"x", "y", "weight"}
    with pytest.raises(ValueError, match="tasks"):
        Tasks({"x": torch.zeros(3, 2)}, {"x": torch.zeros(4, 2)})


def test_adapt_and_evaluate_are_separate_calls_that_compose_to_the_objective(gen):
    """Meta-RL adapts, rolls out the adapted policy, then evaluates: the two calls must compose exactly."""
    torch.manual_seed(0)
    alg = MAML(MLP((1, 8, 1)).double(), inner_lr=0.05, inner_steps=3, order=2)
    batch = Sinusoid(shots=5, query_shots=5, dtype=torch.float64).sample(3, gen)
    ad = alg.adapter()
    assert isinstance(ad, Adapter) and ad.steps == 3 and ad.order == 2
    theta = alg.params()
    losses = []
    for i in range(len(batch)):
        adapted = ad.adapt(theta, core.index_tasks(batch.support, i))
        loss, metrics = ad.evaluate(adapted, core.index_tasks(batch.query, i))
        assert metrics == {}  # regression: no accuracy
        losses.append(loss)
    by_hand = torch.autograd.grad(torch.stack(losses).mean(), list(alg.parameters()))
    assert rel_err(flat(by_hand), flat(alg.meta_gradient(batch))) < 1e-12
    # Classification: the evaluation's metrics carry the accuracy.
    torch.manual_seed(0)
    cls = MAML(MLP((1, 8, 3)).double(), inner_lr=0.05, loss_fn=CE)
    x = torch.randn(2, 6, 1, generator=gen, dtype=torch.float64)
    y = torch.arange(3).repeat(2).expand(2, 6)
    _, m = cls.adapter().evaluate(cls.params(), (x[0], y[0]))
    assert float(m["accuracy"]) == pytest.approx(float((cls.f(cls.params(), x[0]).argmax(-1) == y[0]).double().mean()))


def test_a_target_of_another_shape_than_the_output_is_refused(gen):
    alg = MAML(MLP((1, 8, 1)), inner_lr=0.05)
    x = torch.randn(2, 5, 1, generator=gen)
    bad = TaskBatch(x, torch.randn(2, 5), x, torch.randn(2, 5))  # [tasks, shots] targets for [.., 1] outputs
    with pytest.raises(ValueError, match=r"output has shape \(5, 1\) but the target has shape \(5,\)"):
        alg.meta_gradient(bad)


# -- inner optimizers as optax does them ---------------------------------------------------------------
def test_chain_scale_mask_and_the_step_count_in_the_state(gen):
    params = {"a": torch.randn(3, generator=gen, dtype=torch.float64), "b": torch.randn(2, generator=gen,
                                                                                        dtype=torch.float64)}
    grads = [{n: torch.randn(p.shape, generator=gen, dtype=torch.float64) for n, p in params.items()}
             for _ in range(3)]
    ref, chained = adam(0.2), chain(adam(1.0), scale(0.2))
    s1, s2 = ref.init(params), chained.init(params)
    for g in grads:
        u1, s1 = ref.update(g, s1, params)
        u2, s2 = chained.update(g, s2, params)
        for n in params:
            assert torch.allclose(u1[n], u2[n], rtol=1e-14, atol=0)
    assert s1[0] == 3 and s2[0][0] == 3  # the step count lives in the state (optax's count)
    # MAML++'s per-step rates read the count from the state: step k uses rate k.
    lslr = per_layer_per_step_lr(params, 0.1, steps=2)
    with torch.no_grad():
        lslr.meta_params["a"].copy_(torch.tensor([0.1, 0.3]))
    state = lslr.init(params)
    u, state = lslr.update(grads[0], state, params)
    assert torch.allclose(u["a"], -0.1 * grads[0]["a"])
    u, state = lslr.update(grads[1], state, params)
    assert torch.allclose(u["a"], -0.3 * grads[1]["a"]) and state == 2
    # A mask adapts the named parameters only; ANIL's head-only inner loop is one.
    head = masked(sgd(0.1), ["b"])
    assert head.select(params).keys() == {"b"}
    model = MLP((1, 4, 2))
    anil = ANIL(model)
    assert anil.adapter().inner_opt.adapts == ("2.weight", "2.bias") == tuple(anil.adapt_names)


# -- the meta-gradient: pure, bounded memory -----------------------------------------------------------
def test_meta_gradient_is_pure_and_meta_loss_keeps_no_graph(gen):
    torch.manual_seed(0)
    alg = MAML(MLP((1, 16, 16, 1)).double(), inner_lr=0.05, inner_steps=2, order=2, path="loop")
    batch = Sinusoid(shots=5, query_shots=5, dtype=torch.float64).sample(6, gen)
    before = {n: p.detach().clone() for n, p in alg.named_parameters()}
    g = alg.meta_gradient(batch, iteration=0)
    assert list(g) == list(alg.meta_parameters()) and all(p.grad is None for p in alg.parameters())
    assert all(torch.equal(before[n], p) for n, p in alg.named_parameters()) and int(alg.iteration) == 0
    assert g.metrics["meta_loss"] > 0 and g.path == "loop"
    # meta_loss hands autograd the gradient computed a task at a time: its graph keeps nothing saved,
    # where the whole objective keeps every task's inner graphs.
    loss, held = graph_bytes(lambda: alg.meta_loss(batch))
    _, whole = graph_bytes(lambda: alg.objective(batch, 0, ExecPath("loop"))[0])
    assert held < whole / 20
    assert rel_err(flat(torch.autograd.grad(loss, list(alg.parameters()))), flat(g)) < 1e-14


def test_train_step_is_the_meta_gradient_then_the_optimizer(gen):
    torch.manual_seed(0)
    alg = MAML(MLP((1, 8, 1)).double(), inner_lr=0.05)
    batch = Sinusoid(shots=5, query_shots=5, dtype=torch.float64).sample(4, gen)
    g = alg.meta_gradient(batch)
    expected = {n: p.detach() - 0.1 * g[n] for n, p in alg.meta_parameters().items()}
    metrics = alg.train_step(batch, torch.optim.SGD(alg.parameters(), lr=0.1))
    assert int(alg.iteration) == 1 and metrics["grad_norm"] == pytest.approx(float(flat(g).norm()), rel=1e-12)
    for n, p in alg.meta_parameters().items():
        assert torch.allclose(p, expected[n], rtol=0, atol=1e-15)


# -- every algorithm on every path option --------------------------------------------------------------
PATHS = ("vmap", "loop+cl", "loop+bf16", "vmap+bf16", "loop+cl+bf16+parallel", "vmap+parallel")
ARGS = {"imaml": dict(inner_steps=2, cg_steps=2), "optimum-average": dict(fit_steps=2),
        "l2o": dict(inner_steps=2, unroll=2), "reptile": dict(inner_steps=2), "maml++": dict(inner_steps=2)}


def conv_batch(gen: torch.Generator) -> TaskBatch:
    x = torch.randn(3, 6, 1, 16, 16, generator=gen, dtype=torch.float64)
    qx = torch.randn(3, 6, 1, 16, 16, generator=gen, dtype=torch.float64)
    y = torch.arange(3).repeat(2).expand(3, 6).contiguous()
    return TaskBatch(x, y, qx, y)


def build(name: str, path: str) -> nn.Module:
    torch.manual_seed(0)
    model = Conv4(ways=3, in_channels=1, hidden=4, pool="max").double()  # batch-statistics BatchNorm
    order = {"reptile": 1, "pretrain": 1, "optimum-average": 1, "fomaml": 1}.get(name, 2)
    kwargs = dict(inner_lr=0.1, order=order, loss_fn=CE, path=path, **ARGS.get(name, {}))
    if name == "l2o":
        kwargs.pop("loss_fn")
        return ALGORITHMS[name](model, loss_fn=CE, **{k: v for k, v in kwargs.items() if k != "inner_lr"})
    return ALGORITHMS[name](model, **kwargs)


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_every_algorithm_on_every_path_option_equals_the_loop_or_refuses(name, gen):
    """float64: vmap, channels-last, bf16 autocast (which leaves float64 alone) and the process split change
    rounding only; an option an algorithm cannot honour is refused naming both."""
    batch = conv_batch(gen)
    ref = flat(build(name, "loop").meta_gradient(batch))
    assert ref.norm() > 0
    with pytest.raises(ValueError, match="'cl' .* loop path only"):  # torch's vmap cannot do channels-last
        build(name, "vmap+cl").meta_gradient(batch)
    for path in PATHS:
        if name == "l2o" and "parallel" in path:
            with pytest.raises(ValueError, match="L2O does not support path option 'parallel'"):
                build(name, path)
            continue
        alg = build(name, path)
        got = alg.meta_gradient(batch)
        assert got.path == path
        assert rel_err(flat(got), ref) < 1e-12, path
        alg.close()


def test_fairness_with_anil_adapts_only_the_head(gen):
    """The fairness experiment adapts a start with the start's own adapter: ANIL's head, and only it."""
    torch.manual_seed(0)
    alg = ANIL(MLP((3, 8, 1)).double(), inner_lr=0.5, inner_steps=2, loss_fn=fair_loss(0.0))
    test = Fairness(shots=10, query_shots=20).sample(3, gen).to(dtype=torch.float64)
    traj = alg.trajectories(test.support, 2)
    theta = alg.params()
    for n, t in traj.items():
        moved = (t[:, 1:] - theta[n]).abs().amax()
        assert (moved > 0) if n in ("2.weight", "2.bias") else (moved == 0), n
    curves = fairness_curves(alg, test, 2)
    assert curves["accuracy"].shape == (3, 3)


def test_auto_does_not_try_vmap_where_every_task_graph_at_once_would_not_fit(gen, monkeypatch):
    """The loop's first run measures one task's graph; a vmap trial predicted to need more than half the
    memory available is never run, and the choice is the loop (reported by exec_path / path_report)."""
    from metagrad import paths

    alg = MAML(Conv4(ways=3, in_channels=1, hidden=4).double(), inner_lr=0.1, inner_steps=1, loss_fn=CE)
    batch = conv_batch(gen)
    alg.meta_gradient(batch)  # loop first (round robin), measuring one task's graph
    key = next(iter(alg.timer.task_bytes))
    one_task = alg.timer.task_bytes[key]
    assert one_task > 0
    monkeypatch.setattr(paths, "available_memory", lambda: one_task * len(batch))  # half of it: too little
    for _ in range(2 * (paths.TIMED_RUNS + 1)):
        alg.meta_gradient(batch)
        assert alg.exec_path() == "loop"
    assert alg.path_report()["chosen"] == {key: "loop"}


def test_meta_gradient_reads_the_schedules_at_the_iteration_given(gen):
    """MAML++'s multi-step loss and order annealing follow the `iteration` argument, not hidden state."""
    def alg(**kw) -> MAML:
        torch.manual_seed(0)
        return MAML(MLP((1, 8, 1)).double(), inner_lr=0.05, inner_steps=3, **kw)

    batch = Sinusoid(shots=5, query_shots=5, dtype=torch.float64).sample(4, gen)
    plus = alg(multi_step_loss_iters=10, order_anneal_iters=5)
    early, late = flat(plus.meta_gradient(batch, iteration=0)), flat(plus.meta_gradient(batch, iteration=20))
    assert int(plus.iteration) == 0 and rel_err(early, late) > 1e-3
    assert rel_err(late, flat(alg(order=2).meta_gradient(batch))) < 1e-12  # both schedules over: plain MAML
    plus.iteration.fill_(20)
    assert torch.equal(flat(plus.meta_gradient(batch)), late)  # the default is the algorithm's own count


def test_a_deep_copy_trains_its_own_learned_inner_rates(gen):
    """The inner optimizer reads its rates through closures: a copied algorithm must read its own."""
    import copy

    from metagrad.algorithms import MetaSGD

    torch.manual_seed(0)
    alg = MetaSGD(MLP((1, 8, 1)).double(), inner_lr=0.05)
    twin = copy.deepcopy(alg)
    batch = Sinusoid(shots=5, query_shots=5, dtype=torch.float64).sample(3, gen)
    g, h = alg.meta_gradient(batch), twin.meta_gradient(batch)
    rates = [n for n in g if n.startswith("inner_meta_params.")]
    assert rates and all(float(h[n].abs().sum()) > 0 for n in rates)
    assert rel_err(flat(h), flat(g)) < 1e-14
    with torch.no_grad():
        for p in twin.inner_meta_params.values():
            p.mul_(2.0)  # the twin's rates change, the original's do not
    assert rel_err(flat(alg.meta_gradient(batch)), flat(g)) < 1e-14
    assert rel_err(flat(twin.meta_gradient(batch)), flat(g)) > 1e-3


def test_auto_times_an_algorithm_whose_objective_uses_torch_func_transforms(gen):
    """iMAML differentiates with torch.func.grad/vjp, which refuse saved-tensor hooks: the graph size is
    then unknown, and auto times loop and vmap as before instead of failing."""
    from metagrad import paths
    from metagrad.algorithms import IMAML

    torch.manual_seed(0)
    alg = IMAML(Conv4(ways=3, in_channels=1, hidden=4).double(), inner_lr=0.1, inner_steps=1, cg_steps=1,
                loss_fn=CE)
    batch = conv_batch(gen)
    ref = flat(alg.meta_gradient(batch))
    for _ in range(2 * (paths.TIMED_RUNS + 1)):
        assert rel_err(flat(alg.meta_gradient(batch)), ref) < 1e-12
    assert list(alg.tuned_paths.values())[0] in ("loop", "vmap")


def test_a_deep_copy_runs_its_own_module_buffers(gen):
    """`functional` is a class, not a closure: a copied algorithm's f reads the copy's buffers."""
    import copy

    from metagrad.algorithms import MAML

    class Shifted(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(1, 1)
            self.register_buffer("shift", torch.zeros(1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x) + self.shift

    torch.manual_seed(0)
    alg = MAML(Shifted().double(), inner_lr=0.05)
    twin = copy.deepcopy(alg)
    assert twin.f.module is twin.model and alg.f.module is alg.model
    twin.model.shift.fill_(3.0)
    x = torch.ones(4, 1, dtype=torch.float64)
    params = dict(alg.model.named_parameters())
    assert torch.allclose(twin.f(params, x) - alg.f(params, x), torch.full((4, 1), 3.0, dtype=torch.float64))
