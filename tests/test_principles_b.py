"""Principles of meta-learning, items 6-10: each experiment's claim, asserted with fixed seeds and CI margins."""

import pytest
import torch

from metagrad.experiments import bayes, bias_variance, inner_overfitting, l2o, meta_overfitting
from metagrad.experiments import get as get_experiment
from metagrad.runs import Run

# -- 6. bayes ------------------------------------------------------------------------------------------


def test_gd_equals_map_under_the_implied_prior_and_fails_to_be_a_prior_when_steps_overshoot():
    cfg = bayes.Config(check_tasks=60, check_lrs=(0.05, 0.3), check_steps=(1, 2, 5))
    rows = bayes.check_equivalence(cfg, torch.Generator().manual_seed(0))
    for r in rows:
        assert r["max_rel_|GD-MAP|"] < 1e-10  # an algebraic identity, whatever the regime
        assert r["max_|GD-posterior|"] < 1e-10
        # A Gaussian prior needs 0 < (1 - alpha h)^k < 1 in every direction: for odd k no step may
        # overshoot (alpha h < 1), for even k none may diverge (alpha h < 2).
        bad = r["overshoot_tasks"] if r["inner_steps"] % 2 else r["diverging_tasks"]
        assert r["valid_prior_tasks"] == pytest.approx(1 - bad)
    small = [r for r in rows if r["inner_lr"] == 0.05]
    assert all(r["valid_prior_tasks"] == 1.0 for r in small)
    odd_overshoot = next(r for r in rows if r["inner_lr"] == 0.3 and r["inner_steps"] == 1)
    assert odd_overshoot["valid_prior_tasks"] < 0.6  # the regime where the claim is false is actually visited


def test_implied_precision_is_about_one_over_rate_times_steps_for_small_steps():
    h = torch.diag(torch.tensor([0.01, 0.05], dtype=torch.float64))[None]
    for lr, k in ((0.01, 10), (0.02, 50)):
        lam = torch.diagonal(bayes.gd_prior_precision(h, lr, k)[0])
        approx = 1 / (lr * k) - torch.diagonal(h[0]) * (k + 1) / (2 * k)
        assert torch.allclose(lam, approx, rtol=2e-3)


def test_meta_learned_start_approaches_the_population_mean_and_matches_the_oracle_start():
    cfg = bayes.Config(iterations=150, test_tasks=1000)
    gen = torch.Generator().manual_seed(0)
    start, dist = bayes.meta_learn_start(cfg, gen)
    assert dist[-1] < 0.15 * dist[0]
    rows = {r["estimator"]: r for r in bayes.compare_estimators(cfg, start, gen) if "query_mse" in r}
    learned, oracle = rows["k GD steps from the MAML start"], rows["k GD steps from mu (oracle start)"]
    zero, bayes_opt = rows["k GD steps from 0"], rows["posterior mean, true prior (Bayes)"]
    assert abs(learned["query_mse"] - oracle["query_mse"]) < 0.05 * oracle["query_mse"]
    assert learned["query_mse"] + learned["ci95"] < zero["query_mse"] - zero["ci95"]
    assert bayes_opt["query_mse"] <= learned["query_mse"] < 1.1 * bayes_opt["query_mse"]


# -- 7. bias-variance ----------------------------------------------------------------------------------


def test_bias_plus_variance_is_the_expected_error():
    """The decomposition against a direct computation of the mean squared error over support sets."""
    cfg = bias_variance.Config(test_tasks=3, resamples=4, grid_points=7, eval_steps=2)
    torch.manual_seed(0)
    from metagrad.algorithms import MAML
    from metagrad.models import MLP

    alg = MAML(MLP((1, 8, 1)), inner_lr=0.05)
    fam = bias_variance.drifted(5, 0.0)
    bias2, var = bias_variance.decompose(alg, fam, cfg, torch.Generator().manual_seed(1))
    # Reference: the same draws, adapted one support set at a time.
    gen = torch.Generator().manual_seed(1)
    amp, phase = fam.sample_params(3, gen)
    sx, sy = fam.points(amp.repeat_interleave(4), phase.repeat_interleave(4), 5, gen)
    grid = torch.linspace(-5, 5, 7)[:, None]
    errors = []
    for t in range(3):
        preds = []
        for r in range(4):
            i = 4 * t + r
            from metagrad import core

            p = core.inner_loop(alg.f, alg.loss_fn, alg.params(), sx[i], sy[i], alg.inner_opt, 2, order=0)[-1]
            preds.append(alg.f(p, grid)[:, 0])
        truth = amp[t] * torch.sin(grid[:, 0] - phase[t])
        errors.append(torch.stack([((q - truth) ** 2).mean() for q in preds]).mean())
    assert torch.allclose(bias2 + var, torch.stack(errors).double(), rtol=1e-5)
    assert (var > 0).all() and (bias2 > 0).all()


@pytest.mark.slow
def test_maml_start_has_the_lowest_bias_and_drift_raises_it(tmp_path):
    cfg = bias_variance.Config(iterations=1500, shots=(5, 10, 40), drifts=(0.0, 1.0), test_tasks=60, resamples=10)
    table = bias_variance.run(cfg, Run(tmp_path / "bv", {}))["table"]
    row = {(r["start"], r["shots"], r["drift"]): r for r in table}
    maml, pooled, rand = (row[(s, 10, 0.0)] for s in ("MAML", "pooled", "random init"))
    for other in (pooled, rand):
        assert maml["bias2"] + maml["bias2_ci95"] < other["bias2"] - other["bias2_ci95"]
        assert maml["error"] < 0.6 * other["error"]
    # More shots: every start's variance falls (>= 3x from 5 to 40 shots); drift: MAML's bias rises (>= 3x).
    for s in ("MAML", "pooled", "random init"):
        assert row[(s, 40, 0.0)]["variance"] < row[(s, 5, 0.0)]["variance"] / 3
    assert row[("MAML", 10, 1.0)]["bias2"] > 3 * maml["bias2"]


# -- 8. l2o (the optimizer itself is tested in test_l2o.py) ------------------------------------------------


def test_learned_optimizer_wins_on_ill_conditioned_bowls_and_not_on_round_ones():
    cfg = l2o.Config(kappas=(1.0, 100.0), l2o_iterations=120, maml_iterations=20, test_tasks=300, val_tasks=60,
                     hidden=10, layers=1, transfer_train_kappa=0.0, lr_grid=(1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0))
    rows, _ = l2o.quadratics(cfg, torch.Generator().manual_seed(0))
    learned = {r["tasks"]: r for r in rows if r["optimizer"] == "learned LSTM (L2O)"}
    hard, easy = learned["bowls kappa=100"], learned["bowls kappa=1"]
    assert hard["loss / best hand-designed"] < 1 / 3
    # Round bowls: one SGD step at the right rate is optimal; the LSTM (started as that SGD) gains < 5%.
    assert easy["loss / best hand-designed"] > 0.95


@pytest.mark.slow
def test_learned_optimizer_from_a_fixed_start_loses_to_maml_on_sinusoids():
    cfg = l2o.Config(sin_iterations=300, test_tasks=300)
    rows, _ = l2o.sinusoids(cfg, torch.Generator().manual_seed(0))
    by = {r["optimizer"]: r for r in rows}
    maml = by[f"MAML (SGD {cfg.sin_inner_lr:g})"]
    fixed = by["learned LSTM from a fixed start (L2O)"]
    assert maml["query_loss"] + maml["ci95"] < fixed["query_loss"] - fixed["ci95"]


# -- 9. meta-overfitting -----------------------------------------------------------------------------------


def test_gap_grows_with_shift_and_narrowness_through_learned_rates(tmp_path):
    cfg = meta_overfitting.Config(train_widths=(0.1, 1.0), shifts=(0.0, 2.0), iterations=250, test_tasks=500,
                                  val_every=125)
    table = meta_overfitting.run(cfg, Run(tmp_path / "mo", {}))["table"]
    row = {(r["algorithm"], r["train_width"], r["test_shift"]): r for r in table}
    narrow, wide = row[("Meta-SGD", 0.1, 2.0)], row[("Meta-SGD", 1.0, 2.0)]
    assert narrow["gap"] - narrow["ci95"] > 0 and wide["gap"] - wide["ci95"] > 0
    assert narrow["gap"] - narrow["ci95"] > wide["gap"] + wide["ci95"]
    assert narrow["mean_inner_rate"] < 0.5 * wide["mean_inner_rate"]
    # With a fixed rate (MAML) the width matters much less: the narrowness lives in the learned rates.
    maml_ratio = row[("MAML", 0.1, 2.0)]["gap"] / row[("MAML", 1.0, 2.0)]["gap"]
    assert abs(maml_ratio - 1) < 0.5 * (narrow["gap"] / wide["gap"] - 1)
    # The trainer logged the held-out gap every val_every iterations.
    logged = Run(tmp_path / "mo" / "Meta-SGD_width0.1", resume=True).metrics()
    assert [m["step"] for m in logged if "gap" in m] == [125, 250]


# -- 10. inner-overfitting ---------------------------------------------------------------------------------


def test_query_loss_is_u_shaped_and_each_remedy_flattens_it(tmp_path):
    cfg = inner_overfitting.Config(iterations=100, max_steps=200, val_tasks=200, test_tasks=400)
    table = inner_overfitting.run(cfg, Run(tmp_path / "io", {}))["table"]
    base, *remedies = table
    assert base["inner loop"].startswith("SGD")
    assert base["rise"] - base["rise_ci95"] > 0.5 * base["query_mse_best"]  # a real U, not noise
    assert 0 < base["best_step"] < cfg.max_steps // 4
    assert len(remedies) == 3
    for r in remedies:
        assert r["last - SGD best"] + r["excess_ci95"] < base["rise"] / 3, r["inner loop"]


def test_experiments_are_registered():
    for name in ("bayes", "bias-variance", "l2o", "meta-overfitting", "inner-overfitting"):
        exp = get_experiment(name)
        assert exp.summary and exp.config_cls is not None
