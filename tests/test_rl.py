"""metagrad.rl: the exact meta-policy-gradient (by enumeration on a bandit), first order, the linear baseline,
returns and GAE by hand, batched rollouts (torch and gymnasium), and clear errors on bad input."""

import itertools
import subprocess
import sys

import pytest
import torch

from metagrad import core
from metagrad.rl import (
    MAMLRL,
    Bandit,
    Box,
    Discrete,
    GaussianMLPPolicy,
    Nav2D,
    SoftmaxPolicy,
    add_advantages,
    check_output,
    discounted_returns,
    gae,
    linear_baseline,
    post_update_loss,
    rollout,
)

pytestmark = pytest.mark.usefixtures("one_thread")

D = torch.float64
REWARD = torch.tensor([0.9, 0.2], dtype=D)   # the two arms' (expected) rewards
THETA = torch.tensor([0.3, -0.2], dtype=D)   # the start: arm 0 at probability 0.62
ALPHA = 2.0                                  # a large inner rate, so that the sampling term matters


def bandit_alg(order=2, sampling_term="dice", episodes=3, baseline=None):
    torch.manual_seed(0)
    pol = SoftmaxPolicy(2, THETA).double()
    env = Bandit(arms=2, horizon=1, expected=True, dtype=D)
    return MAMLRL(pol, env, episodes=episodes, inner_lr=ALPHA, order=order, gamma=1.0, baseline=baseline,
                  normalize_advantages=False, sampling_term=sampling_term)


def bandit_traj(actions, horizon=1, baseline=None, leave_one_out=True):
    """One task's trajectories for the given pulls `actions [episodes, horizon]`, with advantages (gamma 1)."""
    a = torch.as_tensor(actions).view(-1, horizon)
    traj = {"obs": torch.ones(*a.shape, 1, dtype=D), "actions": a, "rewards": REWARD[a],
            "mask": torch.ones(a.shape, dtype=D)}
    return add_advantages({k: v.unsqueeze(0) for k, v in traj.items()}, gamma=1.0, baseline=baseline, normalize=False,
                          leave_one_out=leave_one_out)


def one_task(traj):
    return core.index_tasks(traj, 0)


def sequences(episodes, horizon=1):
    return [torch.tensor(s).view(episodes, horizon) for s in itertools.product((0, 1), repeat=episodes * horizon)]


def prob(theta, actions):
    return float(torch.softmax(theta, 0)[actions].prod())


def exact_post_update_return(theta, K):
    """E_{K pulls ~ pi_theta}[ V(theta') ], theta' = theta + alpha/K sum_k r_k (e_{a_k} - pi_theta), by hand."""
    pi = torch.softmax(theta, 0)
    total = torch.zeros((), dtype=D)
    for a in sequences(K):
        a = a.view(-1)
        step = sum(REWARD[k] * (torch.eye(2, dtype=D)[k] - pi) for k in a) / K
        total = total + pi[a].prod() * (torch.softmax(theta + ALPHA * step, 0) * REWARD).sum()
    return total


def expected_estimator(alg, K, M):
    """E over support (K pulls with theta) and query (M pulls with theta') of the meta-gradient estimator of
    the library (adapt, then post_update_loss), by enumerating every sampled set with its probability."""
    theta = alg.params()
    on = alg.adapter().on("loop")
    total = torch.zeros(2, dtype=D)
    for s in sequences(K):
        support = one_task(bandit_traj(s))
        adapted = on.adapt(theta, support)
        for q in sequences(M):
            query = one_task(bandit_traj(q))
            loss, _ = post_update_loss(on, theta, adapted, support, query, alg.sampling_term)
            (g,) = torch.autograd.grad(loss, [theta["logits"]], retain_graph=True)
            total += prob(THETA, s.view(-1)) * prob(adapted["logits"].detach(), q.view(-1)) * g
    return total


def finite_difference(fn, theta, h=1e-5):
    return torch.stack([(fn(theta + h * e) - fn(theta - h * e)) / (2 * h) for e in torch.eye(2, dtype=D)])


def test_order2_meta_gradient_is_exact_and_dropping_the_sampling_term_is_biased():
    K, M = 3, 2
    # The meta-loss is minus the mean reward per step of the query: its expectation is -J(theta).
    fd = -finite_difference(lambda t: exact_post_update_return(t, K), THETA)
    theta = THETA.clone().requires_grad_(True)
    (true,) = torch.autograd.grad(-exact_post_update_return(theta, K), theta)  # the same, by autograd of the sum
    assert torch.allclose(true, fd, atol=1e-10, rtol=0)
    exact = expected_estimator(bandit_alg(sampling_term="dice"), K, M)
    assert torch.allclose(exact, true, atol=1e-13, rtol=0), (exact, true)
    assert torch.allclose(exact, fd, atol=1e-10, rtol=0), (exact, fd)
    # The original MAML-RL estimator (no sampling term) misses half the gradient here (0.056 of 0.112).
    biased = expected_estimator(bandit_alg(sampling_term="none"), K, M)
    assert (biased - true).abs().max() > 0.3 * true.abs().max(), (biased, true)


def test_lvc_is_exact_only_to_first_order_in_the_inner_rate():
    """ProMP's LVC (the magic box / likelihood ratio in the inner loss, not on the outer cost) differentiates
    the expected update: its bias is not zero and vanishes like alpha^2 (halving alpha quarters it)."""
    global ALPHA
    K, M = 3, 2
    gaps = []
    for alpha in (0.5, 0.25):
        old, ALPHA = ALPHA, alpha
        try:
            theta = THETA.clone().requires_grad_(True)
            (true,) = torch.autograd.grad(-exact_post_update_return(theta, K), theta)
            gaps.append(float((expected_estimator(bandit_alg(sampling_term="lvc"), K, M) - true).abs().max()))
            none = float((expected_estimator(bandit_alg(sampling_term="none"), K, M) - true).abs().max())
            assert none > 5 * gaps[-1], (none, gaps)  # the original estimator is biased at first order
        finally:
            ALPHA = old
    assert gaps[0] > 1e-4 and 3.0 < gaps[0] / gaps[1] < 5.0, gaps


def test_order1_is_the_query_gradient_at_the_adapted_policy():
    alg = bandit_alg(order=1)
    theta = alg.params()
    on = alg.adapter().on("loop")
    support, query = one_task(bandit_traj([0, 1, 0])), one_task(bandit_traj([1, 1]))
    adapted = on.adapt(theta, support)
    loss, _ = post_update_loss(on, theta, adapted, support, query)
    (g,) = torch.autograd.grad(loss, [theta["logits"]])
    # By definition: theta' = theta - alpha grad L_support(theta), then grad L_query at theta', held fixed.
    pi = torch.softmax(THETA, 0)
    grad_support = -sum(REWARD[k] * (torch.eye(2, dtype=D)[k] - pi) for k in (0, 1, 0)) / 3
    prime = THETA - ALPHA * grad_support
    pi2 = torch.softmax(prime, 0)
    grad_query = -sum(REWARD[k] * (torch.eye(2, dtype=D)[k] - pi2) for k in (1, 1)) / 2
    assert torch.allclose(adapted["logits"], prime, atol=1e-12)
    assert torch.allclose(g, grad_query, atol=1e-12), (g, grad_query)


def test_linear_baseline_leaves_the_policy_gradient_expectation_unchanged():
    """Two pulls per episode, three episodes: the policy gradient's expectation, enumerated exactly, is the
    same with the leave-one-out linear baseline as without, and equals the true gradient; fitting the
    baseline on the episodes it is subtracted from (the MAML code) biases it."""
    alg = bandit_alg()
    theta = alg.params()
    on = alg.adapter().on("loop")
    H, K = 2, 3
    pi = torch.softmax(THETA, 0)
    true = -(pi * (REWARD - (pi * REWARD).sum()))  # grad of -(mean reward per step) = -grad E[r]
    means = {}
    for name, baseline, loo in (("none", None, True), ("loo", "linear", True), ("in-batch", "linear", False)):
        total = torch.zeros(2, dtype=D)
        for s in sequences(K, H):
            data = one_task(bandit_traj(s, H, baseline, loo))
            loss = on.loss(theta, data)
            (g,) = torch.autograd.grad(loss, [theta["logits"]])
            total += prob(THETA, s.view(-1)) * g
        means[name] = total
    assert torch.allclose(means["none"], true, atol=1e-12), means
    assert torch.allclose(means["loo"], true, atol=1e-12), means
    assert (means["in-batch"] - true).abs().max() > 1e-3, means
    # and the baseline did change the estimator: its variance is smaller.
    data = one_task(bandit_traj([[0, 1], [1, 1], [0, 0]], H, "linear"))
    assert not torch.allclose(data["advantages"], data["returns"])


def test_returns_and_gae_against_hand_computation():
    r = torch.tensor([[1.0, 2.0, 3.0], [1.0, 1.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # the second episode ended after two steps
    g = 0.5
    assert torch.allclose(discounted_returns(r, mask, g), torch.tensor([[1 + 0.5 * 2 + 0.25 * 3, 2 + 0.5 * 3, 3.0],
                                                                       [1 + 0.5 * 1, 1.0, 0.0]]))
    v = torch.tensor([[0.5, 1.0, 2.0], [1.0, 0.5, 9.0]])
    lam = 0.8
    # delta_t = r_t + g V_{t+1} - V_t (V after the end is 0); A_t = delta_t + g lam A_{t+1}
    d0 = [1 + g * 1.0 - 0.5, 2 + g * 2.0 - 1.0, 3 - 2.0]
    a0 = [d0[0] + g * lam * (d0[1] + g * lam * d0[2]), d0[1] + g * lam * d0[2], d0[2]]
    d1 = [1 + g * 0.5 - 1.0, 1 - 0.5]
    a1 = [d1[0] + g * lam * d1[1], d1[1], 0.0]
    assert torch.allclose(gae(r, v, mask, g, lam), torch.tensor([a0, a1]))
    # lam = 1: GAE is the return minus the value
    assert torch.allclose(gae(r, v, mask, g, 1.0), (discounted_returns(r, mask, g) - v) * mask)


def test_linear_baseline_is_the_ridge_fit_on_the_mamls_features():
    gen = torch.Generator().manual_seed(0)
    obs = torch.randn(1, 4, 5, 2, generator=gen, dtype=D)
    ret = torch.randn(1, 4, 5, generator=gen, dtype=D)
    mask = torch.ones(1, 4, 5, dtype=D)
    t = torch.arange(5, dtype=D) / 100

    def feats(e):
        return torch.cat([obs[0, e], obs[0, e] ** 2, t[:, None], t[:, None] ** 2, t[:, None] ** 3,
                          torch.ones(5, 1, dtype=D)], 1)

    X = torch.cat([feats(e) for e in (1, 2, 3)])   # episode 0's baseline: fitted on the other three
    y = ret[0, 1:].reshape(-1)
    w = torch.linalg.solve(X.T @ X + 1e-5 * torch.eye(8, dtype=D), X.T @ y)
    assert torch.allclose(linear_baseline(obs, ret, mask)[0, 0], feats(0) @ w, atol=1e-10)


def test_rollout_is_batched_over_tasks_and_episodes_and_seeded():
    env = Nav2D(horizon=7)
    pol = GaussianMLPPolicy(2, 2, (8,))
    f = core.functional(pol)
    goals = env.sample_tasks(3, torch.Generator().manual_seed(0))
    tr = rollout(f, core.named_params(pol), env, goals, 4, pol.space, torch.Generator().manual_seed(1))
    assert tr["obs"].shape == (3, 4, 7, 2) and tr["actions"].shape == (3, 4, 7, 2) and tr["rewards"].shape == (3, 4, 7)
    # reward = -distance to the goal after the clipped move
    pos = tr["obs"][:, :, 0] + tr["actions"][:, :, 0].clamp(-0.1, 0.1)
    assert torch.allclose(tr["rewards"][:, :, 0], -(pos - goals[:, None]).norm(dim=-1), atol=1e-6)
    again = rollout(f, core.named_params(pol), env, goals, 4, pol.space, torch.Generator().manual_seed(1))
    assert all(torch.equal(tr[k], again[k]) for k in tr)
    # stacked (per-task) parameters give each task its own policy
    stacked = {k: v.detach().unsqueeze(0).repeat(3, *[1] * v.dim()) for k, v in core.named_params(pol).items()}
    tr2 = rollout(f, stacked, env, goals, 4, pol.space, torch.Generator().manual_seed(1), stacked=True)
    assert torch.allclose(tr2["actions"], tr["actions"], atol=1e-6)


def test_bad_input_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"Discrete\(2\) needs 2 logits"):
        check_output(Discrete(2), torch.zeros(5, 3))
    with pytest.raises(ValueError, match=r"Box\(2\) needs 4 numbers.*log standard deviations"):
        check_output(Box(2), torch.zeros(5, 2))
    # a policy whose output does not fit the environment's action space, caught in the rollout
    env = Nav2D(horizon=3)
    pol = SoftmaxPolicy(3)
    with pytest.raises(ValueError, match=r"Box\(2\) needs 4 numbers"):
        rollout(core.functional(pol), core.named_params(pol), env, env.sample_tasks(2), 2, env.action_space)
    with pytest.raises(ValueError, match="does not fit the environment"):
        MAMLRL(pol, env)
    alg = MAMLRL(GaussianMLPPolicy(2, 2, (4,)), env)
    with pytest.raises(TypeError, match="returns_after_steps"):
        alg.adaptation_curve(env.sample_tasks(2), 1)
    with pytest.raises(TypeError, match="a meta-RL batch is a tensor of task settings"):
        alg.meta_gradient(core.Tasks(torch.zeros(2, 1), torch.zeros(2, 1)))
    with pytest.raises(ValueError, match="sampling_term must be 'dice'"):
        MAMLRL(GaussianMLPPolicy(2, 2, (4,)), env, sampling_term="exact")

    class NaNBandit(Bandit):
        def batch(self, settings, episodes, generator=None):
            b = super().batch(settings, episodes, generator)
            step = b.step
            b.step = lambda a: (lambda o, r, d: (o, r.index_fill(0, torch.tensor([1]), float("nan")), d))(*step(a))
            return b

    env = NaNBandit(arms=2, horizon=2)
    pol = SoftmaxPolicy(2)
    with pytest.raises(FloatingPointError, match=r"non-finite rewards .* tasks \[1\]"):
        rollout(core.functional(pol), core.named_params(pol), env, env.sample_tasks(3), 2, pol.space)


def test_import_metagrad_does_not_import_gymnasium():
    code = "import sys, metagrad, metagrad.rl; assert 'gymnasium' not in sys.modules, 'gymnasium imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_gymnasium_unknown_id_is_a_clear_error():
    pytest.importorskip("gymnasium")
    from metagrad.rl import GymEnv

    with pytest.raises(ValueError, match=r"unknown gymnasium environment id 'NoSuchEnv-v9'"):
        GymEnv("NoSuchEnv-v9", horizon=10)


def test_gymnasium_nav2d_gives_the_same_trajectories_as_the_torch_one():
    pytest.importorskip("gymnasium")
    from metagrad.rl import GymEnv

    torch.manual_seed(0)
    pol = GaussianMLPPolicy(2, 2, (8,)).double()
    f, params = core.functional(pol), core.named_params(pol)
    goals = torch.tensor([[0.3, -0.2], [-0.45, 0.1]], dtype=D)
    gym_env = GymEnv("metagrad/Nav2D-v0", horizon=12, task_kwargs=lambda g: {"goal": g.tolist()}, dtype=D)
    g = torch.Generator().manual_seed(2)
    torch.randint(0, 2 ** 31 - 1, (), generator=g)  # GymEnv draws the vector env's reset seed first
    ours = rollout(f, params, Nav2D(horizon=12, dtype=D), goals, 3, pol.space, g)
    theirs = rollout(f, params, gym_env, goals, 3, pol.space, torch.Generator().manual_seed(2))
    for k in ("obs", "actions", "rewards", "mask"):
        assert torch.allclose(ours[k].to(D), theirs[k].to(D), atol=1e-12), k


def test_gymnasium_cartpole_rollout_masks_ended_episodes():
    pytest.importorskip("gymnasium")
    from metagrad.rl import CategoricalMLPPolicy, GymEnv

    env = GymEnv("CartPole-v1", horizon=60)
    pol = CategoricalMLPPolicy(env.obs_dim, 2, (16,))
    tr = rollout(core.functional(pol), core.named_params(pol), env, env.sample_tasks(2), 3, env.action_space,
                 torch.Generator().manual_seed(0))
    assert tr["obs"].shape == (2, 3, 60, 4) and tr["actions"].dtype == torch.int64
    # CartPole pays 1 per step until the pole falls (random policy: well before 60 steps); nothing after
    assert torch.equal(tr["rewards"], tr["mask"]) and tr["mask"].sum(-1).min() < 60
    assert (tr["mask"][..., 1:] <= tr["mask"][..., :-1]).all()
    # the meta-gradient runs on the gymnasium path too
    alg = MAMLRL(pol, env, episodes=3, inner_lr=0.1)
    g = alg.meta_gradient(env.sample_tasks(2), 0)
    assert all(torch.isfinite(v).all() for v in g.values()) and any(v.abs().sum() > 0 for v in g.values())


def test_sampled_meta_gradient_averages_to_the_exact_one():
    """MAMLRL.meta_gradient itself (trajectories sampled inside): over 48,000 bandit tasks (vmap) its mean is
    within 0.02 of the exact gradient (about 6 standard errors) with the DiCE term, and 0.045 away without."""
    K = 3
    theta = THETA.clone().requires_grad_(True)
    (true,) = torch.autograd.grad(-exact_post_update_return(theta, K), theta)
    settings = REWARD.expand(8000, 2).clone()
    means = {}
    for term in ("dice", "none"):
        alg = bandit_alg(sampling_term=term, episodes=K)
        alg.path = "vmap"
        means[term] = torch.stack([alg.meta_gradient(settings, it)["model.logits"] for it in range(6)]).mean(0)
    assert (means["dice"] - true).abs().max() < 0.02, (means, true)
    assert (means["none"] - true).abs().max() > 0.045, (means, true)


def test_loop_and_vmap_paths_give_the_same_meta_gradient():
    torch.manual_seed(0)
    env = Nav2D(horizon=5, dtype=D)
    grads = {}
    for path in ("loop", "vmap"):
        torch.manual_seed(0)
        alg = MAMLRL(GaussianMLPPolicy(2, 2, (8,)).double(), env, episodes=4, path=path)
        grads[path] = alg.meta_gradient(env.sample_tasks(3, torch.Generator().manual_seed(0)), 0)
    for k in grads["loop"]:
        assert torch.allclose(grads["loop"][k], grads["vmap"][k], atol=1e-12), k
    assert grads["loop"].metrics["return"] == pytest.approx(grads["vmap"].metrics["return"], abs=1e-12)


def test_kl_divergence_matches_torch_distributions():
    from metagrad.rl.trpo import kl_divergence

    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 4, generator=gen, dtype=D), torch.randn(5, 4, generator=gen, dtype=D)
    cat = torch.distributions.kl_divergence(torch.distributions.Categorical(logits=a),
                                            torch.distributions.Categorical(logits=b))
    assert torch.allclose(kl_divergence(Discrete(4), a, b), cat, atol=1e-12)
    normal = torch.distributions.kl_divergence(torch.distributions.Normal(a[:, :2], a[:, 2:].exp()),
                                               torch.distributions.Normal(b[:, :2], b[:, 2:].exp())).sum(-1)
    assert torch.allclose(kl_divergence(Box(2), a, b), normal, atol=1e-12)


@pytest.mark.parametrize("max_kl", [0.01, 1e-4])
def test_trpo_step_satisfies_its_kl_constraint_and_improves_the_surrogate(max_kl):
    from metagrad.rl.trpo import trpo_step

    torch.manual_seed(0)
    env = Nav2D(horizon=6, dtype=D)
    alg = MAMLRL(GaussianMLPPolicy(2, 2, (8,), init_std=0.3).double(), env, episodes=4, sampling_term="lvc")
    before = {k: v.detach().clone() for k, v in alg.params().items()}
    r = trpo_step(alg, env.sample_tasks(3, torch.Generator().manual_seed(0)), 0, max_kl=max_kl, cg_iters=5)
    assert r.step_fraction > 0, r                      # a step was accepted
    assert 0 < r.kl <= max_kl, r                       # within the trust region (the mean KL of the adapted policies)
    assert r.surrogate_after < r.surrogate_before, r
    assert r.kl > 0.05 * max_kl, r                     # and it used it: the step is scaled to the constraint
    assert any(not torch.equal(before[k], v) for k, v in alg.params().items())
    assert int(alg.iteration) == 1
