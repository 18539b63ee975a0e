"""Applications 1-5: task families, their loader hooks, the models, and the claimed advantages of each experiment."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import finite_difference, rel_err
from torch import nn

from metagrad import core
from metagrad.algorithms import MAML
from metagrad.algorithms.baselines import Pretrain
from metagrad.evaluation import EvalResult, evaluate, mean_ci95
from metagrad.experiments import get
from metagrad.experiments.starts import curve_result, seeded, start, table, train, trajectories
from metagrad.models.gnn import GCN, graph_examples, normalised_adjacency
from metagrad.models.physical import JMAK, PayloadJoint, jmak_fraction, joint_step
from metagrad.runs import Run
from metagrad.tasks import get_family
from metagrad.tasks.graph_sbm import GraphSBM
from metagrad.tasks.jmak import JMAKKinetics
from metagrad.tasks.personalised_medicine import PersonalisedMedicine
from metagrad.tasks.records import split_records
from metagrad.tasks.suffix_rules import SuffixRules
from metagrad.tasks.system_id import SystemID

FAMILIES = [PersonalisedMedicine(), SystemID(), JMAKKinetics(), SuffixRules(), GraphSBM()]


pytestmark = pytest.mark.usefixtures("one_thread")


def run_experiment(name: str, tmp_path, **overrides) -> dict:
    e = get(name)
    return e.fn(e.make_config(overrides), Run(tmp_path / name, {}))


def row(results: dict, start_name: str, **match) -> dict:
    return next(r for r in results["table"] if r["start"] == start_name and all(r[k] == v for k, v in match.items()))


def mean_ci(cell: str) -> tuple[float, float]:
    m, c = cell.split(" ± ")
    return float(m), float(c)


# -- families: registry, shapes, ranges, determinism ---------------------------------------------------------------
@pytest.mark.parametrize("name, cls", [("personalised-medicine", PersonalisedMedicine), ("system-id", SystemID),
                                       ("jmak", JMAKKinetics), ("suffix-rules", SuffixRules),
                                       ("graph-sbm", GraphSBM)])
def test_families_are_registered(name, cls):
    assert get_family(name) is cls


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: type(f).__name__)
def test_same_seed_same_tasks_and_shapes(family):
    a = family.sample(7, torch.Generator().manual_seed(3))
    b = family.sample(7, torch.Generator().manual_seed(3))
    c = family.sample(7, torch.Generator().manual_seed(4))
    for x, y in zip(a.tensors(), b.tensors()):
        assert torch.equal(x, y)
        assert x.shape[0] == 7
    assert not torch.equal(a.support_x, c.support_x)
    per_class = getattr(family, "ways", 1)
    assert a.support_x.shape[1] == family.shots * per_class
    assert a.query_x.shape[1] == family.query_shots * per_class


def test_personalised_medicine_is_the_mixed_effects_model(gen):
    fam = PersonalisedMedicine(shots=3, query_shots=200, noise_sd=0.0)
    batch, (coef, intercept) = fam.sample_with_params(4000, gen)
    # Noise-free: y is exactly each patient's linear model.
    expected = batch.query_x @ coef[:, :, None] + intercept[:, None, None]
    assert torch.allclose(batch.query_y, expected, atol=1e-5)
    pop_coef, pop_intercept = fam.population()
    assert (coef.mean(0) - pop_coef).abs().max() < 0.02  # 4 sd / sqrt(4000) = 0.019
    assert abs(float(intercept.mean() - pop_intercept)) < 0.02
    assert abs(float((coef - pop_coef).std()) - fam.patient_sd) < 0.01


def test_system_id_records_follow_the_joint_equation(gen):
    fam = SystemID(noise_sd=0.0)
    batch, mass = fam.sample_with_params(300, gen)
    assert mass.min() >= fam.mass[0] and mass.max() <= fam.mass[1]
    x = batch.support_x
    assert x[..., 0].abs().max() <= math.pi and x[..., 1].abs().max() <= fam.max_velocity
    assert x[..., 2].abs().max() <= fam.max_torque
    q, w, tau = x.double().unbind(-1)
    m = mass.double()[:, None]
    by_hand = w + fam.dt * (tau - fam.friction * w - m * 9.81 * fam.length * torch.sin(q)) / (
        fam.inertia + m * fam.length ** 2)
    assert torch.allclose(batch.support_y[..., 0].double(), by_hand, atol=1e-5)


def test_jmak_measurements_and_parameter_ranges(gen):
    fam = JMAKKinetics(noise_sd=0.0)
    batch, (k, n) = fam.sample_with_params(500, gen)
    assert k.min() >= fam.rate[0] * (1 - 1e-6) and k.max() <= fam.rate[1] * (1 + 1e-6)
    assert n.min() >= fam.exponent[0] and n.max() <= fam.exponent[1]
    t = batch.query_x
    assert t.min() >= fam.t_min and t.max() <= fam.t_max
    assert batch.query_y.min() >= 0 and batch.query_y.max() <= 1
    assert torch.allclose(batch.query_y, 1 - torch.exp(-(k[:, None, None] * t) ** n[:, None, None]), atol=1e-6)


def test_suffix_rules_are_affine_maps_near_a_translation(gen):
    fam = SuffixRules(dim=8, noise_sd=0.0, shots=3, query_shots=5)
    batch, (a, c) = fam.sample_with_params(2000, gen)
    assert torch.allclose(batch.support_y, batch.support_x @ a.transpose(1, 2) + c[:, None], atol=1e-5)
    assert torch.allclose(c.mean(0), fam.shared_direction(), atol=0.1)  # sd 1 / sqrt(2000) = 0.022
    assert abs(float(fam.shared_direction().norm()) - fam.shared_norm) < 1e-5
    off = a - torch.eye(8)
    assert abs(float(off.std()) - fam.mixing / math.sqrt(8)) < 0.005


def test_graph_sbm_layout_labels_and_edge_densities(gen):
    fam = GraphSBM(ways=3, shots=2, query_shots=5, nodes_per_class=10, features=4, p_in=0.3, p_out=0.05)
    adjacency, feats, classes = fam.graphs(400, gen)
    assert torch.equal(adjacency, adjacency.transpose(1, 2)) and adjacency.diagonal(dim1=1, dim2=2).abs().max() == 0
    same = classes[:, None] == classes[None, :]
    off_diag = ~torch.eye(30, dtype=torch.bool)
    assert abs(float(adjacency[:, same & off_diag].mean()) - 0.3) < 0.01
    assert abs(float(adjacency[:, ~same].mean()) - 0.05) < 0.005

    batch = fam.sample(50, gen)
    n = fam.nodes
    for x, y in ((batch.support_x, batch.support_y), (batch.query_x, batch.query_y)):
        marker = x[..., -1]
        assert torch.equal(marker.sum(-1), torch.ones_like(marker.sum(-1)))
        node = marker.argmax(-1)
        assert torch.equal(y, node // fam.nodes_per_class)  # the label is the marked node's block
        # every example of a graph carries the same graph
        assert torch.equal(x[..., :-1], x[:, :1, :, :-1].expand_as(x[..., :-1]))
    nodes = torch.cat([batch.support_x[..., -1].argmax(-1), batch.query_x[..., -1].argmax(-1)], 1)
    assert all(len(set(r.tolist())) == nodes.shape[1] for r in nodes)  # support and query nodes are distinct
    assert torch.equal(torch.bincount(batch.support_y[0], minlength=3), torch.full((3,), 2))
    a_hat = batch.support_x[:, 0, :, :n]
    assert torch.allclose(a_hat, a_hat.transpose(1, 2))


# -- loader hooks ---------------------------------------------------------------------------------------------------
def test_split_records_splits_in_time_order_and_validates():
    x = np.arange(2 * 5 * 3, dtype=np.float64).reshape(2, 5, 3)
    y = np.arange(10.0).reshape(2, 5)
    b = split_records(x, y, 2, (3,))
    assert b.support_x.shape == (2, 2, 3) and b.query_x.shape == (2, 3, 3) and b.support_y.shape == (2, 2, 1)
    assert b.support_y[1, :, 0].tolist() == [5.0, 6.0] and b.query_y[1, :, 0].tolist() == [7.0, 8.0, 9.0]
    assert b.support_x.dtype == torch.float32
    with pytest.raises(ValueError, match="shots must be an integer in"):
        split_records(x, y, 5, (3,))
    with pytest.raises(ValueError, match="shots must be an integer in"):
        split_records(x, y, 0, (3,))
    with pytest.raises(ValueError, match=r"x must have shape \[tasks, records, 4\]"):
        split_records(x, y, 2, (4,))
    with pytest.raises(ValueError, match="disagree"):
        split_records(x, y[:, :4], 2, (3,))
    bad = y.copy()
    bad[0, 1] = np.nan
    with pytest.raises(ValueError, match="y holds NaN"):
        split_records(x, bad, 2, (3,))
    with pytest.raises(TypeError, match="x must be an array of numbers"):
        split_records("abc", y, 2, (3,))


def test_family_loader_hooks(gen):
    pm = PersonalisedMedicine.from_records(np.zeros((3, 6, 4)), np.zeros((3, 6)), shots=2)
    assert pm.support_x.shape == (3, 2, 4) and pm.query_y.shape == (3, 4, 1)
    with pytest.raises(ValueError, match="covariates"):
        PersonalisedMedicine.from_records(np.zeros((3, 6)), np.zeros((3, 6)), shots=2)
    with pytest.raises(ValueError, match=r"x must have shape \[tasks, records, 3\]"):
        SystemID.from_records(np.zeros((3, 6, 2)), np.zeros((3, 6)), shots=2)
    t = np.array([[1.0, 2.0, 4.0, 8.0]])
    jb = JMAKKinetics.from_records(t, 1 - np.exp(-(0.1 * t) ** 2), shots=3)
    assert jb.support_x[0, :, 0].tolist() == [1.0, 2.0, 4.0] and jb.query_x.shape == (1, 1, 1)
    with pytest.raises(ValueError, match="t must be positive"):
        JMAKKinetics.from_records(np.array([[0.0, 1.0, 2.0]]), np.zeros((1, 3)), shots=1)
    with pytest.raises(ValueError, match=r"fraction must have shape"):
        JMAKKinetics.from_records(t, np.zeros((1, 4, 2)), shots=1)
    sb = SuffixRules.from_records(np.ones((2, 3, 5)), np.ones((2, 3, 5)), shots=1)
    assert sb.support_y.shape == (2, 1, 5)
    with pytest.raises(ValueError, match=r"inflected must have shape"):
        SuffixRules.from_records(np.ones((2, 3, 5)), np.ones((2, 3, 4)), shots=1)


def test_graph_loader_rebuilds_the_sampled_layout_and_validates(gen):
    fam = GraphSBM(ways=2, shots=1, query_shots=2, nodes_per_class=4, features=3)
    adjacency, feats, classes = fam.graphs(2, gen)
    labels = classes.expand(2, -1)
    support = torch.tensor([[0, 4], [1, 5]])
    query = torch.tensor([[1, 2, 6, 7], [0, 3, 4, 7]])
    b = GraphSBM.from_graphs(adjacency.numpy(), feats.numpy(), labels.numpy(), support.numpy(), query.numpy())
    a_hat = normalised_adjacency(adjacency)
    assert torch.allclose(b.query_x, graph_examples(a_hat, feats, query))
    assert b.support_y.tolist() == [[0, 1], [0, 1]] and b.query_y.tolist() == [[0, 0, 1, 1], [0, 0, 1, 1]]
    asym = adjacency.clone()
    asym[0, 0, 1] = 1 - asym[0, 1, 0]
    with pytest.raises(ValueError, match="symmetric"):
        GraphSBM.from_graphs(asym, feats, labels, support, query)
    with pytest.raises(ValueError, match=r"query_nodes must index nodes 0..7"):
        GraphSBM.from_graphs(adjacency, feats, labels, support, query + 1)
    unlabelled = labels.clone()
    unlabelled[0, 0] = -1
    with pytest.raises(ValueError, match="support_nodes must have class labels"):
        GraphSBM.from_graphs(adjacency, feats, unlabelled, support, query)
    with pytest.raises(ValueError, match=r"features must have shape \[graphs=2, N=8, F\]"):
        GraphSBM.from_graphs(adjacency, feats[:, :5], labels, support, query)
    with pytest.raises(ValueError, match="must not exceed nodes_per_class"):
        GraphSBM(shots=5, query_shots=6, nodes_per_class=10)


# -- models against hand computations ------------------------------------------------------------------------------
def test_joint_step_and_jmak_by_hand():
    x = torch.tensor([[math.pi / 2, 1.0, 2.0]], dtype=torch.float64)
    # accel = (2 - 0.2 * 1 - 1 * 9.81 * 0.5 * 1) / (0.05 + 1 * 0.25) = -10.35; w' = 1 + 0.05 * accel
    assert abs(float(joint_step(x, torch.tensor(1.0, dtype=torch.float64), 0.05, 0.5, 0.2, 0.05)) - 0.4825) < 1e-12
    model = PayloadJoint(mass=1.0).double()
    assert abs(float(model(x).detach()) - 0.4825) < 1e-12
    t = torch.tensor([[10.0], [20.0]], dtype=torch.float64)
    jm = JMAK(k=0.1, n=2.0).double()
    assert torch.allclose(jm(t)[:, 0], torch.tensor([1 - math.exp(-1), 1 - math.exp(-4)], dtype=torch.float64))
    # The gradient in n stays finite at small times (written as exp(n log(kt))).
    tiny = torch.tensor([1e-30])
    n = torch.tensor(2.0, requires_grad=True)
    (g,) = torch.autograd.grad(jmak_fraction(tiny, torch.tensor(0.1), n).sum(), n)
    assert torch.isfinite(g)
    with pytest.raises(ValueError, match="mass must be positive"):
        PayloadJoint(mass=0.0)


def test_physical_models_maml_gradient_matches_finite_differences(gen):
    fam = SystemID(shots=4, query_shots=4, dtype=torch.float64)
    batch = fam.sample(3, gen)
    for model, b in ((PayloadJoint(mass=2.0, **fam.model_kwargs()).double(), batch),
                     (JMAK(0.1, 2.0).double(), JMAKKinetics(dtype=torch.float64).sample(3, gen))):
        alg = MAML(model, inner_lr=0.3, inner_steps=2, order=2)
        params = list(alg.parameters())
        analytic = torch.autograd.grad(alg.meta_loss(b), params)
        numeric = finite_difference(lambda a=alg, bb=b: a.meta_loss(bb), params)
        assert rel_err(torch.cat([a.flatten() for a in analytic]), torch.cat([n.flatten() for n in numeric])) < 1e-6


def test_normalised_adjacency_and_gcn_against_a_per_node_computation(gen):
    path = torch.tensor([[0.0, 1, 0], [1, 0, 1], [0, 1, 0]], dtype=torch.float64)
    a_hat = normalised_adjacency(path)
    r6 = 1 / math.sqrt(6)
    assert torch.allclose(a_hat, torch.tensor([[1 / 2, r6, 0], [r6, 1 / 3, r6], [0, r6, 1 / 2]], dtype=torch.float64))
    fam = GraphSBM(ways=2, shots=1, query_shots=2, nodes_per_class=4, features=3, dtype=torch.float64)
    batch = fam.sample(1, gen)
    model = seeded(lambda: GCN(features=3, hidden=5, ways=2), 0).double()
    x = batch.query_x[0]  # [4, 8, 8 + 3 + 1]
    out = model(x)
    a, feats = x[0, :, :8], x[0, :, 8:11]
    w1, b1, w2, b2 = model.conv1.weight, model.conv1.bias, model.conv2.weight, model.conv2.bias
    h = [torch.relu(sum(a[v, u] * (w1 @ feats[u] + b1) for u in range(8))) for v in range(8)]
    z = [sum(a[v, u] * (w2 @ h[u] + b2) for u in range(8)) for v in range(8)]
    for i, v in enumerate(x[:, :, -1].argmax(-1).tolist()):
        assert torch.allclose(out[i], z[v], atol=1e-12)
    with pytest.raises(ValueError, match="GCN expects examples"):
        model(x[..., :-2])


# -- the experiments' helpers against direct computations ----------------------------------------------------------
def test_curve_result_table_and_trajectories_by_hand(gen):
    values = torch.tensor([[1.0, 0.5], [3.0, 1.5]])
    r = curve_result("err", values)
    assert r.curve == [2.0, 1.0] and r.steps == 1 and r.n_tasks == 2
    assert abs(r.curve_ci95[0] - 1.96 * math.sqrt(2.0) / math.sqrt(2)) < 1e-12
    acc = EvalResult("accuracy", 0.5, 0.01, 10, 1, [0.25, 0.5], [0.02, 0.01])
    assert table({"x": acc}, [0, 1], {"x": {"shots": 1}}) == [{"start": "x", "k=0": "25 ± 2", "k=1": "50 ± 1",
                                                                 "shots": 1}]
    model = nn.Linear(2, 1).double()
    alg = start(model, 0.1)
    b = PersonalisedMedicine(population_coef=(1.0, 2.0), shots=3, dtype=torch.float64).sample(2, gen)
    traj = trajectories(alg, b, 2)
    assert traj["weight"].shape == (2, 3, 1, 2)
    w, c = model.weight.detach().clone(), model.bias.detach().clone()
    x, y = b.support_x[1], b.support_y[1]
    for k in range(3):
        assert torch.allclose(traj["weight"][1, k], w) and torch.allclose(traj["bias"][1, k], c)
        r_ = x @ w.T + c - y  # gradient of the mean squared error by hand
        w, c = w - 0.1 * 2 * (r_.T @ x) / len(x), c - 0.1 * 2 * r_.sum(0) / len(x)


def test_pooled_fit_is_the_least_squares_fit_of_all_examples():
    fam = PersonalisedMedicine(shots=2, query_shots=3)
    alg = Pretrain(seeded(lambda: nn.Linear(4, 1), 0), inner_lr=0.1)
    train(alg, fam, 300, 200, 0.01, seed=0)
    big = fam.sample(4000, torch.Generator().manual_seed(9))
    x = torch.cat([big.support_x, big.query_x], 1).reshape(-1, 4)
    y = torch.cat([big.support_y, big.query_y], 1).reshape(-1)
    design = torch.cat([x, torch.ones(len(x), 1)], 1).double()
    lstsq = torch.linalg.lstsq(design, y.double()[:, None]).solution[:, 0]
    theta = torch.cat([alg.model.weight.detach().flatten(), alg.model.bias.detach()]).double()
    assert float((theta - lstsq).norm()) < 0.05


# -- the claims, with fixed seeds and small settings ---------------------------------------------------------------
def test_personalised_medicine_maml_start_near_population_and_beats_zero(tmp_path):
    res = run_experiment("personalised-medicine", tmp_path, shots=(2,), iterations=200, test_tasks=500)
    maml, zero, pooled = (row(res, s, shots=2) for s in ("MAML (order 2)", "zero", "pooled fit"))
    assert maml["|start - population|"] < 0.1 and zero["|start - population|"] > 1.5
    for k in ("k=1", "k=2"):
        (m, mc), (z, zc) = mean_ci(maml[k]), mean_ci(zero[k])
        assert m + mc < z - zc and z / m > 3
        # No advantage over the pooled fit exists in the linear-Gaussian model: the CIs overlap.
        (p, pc) = mean_ci(pooled[k])
        assert abs(m - p) < mc + pc
    assert (tmp_path / "personalised-medicine" / "curves_shots2.png").exists()


def test_system_id_maml_beats_uninformed_guesses_most_when_far_off(tmp_path):
    res = run_experiment("system-id", tmp_path, iterations=150, test_tasks=500)
    mse = {r["start"]: mean_ci(r["k=3"]) for r in res["table"] if r["metric"] == "query MSE"}
    err = {r["start"]: mean_ci(r["k=3"]) for r in res["table"] if r["metric"] == "|m_hat - m| / m"}
    m, mc = mse["MAML (order 2)"]
    for guess in ("guess 1 kg", "guess 0.05 kg", "guess 50 kg"):
        g, gc = mse[guess]
        assert m + mc < g - gc
        assert err["MAML (order 2)"][0] + err["MAML (order 2)"][1] < err[guess][0] - err[guess][1]
    # Far-off guesses are many times worse than the nominal guess after the same steps.
    assert mse["guess 50 kg"][0] > 5 * mse["guess 1 kg"][0] and mse["guess 0.05 kg"][0] > 3 * mse["guess 1 kg"][0]
    assert 0.5 < res["start_mass_kg"]["MAML (order 2)"] < 5.0


def test_materials_kinetics_maml_beats_pooled_fit_and_guesses(tmp_path):
    res = run_experiment("materials-kinetics", tmp_path, iterations=200, test_tasks=500, examples=2)
    mse = {r["start"]: r for r in res["table"] if r["metric"] == "query MSE"}
    for k in ("k=1", "k=3"):
        m, mc = mean_ci(mse["MAML (order 2)"][k])
        for other in ("guess k=1/h, n=1", "guess k=0.095/h, n=2.5"):
            o, oc = mean_ci(mse[other][k])
            assert m + mc < o - oc, (k, other)
    # The pooled fit of the sigmoid law is flatter (smaller n) than the MAML start.
    assert mse["pooled fit"]["start n"] < mse["MAML (order 2)"]["start n"] - 0.2
    assert (tmp_path / "materials-kinetics" / "examples.png").exists()


def test_materials_kinetics_maml_beats_pooled_fit_paired():
    """On the same held-out systems, the per-task loss gap (pooled - MAML) after 1 and 3 steps is positive."""
    fam = JMAKKinetics()
    maml = MAML(JMAK(), inner_lr=3.0, inner_steps=3)
    train(maml, fam, 200, 25, 0.05, seed=0)
    pooled = Pretrain(JMAK(), inner_lr=3.0)
    train(pooled, fam, 200, 25, 0.05, seed=0)
    test = fam.sample(500, torch.Generator().manual_seed(1))
    gap = pooled.adaptation_curve(test, 3)[0] - maml.adaptation_curve(test, 3)[0]  # [tasks, 4]
    for k in (1, 3):
        mean, ci = mean_ci95(gap[:, k])
        assert mean - ci > 0, (k, mean, ci)
        assert mean > 0.1 * float(maml.adaptation_curve(test, 3)[0][:, k].mean())


def test_suffix_rules_learned_rates_help_and_the_vector_offset_is_best(tmp_path):
    res = run_experiment("suffix-rules", tmp_path, shots=(1,), iterations=300, test_tasks=500)
    k1 = {r["start"]: mean_ci(r["k=1"]) for r in res["table"]}
    assert k1["MAML (order 2)"][0] > 1.5 * k1["Meta-SGD (order 2)"][0]
    assert abs(k1["MAML (order 2)"][0] - k1["pooled fit"][0]) < k1["MAML (order 2)"][1] + k1["pooled fit"][1]
    assert k1["MAML (order 2)"][0] + k1["MAML (order 2)"][1] < k1["identity"][0] - k1["identity"][1]
    assert k1["vector offset"][0] + k1["vector offset"][1] < k1["Meta-SGD (order 2)"][0] - k1["Meta-SGD (order 2)"][1]
    # Meta-SGD's learned rate for the offset grows toward the vector-offset rate dim / 2, the matrix's shrinks.
    rates = res["metasgd_mean_rates"]["shots=1"]
    assert rates["bias"] > 2.0 and rates["weight"] < 0.5


def test_graph_experiment_pipeline_small(tmp_path):
    res = run_experiment("graph-few-shot", tmp_path, shots=(1,), iterations=3, test_tasks=8, eval_steps=2,
                         inner_steps=1)
    assert [r["start"] for r in res["table"]] == ["MAML (order 2)", "MAML (order 1)", "pre-trained (pooled)",
                                                  "random init"]
    assert len(res["curves"]["shots=1"]["random init"]["curve"]) == 3
    assert (tmp_path / "graph-few-shot" / "curves_shots1.png").exists()


@pytest.mark.slow
def test_graph_few_shot_maml_beats_random_init_after_three_steps():
    fam = GraphSBM(shots=1, query_shots=9, class_sd=0.6)
    alg = MAML(seeded(lambda: GCN(8, 32, 3), 0), inner_lr=0.5, inner_steps=3, loss_fn=F.cross_entropy)
    train(alg, fam, 250, 16, 0.005, seed=0)
    test = fam.sample(500, torch.Generator().manual_seed(1))
    maml = evaluate(alg, test, steps=3)
    rand = evaluate(start(seeded(lambda: GCN(8, 32, 3), 0), 0.5, F.cross_entropy), test, steps=3)
    assert maml.mean - maml.ci95 > rand.mean + rand.ci95
    assert maml.mean > 0.7 and abs(maml.curve[0] - 1 / 3) < 0.05


def test_train_is_deterministic_and_logs_under_its_label_without_a_checkpoint(tmp_path):
    results, params = [], []
    for i in range(2):
        alg = MAML(seeded(lambda: nn.Linear(4, 1), 0), inner_lr=0.05)
        run = Run(tmp_path / str(i))
        results.append(train(alg, PersonalisedMedicine(), 5, 4, 0.01, seed=0, run=run, label="a/maml"))
        params.append(core.named_params(alg.model))
    assert results[0].metrics == results[1].metrics and results[0].iteration == 5
    assert all(torch.equal(params[0][n], params[1][n]) for n in params[0])
    assert core.named_params(alg.model)["weight"].shape == (1, 4)
    lines = Run(tmp_path / "0", resume=True).metrics()
    assert [line["step"] for line in lines] == [5]
    assert lines[0]["a/maml/meta_loss"] == results[0].metrics["meta_loss"]
    assert not (tmp_path / "0" / "checkpoint.safetensors").exists()
