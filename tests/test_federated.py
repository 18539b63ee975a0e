"""Federated meta-learning (metagrad.federated): the pure client update, aggregation and server step."""

from __future__ import annotations

import copy
import logging
import math
import subprocess
import sys

import pytest
import torch

from metagrad import federated as fed
from metagrad.algorithms import MAML, MetaSGD, Reptile
from metagrad.core import TaskBatch
from metagrad.models import MLP
from metagrad.runs import read_checkpoint, save_checkpoint
from metagrad.tasks import Sinusoid


def model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return MLP((1, 8, 8, 1)).double()


def tasks(n: int = 4, shots: int = 5, query_shots: int = 6, seed: int = 1) -> TaskBatch:
    return Sinusoid(shots=shots, query_shots=query_shots, dtype=torch.float64).sample(
        n, torch.Generator().manual_seed(seed))


def clients_of(batch: TaskBatch) -> dict[str, TaskBatch]:
    return {f"c{i}": batch[i] for i in range(len(batch))}


def close(a: dict, b: dict, rel: float = 1e-10) -> None:
    assert list(a) == list(b)
    for n in a:
        scale = max(float(b[n].abs().max()), 1e-12)
        assert float((a[n] - b[n]).abs().max()) <= rel * scale, (n, float((a[n] - b[n]).abs().max()), scale)


def federated_round(alg, strategy, batch, optimizer="sgd", lr=0.1, **kw):
    server = fed.Server({n: p.detach() for n, p in alg.meta_parameters().items()}, optimizer, lr, **kw)
    report = fed.run_round(server, strategy, alg, clients_of(batch))
    return server, report


def centralised_step(alg, batch, optimizer="sgd", lr=0.1, fresh=False, **kw):
    alg = alg if fresh else copy.deepcopy(alg)
    cls = torch.optim.SGD if optimizer == "sgd" else torch.optim.Adam
    opt = cls(alg.meta_parameters().values(), lr=lr, **kw)
    alg.train_step(batch, opt, iteration=0)
    return {n: p.detach() for n, p in alg.meta_parameters().items()}


def test_import_metagrad_does_not_import_flower():
    code = "import metagrad, metagrad.federated, sys; print('flwr' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("order", [2, 1])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_fedmaml_round_equals_centralised_maml_step(order, optimizer):
    alg = MAML(model(), inner_lr=0.05, inner_steps=2, order=order, path="loop")
    batch = tasks()
    server, report = federated_round(alg, fed.fedmaml(order), batch, optimizer)
    assert report["stepped"] and report["accepted"] == ["c0", "c1", "c2", "c3"]
    expected = centralised_step(alg, batch, optimizer)
    close(server.weights(), expected)
    start = {n: p.detach() for n, p in alg.meta_parameters().items()}
    assert any(float((expected[n] - start[n]).abs().max()) > 1e-4 for n in start)  # the step moved the model


def test_first_order_fedmaml_differs_from_second_order():
    batch = tasks()
    w1, _ = federated_round(MAML(model(), 0.05, 2, order=2, path="loop"), fed.fedmaml(1), batch)
    w2, _ = federated_round(MAML(model(), 0.05, 2, order=2, path="loop"), fed.fedmaml(2), batch)
    diff = max(float((w1.weights()[n] - w2.weights()[n]).abs().max()) for n in w1.params)
    assert diff > 1e-6
    # first-order FedMAML on an order-2 algorithm equals centralised first-order MAML
    close(w1.weights(), centralised_step(MAML(model(), 0.05, 2, order=1, path="loop"), batch))


def test_clients_of_different_sizes_are_weighted_by_size():
    alg = MAML(model(), inner_lr=0.05, inner_steps=1, path="loop")
    small, large = tasks(1, 3, 4, seed=2), tasks(1, 10, 12, seed=3)
    theta = {n: p.detach().clone() for n, p in alg.meta_parameters().items()}
    u_small = fed.client_update(fed.fedmaml(), alg, theta, small)
    u_large = fed.client_update(fed.fedmaml(), alg, theta, large)
    assert (u_small.size, u_large.size) == (7, 22)
    mean, accepted, rejected = fed.aggregate([u_small, u_large], theta)
    assert len(accepted) == 2 and not rejected
    by_hand = {n: (7 * alg.meta_gradient(small, 0)[n] + 22 * alg.meta_gradient(large, 0)[n]) / 29 for n in theta}
    close(mean, by_hand)
    server = fed.Server(theta, "sgd", lr=0.5)
    server.round([u_small, u_large])
    close(server.weights(), {n: theta[n] - 0.5 * by_hand[n] for n in theta})
    # the client's algorithm is left as it was
    close({n: p.detach() for n, p in alg.meta_parameters().items()}, theta, rel=0)


def test_fedreptile_equals_reptile_outer_step():
    alg = Reptile(model(), inner_lr=0.02, inner_steps=3, path="loop")
    batch = tasks()
    server, _ = federated_round(alg, fed.fedreptile(), batch, "sgd", lr=0.5)
    close(server.weights(), centralised_step(alg, batch, "sgd", lr=0.5))
    with pytest.raises(TypeError, match="Reptile"):
        fed.client_update(fed.fedreptile(), MAML(model(), path="loop"), server.weights(), batch[0])


def test_fedavg_is_the_size_weighted_mean_of_local_models():
    alg = MAML(model(), inner_lr=0.03, inner_steps=1, path="loop")
    a, b = tasks(1, 4, 4, seed=4), tasks(1, 8, 9, seed=5)
    theta = {n: p.detach().clone() for n, p in alg.meta_parameters().items()}
    server = fed.Server(theta, "sgd", lr=1.0)
    server.round([fed.client_update(fed.fedavg(local_steps=3), alg, theta, d) for d in (a, b)])

    def local(d):  # three plain SGD steps on all of the client's data
        w = {n.removeprefix("model."): p.clone().requires_grad_(True) for n, p in theta.items()}
        x, y = torch.cat([d.support_x[0], d.query_x[0]]), torch.cat([d.support_y[0], d.query_y[0]])
        for _ in range(3):
            loss = torch.nn.functional.mse_loss(torch.func.functional_call(alg.model, w, (x,)), y)
            g = torch.autograd.grad(loss, list(w.values()))
            w = {n: (p - 0.03 * gi).detach().requires_grad_(True) for (n, p), gi in zip(w.items(), g)}
        return w

    wa, wb = local(a), local(b)
    close(server.weights(), {n: (8 * wa[n[6:]] + 17 * wb[n[6:]]).detach() / 25 for n in theta})
    assert max(float((server.weights()[n] - theta[n]).abs().max()) for n in theta) > 1e-4


def test_fedavg_finetune_evaluates_after_local_steps():
    alg = MAML(model(), inner_lr=0.05, path="loop")
    d = tasks(1, 10, 10, seed=6)
    theta = {n: p.detach().clone() for n, p in alg.meta_parameters().items()}
    before = fed.client_evaluate(fed.fedavg(), alg, theta, d)["loss"]
    after = fed.client_evaluate(fed.fedavg_finetune(eval_steps=5), alg, theta, d)["loss"]
    assert after < before


def _fd_hvp(loss_of, w, v, eps=1e-5):
    plus = torch.func.grad(loss_of)({n: w[n] + eps * v[n] for n in w})
    minus = torch.func.grad(loss_of)({n: w[n] - eps * v[n] for n in w})
    return {n: (plus[n] - minus[n]) / (2 * eps) for n in w}


def test_perfedavg_hessian_vector_product_matches_finite_differences():
    alg = MAML(model(), path="loop")
    d = tasks(1, 7, 7, seed=7)
    w = {n: p.detach().clone() for n, p in alg.params().items()}
    g = torch.Generator().manual_seed(0)
    v = {n: torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in w.items()}
    ad = alg.adapter(order=0)

    def loss_of(p):
        return ad.loss(p, (d.support_x[0], d.support_y[0]))

    exact = fed.hessian_vector_product(loss_of, w, v)
    close(exact, _fd_hvp(loss_of, w, v), rel=1e-6)


def test_perfedavg_hf_one_step_is_beta_times_maml_meta_gradient():
    # With D'' = D (the support split) and one local step, Per-FedAvg (HF)'s step is exactly beta times
    # MAML's second-order meta-gradient of the client's task; the first-order variant is FO-MAML's.
    alg = MAML(model(), inner_lr=0.05, inner_steps=1, order=2, path="loop")
    d = tasks(1, 6, 8, seed=8)
    theta = {n: p.detach().clone() for n, p in alg.meta_parameters().items()}
    hf = fed.client_update(fed.perfedavg(order=2, beta=0.1), alg, theta, d)
    close(hf.update, dict(alg.meta_gradient(d, 0)), rel=1e-9)
    fo = fed.client_update(fed.perfedavg(order=1, beta=0.1), alg, theta, d)
    alg.order = 1
    close(fo.update, dict(alg.meta_gradient(d, 0)), rel=1e-9)
    assert max(float((hf.update[n] - fo.update[n]).abs().max()) for n in theta) > 1e-8


def test_perfedavg_several_local_steps_move_further():
    alg = MAML(model(), inner_lr=0.05, path="loop")
    d = tasks(1, 6, 8, seed=9)
    theta = {n: p.detach().clone() for n, p in alg.meta_parameters().items()}
    one = fed.client_update(fed.perfedavg(order=2, beta=0.05, local_steps=1), alg, theta, d).update
    three = fed.client_update(fed.perfedavg(order=2, beta=0.05, local_steps=3), alg, theta, d).update
    assert all(torch.isfinite(t).all() for t in three.values())
    assert max(float((one[n] - three[n]).abs().max()) for n in theta) > 1e-8


def test_metasgd_rates_move_and_are_aggregated():
    alg = MetaSGD(model(), inner_lr=0.05, path="loop")
    batch = tasks()
    names = list(alg.meta_parameters())
    rate_names = [n for n in names if n.startswith("inner_meta_params")]
    assert rate_names, names
    server, report = federated_round(alg, fed.metasgd(), batch, "sgd", lr=0.1)
    theta = {n: p.detach() for n, p in alg.meta_parameters().items()}
    grads = [alg.meta_gradient(batch[i], 0) for i in range(len(batch))]
    for n in rate_names:
        assert float((server.weights()[n] - theta[n]).abs().max()) > 1e-6  # the learned rates moved
        close({n: server.weights()[n]}, {n: theta[n] - 0.1 * sum(g[n] for g in grads) / len(grads)})
    # A fresh twin, not a deepcopy: a deepcopied MetaSGD's inner optimizer still reads the original's rates.
    twin = MetaSGD(model(), inner_lr=0.05, path="loop")
    close(server.weights(), centralised_step(twin, batch, "sgd", lr=0.1, fresh=True))


@pytest.mark.parametrize("bad", ["nan", "shape", "dtype", "names", "size"])
def test_bad_update_is_rejected_logged_and_round_goes_on(bad, caplog):
    alg = MAML(model(), inner_lr=0.05, path="loop")
    batch = tasks(3)
    theta = {n: p.detach().clone() for n, p in alg.meta_parameters().items()}
    good = [fed.client_update(fed.fedmaml(), alg, theta, batch[i], client=f"c{i}") for i in range(2)]
    broken = fed.client_update(fed.fedmaml(), alg, theta, batch[2], client="bad")
    names = list(theta)
    first = names[0]
    if bad == "nan":
        broken.update[first][..., 0] = float("nan")
    elif bad == "shape":
        broken.update[first] = broken.update[first][:1]
    elif bad == "dtype":
        broken.update[first] = broken.update[first].float()
    elif bad == "names":
        broken.update = {n: broken.update[n] for n in reversed(names)}
    else:
        broken.size = 0
    server = fed.Server(theta, "adam", lr=0.01)
    with caplog.at_level(logging.WARNING, logger="metagrad.federated"):
        report = server.round([good[0], broken, good[1]])
    assert report["accepted"] == ["c0", "c1"] and [r[0] for r in report["rejected"]] == ["bad"]
    assert any("bad" in r.getMessage() for r in caplog.records)
    reference = fed.Server(theta, "adam", lr=0.01)
    reference.round(good)
    close(server.weights(), reference.weights(), rel=0)


def test_round_with_no_acceptable_update_leaves_model_and_optimizer_unchanged():
    alg = MAML(model(), inner_lr=0.05, path="loop")
    theta = {n: p.detach().clone() for n, p in alg.meta_parameters().items()}
    server = fed.Server(theta, "adam", lr=0.01)
    server.round([fed.client_update(fed.fedmaml(), alg, theta, tasks(1, seed=11))])
    before, state = server.weights(), copy.deepcopy(server.optimizer.state_dict())
    bad = fed.client_update(fed.fedmaml(), alg, before, tasks(1, seed=12))
    for t in bad.update.values():
        t.fill_(float("inf"))
    report = server.round([bad])
    assert not report["stepped"]
    close(server.weights(), before, rel=0)
    for k, s in server.optimizer.state_dict()["state"].items():
        assert all(torch.equal(s[key], state["state"][k][key]) for key in s)


def test_checkpoint_every_round_and_resume_equals_uninterrupted(tmp_path):
    batch = tasks(3)
    clients = clients_of(batch)

    def new():
        alg = MAML(model(), inner_lr=0.05, path="loop")
        return alg, fed.Server({n: p.detach() for n, p in alg.meta_parameters().items()}, "adam", lr=0.01)

    alg, straight = new()
    for _ in range(4):
        fed.run_round(straight, fed.fedmaml(), alg, clients)

    alg, first = new()
    path = tmp_path / "server.safetensors"
    for _ in range(2):
        fed.run_round(first, fed.fedmaml(), alg, clients)
        save_checkpoint(path, first.state())
    del first
    alg, resumed = new()
    resumed.load_state(read_checkpoint(path))
    assert resumed.rounds == 2
    for _ in range(2):
        fed.run_round(resumed, fed.fedmaml(), alg, clients)
        save_checkpoint(path, resumed.state())
    close(resumed.weights(), straight.weights(), rel=0)
    assert resumed.rounds == straight.rounds == 4


def test_client_state_is_kept_across_rounds():
    alg = MAML(model(), inner_lr=0.05, path="loop")
    batch = tasks(2)
    server = fed.Server({n: p.detach() for n, p in alg.meta_parameters().items()}, "sgd", lr=0.1)
    states: dict = {}
    for _ in range(3):
        fed.run_round(server, fed.fedmaml(), alg, clients_of(batch), states)
    assert {k: v["rounds"] for k, v in states.items()} == {"c0": 3, "c1": 3}
    assert states["c0"]["last_round"] == 2 and "meta_loss" in states["c0"]["last_metrics"]


def test_strategy_arguments_are_checked():
    with pytest.raises(ValueError, match="kind"):
        fed.Strategy("x", "fedprox")
    with pytest.raises(ValueError, match="local_steps"):
        fed.fedavg(local_steps=0)
    with pytest.raises(ValueError, match="one task|exactly 1"):
        alg = MAML(model(), path="loop")
        fed.client_update(fed.fedmaml(), alg, {n: p.detach() for n, p in alg.meta_parameters().items()}, tasks(2))


# -- client data that needs no download ----------------------------------------------------------------
from metagrad.federated import data as fdata  # noqa: E402


def test_sinusoid_clients_are_one_task_each_of_their_own_sizes():
    clients = fdata.sinusoid_clients(3, shots=[2, 5, 9], query_shots=4, generator=torch.Generator().manual_seed(0))
    assert list(clients) == ["client-0", "client-1", "client-2"]
    assert [len(c) for c in clients.values()] == [1, 1, 1]
    assert [fed.client_size(c) for c in clients.values()] == [6, 9, 13]
    with pytest.raises(ValueError, match="one value per client"):
        fdata.sinusoid_clients(3, shots=[2, 5])


def test_synthetic_within_device_statistics():
    # One large device: x ~ N(v, Sigma) with Sigma_jj = j^-1.2; y = argmax softmax(W x + b).
    d = fdata.synthetic_devices(1.0, 1.0, n_clients=1, sizes=[40000], generator=torch.Generator().manual_seed(0))[0]
    assert d.x.shape == (40000, 60) and d.W.shape == (10, 60) and d.b.shape == (10,) and d.y.shape == (40000,)
    var = d.x.var(0)
    sigma = fdata.synthetic_covariance()
    assert float(((var - sigma) / sigma).abs().max()) < 0.05  # the estimator's relative sd is sqrt(2/n) = 0.7%
    assert float(((d.x.mean(0) - d.v) / sigma.sqrt()).abs().max()) < 5 / 40000 ** 0.5
    assert torch.equal(d.y, torch.argmax(d.x @ d.W.T + d.b, dim=-1))
    # W, b ~ N(u, 1) and v ~ N(B, 1): 610 and 60 draws
    wb = torch.cat([d.W.flatten(), d.b])
    assert abs(float(wb.mean()) - d.u) < 4 / 610 ** 0.5 and abs(float(wb.var()) - 1) < 0.2
    assert abs(float(d.v.mean()) - d.B) < 4 / 60 ** 0.5


def test_synthetic_across_device_statistics_and_sizes():
    g = torch.Generator().manual_seed(1)
    devs = fdata.synthetic_devices(0.5, 2.0, n_clients=1000, sizes=[1] * 1000, generator=g)
    u = torch.tensor([d.u for d in devs])
    B = torch.tensor([d.B for d in devs])
    # u ~ N(0, alpha), B ~ N(0, beta) with alpha, beta standard deviations (sd of the estimates: 2.2%, 3.2%)
    assert abs(float(u.std()) - 0.5) < 0.05 and abs(float(B.std()) - 2.0) < 0.2
    assert abs(float(u.mean())) < 0.1 and abs(float(B.mean())) < 0.4
    zero = fdata.synthetic_devices(0.0, 0.0, n_clients=5, sizes=[3] * 5, generator=g)
    assert all(d.u == 0 and d.B == 0 for d in zero)
    iid = fdata.synthetic_devices(1.0, 1.0, n_clients=4, sizes=[3] * 4, generator=g, iid=True)
    assert all(torch.equal(d.W, iid[0].W) and torch.equal(d.v, torch.zeros(60, dtype=torch.float64)) for d in iid)
    sizes = fdata.synthetic_sizes(2000, torch.Generator().manual_seed(2))
    assert min(sizes) >= 50
    extra = torch.tensor(sizes, dtype=torch.float64) - 50  # floor(lognormal(4, 2)): median e^4, P(> e^6) = 15.9%
    assert abs(float(extra.median().log()) - 4) < 0.25
    assert abs(float((extra > math.exp(6)).double().mean()) - 0.159) < 0.03
    clients = fdata.synthetic_clients(1.0, 1.0, n_clients=3, generator=torch.Generator().manual_seed(3))
    assert all(len(c) == 1 and c.support_x.shape[-1] == 60 for c in clients.values())


def test_gamma_sampler_matches_its_moments():
    g = torch.Generator().manual_seed(4)
    for a in (0.3, 2.5):
        x = torch.cat([fdata._gamma(torch.full((4000,), a, dtype=torch.float64), g)])
        assert abs(float(x.mean()) - a) < 5 * (a / 4000) ** 0.5
        assert abs(float(x.var()) / a - 1) < 0.15


def test_dirichlet_split_is_a_partition_and_skewed_by_concentration():
    labels = torch.arange(2000) % 10

    def skew(conc: float) -> float:
        parts = fdata.dirichlet_split(labels, 8, conc, torch.Generator().manual_seed(5))
        allidx = torch.sort(torch.cat(parts)).values
        assert torch.equal(allidx, torch.arange(2000)) and min(len(p) for p in parts) >= 2
        tv = [0.5 * float((torch.bincount(labels[p], minlength=10) / len(p) - 0.1).abs().sum()) for p in parts]
        return sum(tv) / len(tv)

    assert skew(0.1) > 0.5 and skew(1000.0) < 0.1
    a = fdata.dirichlet_split(labels, 4, 0.5, torch.Generator().manual_seed(6))
    b = fdata.dirichlet_split(labels, 4, 0.5, torch.Generator().manual_seed(6))
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_digits_clients_non_iid():
    pytest.importorskip("sklearn")
    clients = fdata.digits_clients(5, concentration=0.3, generator=torch.Generator().manual_seed(7))
    assert sum(fed.client_size(c) for c in clients.values()) == 1797
    assert all(c.support_x.shape[-1] == 64 and float(c.support_x.max()) <= 1 for c in clients.values())


def mean_loss(strategy, alg, server, clients) -> float:
    w = server.weights()
    return sum(fed.client_evaluate(strategy, alg, w, c)["loss"] for c in clients.values()) / len(clients)


def test_fedavg_and_fedmaml_learn_on_synthetic_clients():
    clients = fdata.synthetic_clients(0.0, 0.0, n_clients=6, sizes=[40] * 6, dtype=torch.float64,
                                      generator=torch.Generator().manual_seed(8))
    for strategy in (fed.fedavg(local_steps=2), fed.fedmaml(order=1)):
        torch.manual_seed(0)
        alg = MAML(torch.nn.Linear(60, 10).double(), inner_lr=0.1, loss_fn=torch.nn.functional.cross_entropy,
                   path="loop")
        server = fed.Server({n: p.detach() for n, p in alg.meta_parameters().items()}, "sgd", lr=0.5)

        start = mean_loss(strategy, alg, server, clients)
        for _ in range(10):
            fed.run_round(server, strategy, alg, clients)
        assert mean_loss(strategy, alg, server, clients) < 0.9 * start, strategy.name


# -- Flower wiring (in process: the apps' functions on hand-made messages) -------------------------------
def _flower_message(content):
    flwr_app = pytest.importorskip("flwr.app")
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    return flwr_app.Message(content=flwr_app.RecordDict(content), dst_node_id=7, message_type="train")


def test_flower_client_replies_and_meta_strategy_equal_the_pure_round():
    pytest.importorskip("flwr")
    from flwr.app import ConfigRecord, Context, RecordDict

    from metagrad.federated import flower as F

    cfg = {"strategy": "fedmaml", "num-clients": 3, "server-optimizer": "adam", "server-lr": 0.01}
    alg, strategy = F.build(cfg)
    theta = {n: p.detach().clone() for n, p in alg.meta_parameters().items()}
    replies, expected = [], []
    states = [RecordDict() for _ in range(3)]
    for _ in range(2):  # twice: the client's state counts its rounds
        replies = []
        for k in range(3):
            msg = _flower_message({"arrays": F.to_record(theta), "config": ConfigRecord({"server-round": 1})})
            ctx = Context(run_id=1, node_id=k, node_config={"partition-id": k}, state=states[k], run_config=cfg)
            replies.append(F.train(msg, ctx))
    assert [int(s["metagrad"]["rounds"]) for s in states] == [2, 2, 2]
    bad = replies[-1]
    arrays = F.from_record(bad.content["arrays"])
    first = next(iter(arrays))
    arrays[first][...] = float("nan")
    bad.content["arrays"] = F.to_record(arrays)  # the third client's update is corrupted on the way
    expected = [fed.client_update(strategy, alg, theta, F.client_data(cfg, k), 0) for k in range(2)]
    server = fed.Server(theta, "adam", 0.01)
    server.round(expected)
    meta = F.MetaStrategy(fed.Server(theta, "adam", 0.01), None, min_available_nodes=3)
    arrays, metrics = meta.aggregate_train(1, replies)
    assert int(metrics["accepted"]) == 2 and int(metrics["rejected"]) == 1
    close(F.from_record(arrays, theta), server.weights(), rel=0)


# -- Flower deployment engine on loopback: a SuperLink and SuperNodes as processes ------------------------------
def _deployment(tmp_path, cfg, num_clients):
    pytest.importorskip("flwr")
    from pathlib import Path

    from metagrad.federated import deploy
    from metagrad.federated import flower as F

    if not (Path(sys.executable).parent / "flower-superlink").exists():
        pytest.skip("flower-superlink is not installed beside this Python")
    return deploy.Loopback(tmp_path / "procs", num_clients), F.write_app(tmp_path / "app", **cfg)


def _replay(cfg, rounds):
    """The server of an in-process run whose round r took the updates of the clients in rounds[r]."""
    return _in_process(cfg, [[int(k) for k in accepted] for accepted in rounds])


@pytest.mark.slow
def test_metagrad_federated_loopback_with_tls_runs_rounds_and_resumes(tmp_path, capsys):
    # `metagrad federated loopback --tls`: self-signed certificates, a SuperLink serving HTTPS, 2 SuperNodes and flwr
    # verifying it against the CA; a second call restarts everything and the ServerApp resumes from its checkpoint.
    import json

    from metagrad.cli import main

    _deployment(tmp_path, {}, 2)  # skips without Flower
    folder, out = tmp_path / "fed", tmp_path / "fed" / "out"
    cfg = {"strategy": "fedmaml", "num-clients": 2, "server-optimizer": "adam", "server-lr": 0.01}
    common = ["federated", "loopback", "--tls", "--num-clients", "2", "--folder", str(folder), "--verbose",
              "--set", "strategy=fedmaml", "--set", "server-lr=0.01", "--set", "round-timeout=120.0"]
    assert main([*common, "--set", "num-server-rounds=2"]) == 0
    first = capsys.readouterr().out
    assert "(TLS)" in first and "aggregate_train: Received 2 results and 0 failures" in first
    assert "round 2: accepted ['0', '1'], attempts 1" in first  # printed sorted
    after_two = read_checkpoint(out / "server.safetensors")
    assert main([*common, "--set", "num-server-rounds=3"]) == 0
    assert "round 3: accepted ['0', '1'], attempts 1" in capsys.readouterr().out
    assert [json.loads(x)["round"] for x in (out / "rounds.jsonl").read_text().splitlines()] == [1, 2, 3]
    after_three = read_checkpoint(out / "server.safetensors")
    for rounds, saved in ((2, after_two), (3, after_three)):
        assert saved["rounds"] == rounds
        # float32 on the wire and the replies' order may differ: equal up to rounding
        close(saved["algorithm"], _replay(cfg, [["0", "1"]] * rounds).weights(), rel=1e-5)


def test_tls_certificates_verify_for_the_loopback_names(tmp_path):
    pytest.importorskip("cryptography")
    import ssl

    from metagrad.federated import deploy

    folder = deploy.write_certificates(tmp_path / "certs")
    context = ssl.create_default_context(cafile=str(folder / "ca.pem"))
    context.load_cert_chain(folder / "server.pem", folder / "server.key")  # the key matches the certificate
    from cryptography import x509

    cert = x509.load_pem_x509_certificate((folder / "server.pem").read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    ca = x509.load_pem_x509_certificate((folder / "ca.pem").read_bytes())
    cert.verify_directly_issued_by(ca)
    assert oct((folder / "ca.key").stat().st_mode & 0o777) == "0o600"


@pytest.mark.slow
def test_flower_deployment_a_supernode_killed_mid_round_does_not_stall_the_run(tmp_path):
    import json
    import time

    out = tmp_path / "out"
    timeout = 40.0  # an honest round here takes ~10-20 s (a clientapp process per message, loaded machine)
    cfg = {"strategy": "fedmaml", "num-clients": 3, "server-optimizer": "adam", "server-lr": 0.01,
           "num-server-rounds": 3, "out": str(out), "min-train-nodes": 2, "round-timeout": timeout}
    loopback, app = _deployment(tmp_path, cfg, 3)
    t0 = time.monotonic()
    with loopback as fed_:
        run = fed_.popen(app)
        log = out / "rounds.jsonl"
        while not (log.is_file() and log.read_text().count("\n") >= 1):  # round 1 done: round 2's messages go out
            assert run.poll() is None and time.monotonic() - t0 < 300, (fed_.folder / "run.log").read_text()[-3000:]
            time.sleep(0.1)
        fed_.kill_node(2)
        assert run.wait(timeout=3 * 2 * timeout + 120) == 0, (fed_.folder / "run.log").read_text()[-3000:]
    seconds = time.monotonic() - t0
    rounds = [json.loads(x) for x in log.read_text().splitlines()]
    # replies are aggregated in the order they arrive
    assert [r["round"] for r in rounds] == [1, 2, 3] and sorted(rounds[0]["accepted"]) == ["0", "1", "2"]
    assert all(sorted(r["accepted"]) == ["0", "1"] for r in rounds[1:]), rounds
    # round 2 was sent to the killed node too; by round 3 the SuperLink may have dropped it (missed heartbeats)
    assert rounds[1]["sampled"] == 3 and rounds[2]["sampled"] in (2, 3)
    assert seconds < 3 * 2 * timeout + 120, seconds  # not Flower's 3600 s default per round
    saved = read_checkpoint(out / "server.safetensors")
    assert saved["rounds"] == 3
    close(saved["algorithm"], _replay(cfg, [r["accepted"] for r in rounds]).weights(), rel=1e-5)


def test_readme_federated_example_runs():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = readme.split("## Federated meta-learning")[1].split("```python\n")[1].split("```")[0]
    assert "range(100)" in code
    namespace: dict = {}
    exec(compile(code.replace("range(100)", "range(3)"), "README.md", "exec"), namespace)
    assert namespace["server"].rounds == 3
    assert {k: v["rounds"] for k, v in namespace["states"].items()} == {f"client-{i}": 3 for i in range(10)}


def test_a_failing_client_is_left_out_and_the_round_goes_on(caplog):
    alg = MAML(model(), inner_lr=0.05, path="loop")
    batch = tasks(3)
    clients = clients_of(batch)
    # a client whose data the model cannot take (2 input features for a 1-input MLP): its update raises
    clients["broken"] = TaskBatch(torch.randn(1, 5, 2, dtype=torch.float64), torch.randn(1, 5, 1, dtype=torch.float64),
                                  torch.randn(1, 6, 2, dtype=torch.float64), torch.randn(1, 6, 1, dtype=torch.float64))
    theta = {n: p.detach().clone() for n, p in alg.meta_parameters().items()}
    server = fed.Server(theta, "sgd", lr=0.1)
    with caplog.at_level(logging.WARNING, logger="metagrad.federated"):
        report = fed.run_round(server, fed.fedmaml(), alg, clients)
    assert report["accepted"] == ["c0", "c1", "c2"] and report["stepped"]
    assert any("broken" in r.getMessage() and "left out" in r.getMessage() for r in caplog.records)
    close(server.weights(), centralised_step(alg, batch, "sgd", lr=0.1))


def test_server_arguments_and_foreign_checkpoints_are_refused():
    theta = {n: p.detach() for n, p in MAML(model(), path="loop").meta_parameters().items()}
    with pytest.raises(ValueError, match="'sgd' or 'adam'"):
        fed.Server(theta, "rmsprop")
    with pytest.raises(ValueError, match="lr"):
        fed.Server(theta, "sgd", lr=0.0)
    with pytest.raises(ValueError, match="another server"):
        fed.Server(theta, "adam").load_state(fed.Server(theta, "sgd").state())


def test_flower_pin_is_one_exact_version_the_one_the_apps_are_written_for():
    import re
    from pathlib import Path

    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    pins = re.findall(r'^federated = \["flwr==([0-9.]+)"\]$', pyproject, flags=re.M)
    assert len(pins) == 1
    source = (Path(__file__).resolve().parents[1] / "src/metagrad/federated/flower.py").read_text()
    assert f'FLWR_VERSION = "{pins[0]}"' in source


def test_a_step_that_would_overflow_is_rolled_back_with_the_optimizer_state():
    alg = MAML(model(), inner_lr=0.05, path="loop")
    theta = {n: p.detach().clone() for n, p in alg.meta_parameters().items()}
    server = fed.Server(theta, "sgd", lr=10.0, momentum=0.9)
    server.round([fed.client_update(fed.fedmaml(), alg, theta, tasks(1, seed=13))])  # momentum buffers exist now
    before, state = server.weights(), copy.deepcopy(server.optimizer.state_dict())
    huge = fed.client_update(fed.fedmaml(), alg, before, tasks(1, seed=14))
    for t in huge.update.values():
        t.fill_(1.7e308)  # finite, so accepted; lr 10 times it is not
    report = server.round([huge])
    assert report["accepted"] == [""] and not report["stepped"]
    close(server.weights(), before, rel=0)
    after = server.optimizer.state_dict()["state"]
    assert all(torch.equal(after[k]["momentum_buffer"], state["state"][k]["momentum_buffer"]) for k in after)


# -- drop-outs: MetaStrategy.start on a grid in this process whose nodes can stay silent -------------------------
class LoopGrid:
    """Flower's Grid as MetaStrategy.start uses it (`get_node_ids`, `send_and_receive`), its nodes the ClientApp's
    functions in this process; `silent(round, attempt, partition)` says which nodes never reply (a dropped node)."""

    def __init__(self, cfg, silent):
        from flwr.app import Context, RecordDict
        from flwr.supercore.task_identity import TaskIdentity

        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
        self.contexts = {100 + k: Context(run_id=1, node_id=100 + k, node_config={"partition-id": k},
                                          state=RecordDict(), run_config=cfg) for k in range(cfg["num-clients"])}
        self.silent, self.sent, self.attempts = silent, [], {}

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, *, timeout=None):
        from metagrad.federated import flower as F

        messages = list(messages)
        kind = messages[0].metadata.message_type if messages else ""
        rnd = int(messages[0].content["config"]["server-round"]) if messages else 0
        if kind == "train":
            self.attempts[rnd] = self.attempts.get(rnd, 0) + 1
        self.sent.append((kind, rnd, sorted(m.metadata.dst_node_id - 100 for m in messages), timeout))
        replies = []
        for m in messages:
            part = m.metadata.dst_node_id - 100
            if not self.silent(rnd, self.attempts.get(rnd, 0), part):
                replies.append((F.train if kind == "train" else F.evaluate)(m, self.contexts[m.metadata.dst_node_id]))
        return replies


def _meta_strategy(cfg, tmp_path):
    from metagrad.federated import flower as F

    alg, _ = F.build(cfg)
    server = fed.Server({n: p.detach() for n, p in alg.meta_parameters().items()}, "adam", cfg["server-lr"])
    return F.MetaStrategy(server, tmp_path / "server.safetensors", round_timeout=7.0, round_retries=cfg["retries"],
                          log_path=tmp_path / "rounds.jsonl", min_train_nodes=cfg["min-train-nodes"])


def _in_process(cfg, clients_per_round):
    from metagrad.federated import flower as F

    alg, strategy = F.build(cfg)
    server = fed.Server({n: p.detach() for n, p in alg.meta_parameters().items()}, "adam", cfg["server-lr"])
    for parts in clients_per_round:
        fed.run_round(server, strategy, alg, {str(k): F.client_data(cfg, k) for k in parts})
    return server


def test_a_silent_node_leaves_the_round_to_the_others_within_the_timeout(tmp_path):
    pytest.importorskip("flwr")
    import json

    cfg = {"num-clients": 3, "server-lr": 0.01, "min-train-nodes": 2, "retries": 0}
    meta = _meta_strategy(cfg, tmp_path)
    grid = LoopGrid(cfg, lambda rnd, attempt, part: rnd >= 2 and part == 2)  # node 2 dies in round 2
    reports = meta.start(grid, 3, wait_for=3)
    assert [r["accepted"] for r in reports] == [["0", "1", "2"], ["0", "1"], ["0", "1"]]
    assert [r["attempts"] for r in reports] == [1, 1, 1]
    assert all(t is not None and t <= 7.0 for *_, t in grid.sent)  # every wait is bounded by the round timeout
    # the new model is evaluated by the nodes that replied, not by the silent one
    assert [(k, r, p) for k, r, p, _ in grid.sent if k == "evaluate"] == [("evaluate", 1, [0, 1, 2]),
                                                                          ("evaluate", 2, [0, 1]),
                                                                          ("evaluate", 3, [0, 1])]
    expected = _in_process(cfg, [[0, 1, 2], [0, 1], [0, 1]])
    close(meta.server.weights(), expected.weights(), rel=1e-6)  # float32 on the wire
    saved = read_checkpoint(tmp_path / "server.safetensors")
    assert saved["rounds"] == 3
    lines = [json.loads(x) for x in (tmp_path / "rounds.jsonl").read_text().splitlines()]
    assert [x["round"] for x in lines] == [1, 2, 3] and lines[1]["accepted"] == ["0", "1"]
    assert all(x["sampled"] == 3 and "eval_loss" in x for x in lines)


def test_a_round_with_too_few_replies_is_retried_and_never_half_applied(tmp_path):
    pytest.importorskip("flwr")
    cfg = {"num-clients": 3, "server-lr": 0.01, "min-train-nodes": 3, "retries": 1}
    # node 1 misses the first attempt at round 2: the retry has everyone and the model is as if nothing happened
    meta = _meta_strategy(cfg, tmp_path)
    reports = meta.start(LoopGrid(cfg, lambda rnd, attempt, part: (rnd, attempt, part) == (2, 1, 1)), 3)
    assert [r["attempts"] for r in reports] == [1, 2, 1]
    close(meta.server.weights(), _in_process(cfg, [[0, 1, 2]] * 3).weights(), rel=1e-6)

    # node 1 gone for good: round 2 fails twice; the model and checkpoint stay at round 1
    meta = _meta_strategy(cfg, tmp_path / "gone")
    (tmp_path / "gone").mkdir()
    grid = LoopGrid(cfg, lambda rnd, attempt, part: rnd >= 2 and part == 1)
    with pytest.raises(RuntimeError, match="round 2 failed 2 times.*stay at round 1"):
        meta.start(grid, 3)
    assert grid.attempts == {1: 1, 2: 2} and meta.server.rounds == 1
    one = _in_process(cfg, [[0, 1, 2]])
    close(meta.server.weights(), one.weights(), rel=1e-6)
    saved = read_checkpoint(tmp_path / "gone" / "server.safetensors")
    assert saved["rounds"] == 1
    close(saved["algorithm"], one.weights(), rel=1e-6)


def test_metagrad_federated_app_writes_the_run_config_and_refuses_bad_input(tmp_path, capsys):
    pytest.importorskip("flwr")
    tomllib = pytest.importorskip("tomllib")
    from helpers import one_line_error

    from metagrad.cli import main

    assert main(["federated", "app", str(tmp_path / "app"), "--set", "strategy=fedreptile", "--set",
                 "num-server-rounds=4", "--set", "round-timeout=30.5", "--set", "out=runs/x"]) == 0
    project = tomllib.loads((tmp_path / "app" / "pyproject.toml").read_text())
    config = project["tool"]["flwr"]["app"]["config"]
    assert (config["strategy"], config["num-server-rounds"], config["round-timeout"], config["out"]) == (
        "fedreptile", 4, 30.5, "runs/x")
    assert project["tool"]["flwr"]["app"]["components"]["clientapp"] == "metagrad.federated.flower:client_app"
    assert project["project"]["dependencies"] == []  # nothing to install at run time
    capsys.readouterr()
    one_line_error(capsys, ["federated", "app", str(tmp_path / "b"), "--set", "nope=1"], "unknown run config key")
    one_line_error(capsys, ["federated", "app", str(tmp_path / "b"), "--set", "min-train-nodes=5"],
                   "min-train-nodes must be in 1..num-clients")
    one_line_error(capsys, ["federated", "superlink"], "--certificates DIR (TLS) or --insecure")
