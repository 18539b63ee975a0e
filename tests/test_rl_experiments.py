"""The meta-RL experiments: rl-two-armed (exact returns, checked against the library's sampled adaptation) and
rl-nav2d on a short config: their tables, and the claims that hold there.

rl-nav2d
Short config (about 30-45 s on 2 loaded cores): horizon 20, MLP 32-32, initial std 0.3, 60 meta-iterations
of 10 tasks, Adam at 0.01, LVC estimator, 40 held-out goals. Measured with seeds 0, 1, 2: after one
policy-gradient step MAML beats the pretrained policy by 1.5-2.0 return (paired 95% CI +-0.7-0.9) and the
random start by about 5; after 2-3 steps the pretrained policy catches up (differences within the CI), so
only MAML > random start is asserted there.
"""

import pytest
import torch

from metagrad.experiments import get
from metagrad.experiments.rl_two_armed import exact_returns, one_hot_tasks
from metagrad.rl import MAMLRL, Bandit, SoftmaxPolicy
from metagrad.runs import Run

pytestmark = pytest.mark.usefixtures("one_thread")

SHORT = {"iterations": 60, "horizon": 20, "hidden": "32,32", "meta_batch": 10, "outer_lr": 0.01, "eval_tasks": 40,
         "init_std": 0.3, "seed": 0}


def test_maml_after_one_step_beats_pretrained_and_random_start(tmp_path):
    exp = get("rl-nav2d")
    results = exp.fn(exp.make_config({k: str(v) for k, v in SHORT.items()}), Run(tmp_path / "run", {}))
    rows = {r["start"]: r for r in results["table"]}
    assert set(rows) == {"MAML", "pretrained", "random start", "oracle (knows the goal)"}
    assert all(f"return after {k} steps (95% CI)" in rows["MAML"] for k in range(4))
    claim = results["claim"]["after_steps"]
    pre, pre_ci = claim[1]["MAML minus pretrained"]
    rnd, rnd_ci = claim[1]["MAML minus random start"]
    assert pre - pre_ci > 0.5 and rnd - rnd_ci > 3.0, claim[1]        # paired 95% CIs well above zero
    assert results["claim"]["holds_after_1_step"] is True
    for k in (2, 3):
        m, c = claim[k]["MAML minus random start"]
        assert m - c > 2.0, claim[k]
    # MAML's adaptation works: one step improves its return by far more than the CI
    (m0, c0), (m1, c1) = results["curves"]["MAML"][0], results["curves"]["MAML"][1]
    assert m1 - c1 > m0 + c0
    # the oracle (optimal controller) bounds every start
    oracle = results["oracle"][0]
    assert all(m < oracle for curve in results["curves"].values() for m, _ in curve)
    assert (tmp_path / "run" / "adaptation_curve.png").is_file()


def test_two_armed_exact_returns_match_the_sampled_adaptation():
    """The binomial enumeration of rl-two-armed is the library's policy-gradient step: 6,000 sampled tasks
    adapted by MAMLRL.returns_after_steps give the same mean reward after 0..3 steps: within 0.01, about 2.3
    standard errors (observed here: at most 0.002)."""
    K, alpha, d = 10, 1.0, 1.5
    env = Bandit(arms=2, horizon=1, sampler=one_hot_tasks, dtype=torch.float64)
    alg = MAMLRL(SoftmaxPolicy(2, torch.tensor([d, 0.0], dtype=torch.float64)), env, episodes=K, inner_lr=alpha,
                 gamma=1.0, baseline=None, normalize_advantages=False, path="vmap")
    settings = torch.cat([torch.eye(2, dtype=torch.float64)] * 3000)  # both tasks, equally often
    sampled = alg.returns_after_steps(settings, 3, seed=0).mean(0)
    exact = torch.tensor(exact_returns(d, 3, K, alpha), dtype=torch.float64)
    assert torch.allclose(sampled, exact, atol=0.01), (sampled, exact)
    assert exact[3] - exact[0] > 0.1  # and the steps do improve it, far beyond the tolerance


def test_two_armed_maml_start_lands_at_zero_and_adapts_fastest(tmp_path):
    """Seeds 0, 1, 2 land at d = -0.09, 0.24, -0.02; the exact one-step optimum on the grid is d = 0."""
    exp = get("rl-two-armed")
    results = exp.fn(exp.make_config({"seed": "0"}), Run(tmp_path / "run", {}))
    claim = results["claim"]
    assert abs(claim["maml_d"]) < 0.5 and results["best_d_for_one_step"] == 0.0, claim
    assert claim["maml_best_after_every_step"] is True
    c = results["curves"]
    for other in ("random start", "biased", "saturated"):
        assert abs(results["starts"]["MAML"]) < abs(results["starts"][other])
        assert all(c["MAML"][k] > c[other][k] + 0.02 for k in (1, 2, 3)), (other, c)
    assert c["saturated"][3] == pytest.approx(0.5, abs=0.01)  # a saturated start barely moves
    assert (tmp_path / "run" / "two_armed.png").is_file()
