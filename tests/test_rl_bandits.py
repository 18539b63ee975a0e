"""Bernoulli bandits: the finite-horizon Gittins index against brute-force calibration, the Bayes-optimal DP
against a plain recursion, the simulated policies against their exact values, the delayed and sparse rewards
of `Bandit`, and the claims of rl-bandits, rl-dependent-bandit and the rl-two-armed variants on short configs."""

import math
from functools import cache

import pytest
import torch

from metagrad.evaluation import mean_ci95
from metagrad.experiments import get
from metagrad.experiments.rl_bandits import dependent_tasks, uniform_tasks
from metagrad.experiments.rl_two_armed import exact_returns, one_hot_tasks
from metagrad.rl import MAMLRL, Bandit, SoftmaxPolicy
from metagrad.rl import bandits as B
from metagrad.runs import Run

pytestmark = pytest.mark.usefixtures("one_thread")


def brute_index(s, f, h):
    """The calibration by bisection on lambda, each value of the retirement problem by plain recursion."""
    def g(lam):
        @cache
        def v(s, f, r):
            if r == 0:
                return 0.0
            p = (s + 1) / (s + f + 2)
            return max(r * lam, p * (1 + v(s + 1, f, r - 1)) + (1 - p) * v(s, f + 1, r - 1))
        p = (s + 1) / (s + f + 2)
        return p * (1 + v(s + 1, f, h - 1)) + (1 - p) * v(s, f + 1, h - 1) - h * lam

    lo, hi = 0.0, 1.0
    for _ in range(60):
        lo, hi = ((lo + hi) / 2, hi) if g((lo + hi) / 2) > 0 else (lo, (lo + hi) / 2)
    return lo


def test_gittins_index_equals_brute_force_calibration():
    H = 8
    table = B.gittins_indices(H)
    err = max(abs(brute_index(s, f, h) - table[s, f, h])
              for h in range(1, H + 1) for s in range(H - h + 1) for f in range(H - h + 1 - s))
    assert err < 1e-12
    assert table[3, 1, 1] == pytest.approx(4 / 6)          # one pull left: the index is the posterior mean
    assert table[0, 0, 8] > table[0, 0, 2] > 0.5           # more pulls left, more worth exploring


def test_bayes_optimal_dp_and_gittins_value_on_two_arms():
    """The multiset DP equals a plain recursion over (s0, f0, s1, f1); the Gittins policy is within 3e-4 of
    it (K=10: 6.02152 against 6.02179; the index policy is not exactly optimal with a finite horizon)."""
    K = 10

    @cache
    def v(s0, f0, s1, f1):
        if s0 + f0 + s1 + f1 == K:
            return 0.0
        q0, q1 = (s0 + 1) / (s0 + f0 + 2), (s1 + 1) / (s1 + f1 + 2)
        return max(q0 * (1 + v(s0 + 1, f0, s1, f1)) + (1 - q0) * v(s0, f0 + 1, s1, f1),
                   q1 * (1 + v(s0, f0, s1 + 1, f1)) + (1 - q1) * v(s0, f0, s1, f1 + 1))

    best = B.bayes_optimal_value(2, K)
    assert best == pytest.approx(v(0, 0, 0, 0), abs=1e-12)
    gittins = B.index_policy_value(2, K, B.gittins_indices(K))
    assert 0 < best - gittins < 3e-4
    assert B.index_policy_value(5, K, B.gittins_indices(K)) == pytest.approx(B.bayes_optimal_value(5, K), abs=1e-12)


def test_simulated_policies_match_their_exact_values():
    gen = torch.Generator().manual_seed(0)
    K, N, n = 8, 3, 20_000
    probs = uniform_tasks(n, N, gen)
    m, c = mean_ci95(B.play(B.gittins_scorer(K), probs, K, seed=1))
    assert abs(m - B.index_policy_value(N, K, B.gittins_indices(K))) < 1.5 * c
    # random: E[total | p] = K mean(p) exactly, so the per-task residual has mean 0 (and the mean is ~K/2)
    total = B.play(B.random_scorer, probs, K, seed=2)
    r, rc = mean_ci95(total - K * probs.mean(1))
    assert abs(r) < 1.5 * rc
    assert abs(total.mean() - K / 2) < 0.05
    # dependent bandit: the DP's value, attained by the greedy policy; Thompson sampling is below it
    dep = dependent_tasks(n, gen)
    exact, greedy_optimal = B.dependent_bayes_optimal(K)
    assert greedy_optimal
    g, gc = mean_ci95(B.play(B.dependent_greedy_scorer, dep, K, seed=3))
    assert abs(g - exact) < 1.5 * gc
    t, tc = mean_ci95(B.play(B.dependent_greedy_scorer, dep, K, seed=3) - B.play(B.dependent_thompson_scorer, dep, K,
                                                                                    seed=3))
    assert t - tc > 0.1


def test_delayed_and_sparse_rewards():
    probs = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    actions = [torch.tensor([[0, 0]]), torch.tensor([[1, 0]]), torch.tensor([[0, 0]])]  # 2 episodes, 3 pulls
    paid = {}
    for reward in ("immediate", "delayed", "sparse"):
        batch = Bandit(arms=2, horizon=3, dtype=torch.float64, reward=reward).batch(probs, 2)
        batch.reset()
        paid[reward] = torch.stack([batch.step(a)[1][0] for a in actions], 1).tolist()
    assert paid["immediate"] == [[1, 0, 1], [1, 1, 1]]
    assert paid["delayed"] == [[0, 0, 2], [0, 0, 3]]
    assert paid["sparse"] == [[0, 0, 0], [0, 0, 1]]
    with pytest.raises(ValueError, match="reward must be"):
        Bandit(reward="late")


@pytest.mark.parametrize("reward", ["delayed", "sparse"])
def test_two_armed_exact_returns_match_the_sampled_adaptation_with_longer_episodes(reward):
    """The enumeration of exact_returns is the library's step for 3-pull episodes too: 6,000 sampled tasks
    (returns_after_steps) agree within 0.03 on returns per episode of at most 3 (about 3 standard errors)."""
    K, alpha, d, H = 10, 1.0, 1.0, 3
    env = Bandit(arms=2, horizon=H, sampler=one_hot_tasks, dtype=torch.float64, reward=reward)
    alg = MAMLRL(SoftmaxPolicy(2, torch.tensor([d, 0.0], dtype=torch.float64)), env, episodes=K, inner_lr=alpha,
                 gamma=1.0, baseline=None, normalize_advantages=False, path="vmap")
    settings = torch.cat([torch.eye(2, dtype=torch.float64)] * 3000)
    sampled = alg.returns_after_steps(settings, 2, seed=0).mean(0)
    exact = torch.tensor(exact_returns(d, 2, K, alpha, H, reward), dtype=torch.float64)
    assert torch.allclose(sampled, exact, atol=0.03), (sampled, exact)
    assert exact[2] - exact[0] > 0.05


def run(name, overrides, tmp_path):
    exp = get(name)
    return exp.fn(exp.make_config(overrides), Run(tmp_path / name, {}))


def test_rl_bandits_short(tmp_path):
    """K=10, N=5 and 50, 500 held-out tasks: Gittins at the exact Bayes-optimal value (within its CI) and
    above Thompson; MAML's query episode beats its support episode (= random, K/2) by far."""
    r = run("rl-bandits", {"arms": "5,50", "horizons": "10", "iterations": "20", "eval_tasks": "500"}, tmp_path)
    assert [(row["N"], row["K"]) for row in r["table"]] == [(5, 10), (50, 10)]
    for cell in r["cells"].values():
        st = cell["stats"]
        assert abs(st["Gittins"][0] - cell["bayes_optimal"]) < st["Gittins"][1]
        assert cell["gittins_minus_thompson"][0] - cell["gittins_minus_thompson"][1] > 0.3
        assert abs(st["random"][0] - 5) < 1.5 * st["random"][1]
        assert st["MAML query episode (after 1 step)"][0] - st["MAML support episode"][0] > 1.0
    assert r["cells"]["N=50 K=10"]["bayes_optimal"] == pytest.approx(6.713951, abs=1e-6)
    assert (tmp_path / "rl-bandits" / "bandits.png").is_file()


def test_rl_dependent_bandit_short(tmp_path):
    r = run("rl-dependent-bandit", {"horizons": "10", "iterations": "20"}, tmp_path)
    cell = r["cells"]["K=10"]
    assert cell["greedy_is_optimal"] and cell["bayes_optimal_exact"] == pytest.approx(6.833622, abs=1e-6)
    m, c = cell["stats"]["Bayes-optimal (greedy on the dependent posterior)"]
    assert abs(m - cell["bayes_optimal_exact"]) < c
    assert cell["bayes_minus_thompson"][0] - cell["bayes_minus_thompson"][1] > 0.1


def test_two_armed_delayed_claim_holds_sparse_does_not(tmp_path):
    """Delayed reward (3 pulls, the total at the end): the best start is d = 0 and MAML lands near it; sparse
    reward (1 only if all 3 pulls were right): the best start is saturated and MAML moves away from d = 0."""
    delayed = run("rl-two-armed", {"horizon": "3", "reward": "delayed", "eval_steps": "2"}, tmp_path)
    assert delayed["best_d_for_one_step"] == 0.0
    assert delayed["claim"]["near_zero"] and delayed["claim"]["maml_best_after_every_step"]
    sparse = run("rl-two-armed", {"horizon": "3", "reward": "sparse", "eval_steps": "2"}, tmp_path / "s")
    assert sparse["best_d_for_one_step"] == 8.0 and sparse["one_step_return_at_zero"] == pytest.approx(0.1509, abs=1e-4)
    assert abs(sparse["claim"]["maml_d"]) > 2.0 + 1.0 and not sparse["claim"]["near_zero"]
    assert sparse["one_step_return_at_best_d"] > 3 * sparse["one_step_return_at_zero"]
    assert math.isclose(sparse["curves"]["saturated"][0], 0.5 * (1 / (1 + math.exp(-6))) ** 3
                        + 0.5 * (1 / (1 + math.exp(6))) ** 3, rel_tol=1e-9)
