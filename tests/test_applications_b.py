"""Applications 6-9: materials property, inverse design, continual learning, fairness.

Families (shapes, the stated laws, loader hooks), the fairness metrics against hand-computed cases,
exact second-order meta-gradients of the new losses and models against finite differences (float64),
and each experiment's claimed advantage with fixed seeds at small settings (slow-marked).
"""

import math

import pytest
import torch
from helpers import finite_difference, rel_err

from metagrad import metrics
from metagrad.algorithms import MAML
from metagrad.experiments import get
from metagrad.experiments.continual_learning import SequentialMAML, accuracy_matrix
from metagrad.experiments.fairness import fair_loss
from metagrad.experiments.inverse_design import graph_bytes, nll
from metagrad.models import MLP
from metagrad.models.generator import CouplingFlow
from metagrad.paths import ExecPath
from metagrad.runs import Run
from metagrad.tasks import get_family
from metagrad.tasks.continual import ClassIncremental
from metagrad.tasks.fairness import Fairness
from metagrad.tasks.inverse_design import InverseDesign, from_scaled, hits, to_scaled, wavelength
from metagrad.tasks.materials_property import MaterialsProperty, band_gap

# -- fairness metrics against hand-computed cases ------------------------------------------------------
#        group 0 (first four)      group 1 (last four)
PRED = torch.tensor([1, 0, 1, 1, 1, 1, 0, 0])
Y = torch.tensor([1, 1, 0, 1, 0, 1, 0, 1])
GROUP = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])


def test_metrics_match_hand_computed_case():
    # group 0: TPR = 2/3 (positives 0, 1, 3; predicted 0 and 3), FPR = 1/1; group 1: TPR = 1/2, FPR = 1/2.
    r = metrics.group_rates(PRED, Y, GROUP)
    assert [float(r[k]) for k in ("tpr0", "fpr0", "tpr1", "fpr1")] == pytest.approx([2 / 3, 1.0, 0.5, 0.5])
    assert float(metrics.equalized_odds_gap(PRED, Y, GROUP)) == pytest.approx(0.5)  # max(1/6, 1/2)
    assert float(metrics.demographic_parity_difference(PRED, GROUP)) == pytest.approx(0.25)  # 3/4 - 2/4
    assert float(metrics.accuracy(PRED, Y)) == pytest.approx(0.5)  # right at 0, 3, 5, 6
    # The soft gap with hard decisions as probabilities is |dTPR| + |dFPR| = 1/6 + 1/2.
    assert float(metrics.soft_equalized_odds_gap(PRED.double(), Y.double(), GROUP.double())) == pytest.approx(2 / 3)


def test_metrics_batch_over_leading_dims():
    perfect = Y.clone()  # equal odds (TPR 1, FPR 0 in both groups) but base rates 3/4 and 2/4
    pred = torch.stack([PRED, perfect])
    y, g = Y.expand(2, -1), GROUP.expand(2, -1)
    assert metrics.equalized_odds_gap(pred, y, g).tolist() == pytest.approx([0.5, 0.0])
    assert metrics.demographic_parity_difference(pred, g).tolist() == pytest.approx([0.25, 0.25])
    assert metrics.accuracy(pred, y).tolist() == pytest.approx([0.5, 1.0])


def test_metrics_reject_bad_input_and_empty_cells():
    with pytest.raises(ValueError, match="0/1"):
        metrics.accuracy(torch.tensor([0, 2]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="same shape"):
        metrics.equalized_odds_gap(PRED, Y[:4], GROUP)
    no_pos_in_group1 = torch.tensor([1, 0, 0, 0])
    with pytest.raises(ValueError, match="true-positive rate of group 1"):
        metrics.equalized_odds_gap(torch.tensor([1, 0, 1, 0]), no_pos_in_group1, torch.tensor([0, 0, 1, 1]))
    # The training surrogate counts the undefined term as 0 instead: only |dFPR| = |0 - 1/2| remains.
    soft = metrics.soft_equalized_odds_gap(torch.tensor([1.0, 0.0, 1.0, 0.0]), no_pos_in_group1.double(),
                                           torch.tensor([0.0, 0.0, 1.0, 1.0]))
    assert float(soft) == pytest.approx(0.5)


# -- families: shapes, laws, loader hooks -----------------------------------------------------------------
def test_families_are_registered_and_sample_the_documented_shapes(gen):
    for name, cls, x_shape, y_shape in (
        ("materials-property", MaterialsProperty, (4, 5, 3), (4, 5, 1)),
        ("inverse-design", InverseDesign, (4, 5, 2), (4, 5, 1)),
        ("continual", ClassIncremental, (4, 25, 16), (4, 25)),
        ("fairness", Fairness, (4, 20, 3), (4, 20, 2)),
    ):
        assert get_family(name) is cls
        b = cls().sample(4, gen)
        assert tuple(b.support_x.shape) == x_shape and tuple(b.support_y.shape) == y_shape
        assert torch.isfinite(b.query_x).all()
    assert torch.equal(MaterialsProperty().sample(3, torch.Generator().manual_seed(5)).query_y,
                       MaterialsProperty().sample(3, torch.Generator().manual_seed(5)).query_y)


def test_band_gap_law_by_hand_and_noise_free_samples_follow_it(gen):
    law = {k: torch.tensor([v]) for k, v in
           {"Eg_A": 1.0, "Eg_B": 2.0, "b": 0.5, "alpha": 5e-4, "beta": 200.0, "gamma": 0.1}.items()}
    # Vegard + bowing 1.5 - 0.125, Varshni 5e-4 * 300^2 / 500 = 0.09, pressure 0.1 * 2 = 0.2.
    value = band_gap(law, torch.tensor([[0.5]]), torch.tensor([[300.0]]), torch.tensor([[2.0]]))
    assert float(value) == pytest.approx(1.5 - 0.125 - 0.09 + 0.2)
    fam = MaterialsProperty(noise=0.0, dtype=torch.float64)
    laws = fam.sample_laws(6, gen)
    u, y = fam.measure(laws, 7, gen)
    assert ((u >= 0) & (u <= 1)).all()
    assert torch.allclose(y[..., 0], band_gap(laws, u[..., 0], u[..., 1] * 600, u[..., 2] * 10))


def test_materials_loader_hook_and_its_validation():
    x = torch.rand(2, 6, dtype=torch.float64)
    T, P, gap = 300 * torch.ones(2, 6), torch.zeros(2, 6), torch.ones(2, 6)
    b = MaterialsProperty.from_records(x, T, P, gap, shots=4)
    assert tuple(b.support_x.shape) == (2, 4, 3) and tuple(b.query_y.shape) == (2, 2, 1)
    assert torch.allclose(b.support_x[..., 1], torch.full((2, 4), 0.5, dtype=torch.float64))
    with pytest.raises(ValueError, match="shots"):
        MaterialsProperty.from_records(x, T, P, gap, shots=6)
    with pytest.raises(ValueError, match=r"gap must have shape \[tasks, n\]"):
        MaterialsProperty.from_records(x, T, P, gap[:, :3], shots=2)
    with pytest.raises(ValueError, match="x .alloy composition. must lie in"):
        MaterialsProperty.from_records(x + 1, T, P, gap, shots=2)


def test_inverse_design_samples_hit_their_target_and_loader_hook(gen):
    b = InverseDesign(tolerance=0.01, dtype=torch.float64).sample(50, gen)
    rel = (wavelength(b.query_x) / b.query_y[..., 0] - 1).abs()
    assert rel.max() < 0.06  # 1% scatter: > 5 standard deviations is not expected in 2,500 draws
    assert hits(b.query_x, b.query_y[..., 0]).double().mean() > 0.9  # P(|N(0, 1%)| < 2%) = 0.954
    n, d = from_scaled(to_scaled(torch.tensor([1.5]), torch.tensor([120.0])))
    assert float(n) == pytest.approx(1.5) and float(d) == pytest.approx(120.0)
    assert float(wavelength(to_scaled(torch.tensor(1.5), torch.tensor(120.0)))) == pytest.approx(720.0)
    assert not bool(hits(to_scaled(torch.tensor(3.0), torch.tensor(60.0)), torch.tensor(720.0)))  # n > 2.5
    rb = InverseDesign.from_records(torch.full((3, 4), 1.5), torch.full((3, 4), 120.0), torch.full((3,), 720.0), 1)
    assert tuple(rb.query_x.shape) == (3, 3, 2) and float(rb.query_y[0, 0, 0]) == 720.0
    with pytest.raises(ValueError, match=r"target must have shape \[tasks\]"):
        InverseDesign.from_records(torch.ones(3, 4), torch.ones(3, 4), torch.ones(2), 1)
    with pytest.raises(ValueError, match="target must be"):
        InverseDesign(target=(400.0, 900.0))


def test_continual_tasks_grouped_by_arrival_and_held_out_classes(gen):
    train, test = ClassIncremental(split="train"), ClassIncremental(split="test")
    assert set(train.classes().tolist()).isdisjoint(test.classes().tolist())
    b = test.sample(3, gen)
    assert b.support_y[0].tolist() == [c for c in range(5) for _ in range(5)]
    # Examples of one class scatter around its prototype in the latent coordinates (spread 1 there).
    cls = test.classes()[:1]
    latent = (test.examples(cls, 2000, gen)[0] @ test.rotation)[:, : test.latent]
    assert torch.allclose(latent.mean(0), test.prototypes[cls[0]], atol=0.12)
    x = torch.randn(2, 3, 4, 16)
    rb = ClassIncremental.from_records(x, shots=1)
    assert rb.support_y.tolist() == [[0, 1, 2]] * 2 and torch.equal(rb.support_x[0, 1], x[0, 1, 0])
    with pytest.raises(ValueError, match="ways .6. exceeds"):
        ClassIncremental(split="test", ways=6, n_classes=10, train_classes=5)
    with pytest.raises(ValueError, match=r"\[tasks, ways, n, dim\]"):
        ClassIncremental.from_records(x[0], shots=1)


def test_fairness_groups_follow_the_oximetry_model(gen):
    fam = Fairness(shots=4, query_shots=4000, delta=(4.0, 4.0), mu=(91.0, 91.0), sigma=(1.5, 1.5),
                   dtype=torch.float64)
    b = fam.sample(2, gen)
    a = b.query_y[..., 1]
    assert torch.equal(a, b.query_x[..., 0]) and float(a.mean()) == 0.5
    # Same SaO2 law in both groups: hypoxemia rate P(N(91, 4) < 88) = Phi(-0.75) = 0.2266 in each.
    rate = 0.5 * (1 + math.erf(-0.75 / math.sqrt(2)))
    for g in (0.0, 1.0):
        assert float(b.query_y[..., 0][a == g].mean()) == pytest.approx(rate, abs=0.02)
    # The device overestimates group 1 by delta = 4 %: 1 standard unit of the scaled SpO2 feature.
    shift = b.query_x[..., 1][a == 1].mean() - b.query_x[..., 1][a == 0].mean()
    assert float(shift) == pytest.approx(1.0, abs=0.1)
    rb = Fairness.from_records(torch.tensor([[0, 1, 1]]), torch.tensor([[95.0, 87.0, 91.0]]),
                               torch.tensor([[16.0, 20.0, 16.0]]), torch.tensor([[0, 1, 0]]), shots=2)
    assert rb.support_x[0, 1].tolist() == pytest.approx([1.0, -1.0, 1.0])
    with pytest.raises(ValueError, match="y must hold only 0/1"):
        Fairness.from_records(torch.zeros(1, 3), torch.zeros(1, 3), torch.zeros(1, 3), torch.full((1, 3), 2.0), 1)


# -- models and losses: exactness -----------------------------------------------------------------------
def test_flow_density_is_the_change_of_variables_of_its_generator():
    torch.manual_seed(0)
    flow = CouplingFlow(2, hidden=8, layers=3).double()
    for net in flow.nets:
        torch.nn.init.normal_(net[-1].weight, std=0.5)
    z = torch.randn(6, 2, dtype=torch.float64)
    x = flow(z, reverse=True)
    jac = torch.func.vmap(torch.func.jacrev(lambda v: flow(v[None], reverse=True)[0]))(z)
    expected = -0.5 * (z**2).sum(-1) - math.log(2 * math.pi) - torch.linalg.slogdet(jac)[1]
    assert torch.allclose(flow(x), expected, atol=1e-10)


def _check_fd(alg, batch, tol=1e-6):
    params = list(alg.parameters())
    analytic = torch.cat([g.flatten() for g in torch.autograd.grad(alg.meta_loss(batch), params)])
    numeric = torch.cat([g.flatten() for g in finite_difference(lambda: alg.meta_loss(batch), params)])
    assert rel_err(analytic, numeric) < tol


def test_maml_order2_through_the_flow_matches_finite_differences(gen):
    torch.manual_seed(0)
    flow = CouplingFlow(2, hidden=3, layers=2).double()
    for net in flow.nets:
        torch.nn.init.normal_(net[-1].weight, std=0.3)
    batch = InverseDesign(shots=4, query_shots=4, tolerance=0.05, dtype=torch.float64).sample(2, gen)
    _check_fd(MAML(flow, inner_lr=0.01, inner_steps=2, order=2, loss_fn=nll), batch)


def test_maml_order2_with_the_fair_loss_matches_finite_differences(gen):
    torch.manual_seed(0)
    batch = Fairness(shots=6, query_shots=6, dtype=torch.float64).sample(2, gen)
    _check_fd(MAML(MLP((3, 4, 1)).double(), inner_lr=0.3, inner_steps=2, order=2, loss_fn=fair_loss(0.5)), batch)


def test_sequential_maml_order2_matches_finite_differences(gen):
    torch.manual_seed(0)
    batch = ClassIncremental(ways=3, shots=2, query_shots=2, dim=4, latent=2, dtype=torch.float64).sample(2, gen)
    alg = SequentialMAML(MLP((4, 3, 3)).double(), 3, inner_lr=0.5, inner_steps=1, order=2)
    _check_fd(alg, batch)
    alg.order = 1
    g1 = torch.autograd.grad(alg.meta_loss(batch), list(alg.parameters()))
    alg.order = 2
    g2 = torch.autograd.grad(alg.meta_loss(batch), list(alg.parameters()))
    assert max(rel_err(a, b) for a, b in zip(g1, g2)) > 1e-3


def test_accuracy_matrix_by_hand_for_a_model_that_forgets(gen):
    # Zero network + one big step on class c alone: only class c's logit can win, so R[t, j] = 1[j == t].
    alg = SequentialMAML(MLP((16, 3)), 3, inner_lr=100.0, inner_steps=1)
    torch.nn.init.zeros_(alg.model[0].weight)
    torch.nn.init.zeros_(alg.model[0].bias)
    alg.model[0].weight.requires_grad_(False)  # bias-only learner: the learned class wins everywhere
    R = accuracy_matrix(alg, ClassIncremental(ways=3).sample(4, gen))
    assert torch.equal(R, torch.eye(3).expand(4, 3, 3))


def test_second_order_graph_holds_more_memory_than_first_order(gen):
    torch.manual_seed(0)
    batch = InverseDesign().sample(4, gen)
    # The whole batch's graph: `objective` (meta_loss computes its gradient in bounded memory and keeps none).
    sizes = {o: graph_bytes(lambda o=o: MAML(CouplingFlow(hidden=8, layers=2), 0.01, 2, order=o, loss_fn=nll,
                                             path="loop").objective(batch, 0, ExecPath("loop"))[0])[1]
             for o in (1, 2)}
    assert sizes[2] > 1.5 * sizes[1] > 0


# -- the claimed advantages (fixed seeds, small settings) -------------------------------------------------
def _run(name, tmp_path, **overrides):
    e = get(name)
    return e.fn(e.make_config(overrides), Run(tmp_path / name, {}))


@pytest.mark.slow
def test_materials_property_maml_beats_pooled_fit_and_random_init(tmp_path):
    r = _run("materials-property", tmp_path, iterations=300, eval_tasks=200, eval_steps=5)
    ev = {n: (v["curve"], v["curve_ci95"]) for n, v in r["eval"].items()}
    maml, pooled, rand = ev["MAML (order 2)"], ev["pooled fit"], ev["random init"]
    for k in (1, 5):
        assert maml[0][k] + maml[1][k] < pooled[0][k] - pooled[1][k]
        assert maml[0][k] + maml[1][k] < rand[0][k] - rand[1][k]
    assert (tmp_path / "materials-property" / "curves.png").exists()


@pytest.mark.slow
def test_inverse_design_maml_hits_more_and_second_order_costs_more(tmp_path):
    r = _run("inverse-design", tmp_path, iterations=300, eval_tasks=100, eval_steps=3, candidates=100,
             timing_reps=2)
    hit = {n: c[3] for n, c in r["hit_curves"].items()}  # (mean, ci95) after 3 steps
    maml, pooled = hit["MAML (order 2)"], hit["pooled fit"]
    assert maml[0] - maml[1] > pooled[0] + pooled[1] and maml[0] > 1.5 * pooled[0]
    assert maml[0] > hit["untrained flow (N(0, I))"][0] + 0.1
    cost = {row["order"]: row for row in r["cost_of_order"]}
    assert cost[2]["graph_MB"] > 1.5 * cost[1]["graph_MB"]
    assert (tmp_path / "inverse-design" / "hit_rate.png").exists()


@pytest.mark.slow
def test_continual_learning_maml_start_forgets_less(tmp_path):
    r = _run("continual-learning", tmp_path, iterations=150, eval_tasks=100, pretrain_iterations=200)
    s = r["summary"]
    maml = s["MAML (order 2)"]
    for other in ("scratch (random init)", "fine-tuning (pre-trained)"):
        assert maml["forgetting"][0] + maml["forgetting"][1] < s[other]["forgetting"][0] - s[other]["forgetting"][1]
        assert maml["final_accuracy"][0] - maml["final_accuracy"][1] > \
            s[other]["final_accuracy"][0] + s[other]["final_accuracy"][1]


@pytest.mark.slow
def test_fairness_maml_start_ends_with_a_smaller_equalised_odds_gap_than_the_pooled_fits(tmp_path):
    r = _run("fairness", tmp_path, iterations=400, eval_tasks=200, query_shots=300)
    for other in ("pooled fit (BCE)", "pooled fair fit"):
        excess, ci = r["paired_vs_maml"][other]["eo_gap"]  # other's gap minus MAML's, paired over groups
        assert excess - ci > 0
        assert r["curves"]["MAML (order 2)"]["eo_gap"][-1][0] < r["curves"][other]["eo_gap"][0][0]
