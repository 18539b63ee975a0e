"""Meta-RL outer steps: PPO-clip (its clipping, and its first epoch against the meta-policy-gradient), and
checkpoint/resume of MAML-RL through train.meta_train with each outer step."""

import pytest
import torch

from metagrad.rl import MAMLRL, GaussianMLPPolicy, Nav2D
from metagrad.rl.ppo import clipped_surrogate, ppo_step
from metagrad.runs import Run
from metagrad.train import meta_train

pytestmark = pytest.mark.usefixtures("one_thread")

D = torch.float64


def nav_alg(outer="gradient", sampling_term="lvc", seed=0, **kw):
    torch.manual_seed(seed)
    env = Nav2D(horizon=6, dtype=D)
    pol = GaussianMLPPolicy(2, 2, (8,), init_std=0.5).double()
    return MAMLRL(pol, env, episodes=4, sampling_term=sampling_term, outer=outer, seed=seed, **kw), env


@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("ratio", [1.5, 0.5])
def test_clipping_zeroes_the_gradient_only_in_the_clipped_direction(ratio, sign):
    """r outside [1 - eps, 1 + eps]: the gradient of the clipped surrogate is 0 when moving further out would
    gain (r > 1 + eps with A > 0, r < 1 - eps with A < 0), and the plain -A (d r / d logp = r) otherwise."""
    eps = 0.2
    logp_old = torch.zeros(2, 3, dtype=D)
    logp = torch.full((2, 3), torch.log(torch.tensor(ratio, dtype=D)).item(), dtype=D, requires_grad=True)
    adv = torch.full((2, 3), sign, dtype=D)
    mask = torch.ones(2, 3, dtype=D)
    (g,) = torch.autograd.grad(clipped_surrogate(logp, logp_old, adv, mask, eps), logp)
    gains_by_leaving = (ratio > 1 + eps and sign > 0) or (ratio < 1 - eps and sign < 0)
    expected = torch.zeros_like(g) if gains_by_leaving else torch.full_like(g, -sign * ratio / 6)
    assert torch.allclose(g, expected, atol=1e-15), (ratio, sign, g)


def test_clipped_surrogate_inside_the_clip_range_is_the_ratio_objective():
    gen = torch.Generator().manual_seed(0)
    logp = (0.05 * torch.randn(3, 5, generator=gen, dtype=D)).requires_grad_(True)
    adv, mask = torch.randn(3, 5, generator=gen, dtype=D), torch.ones(3, 5, dtype=D)
    value = clipped_surrogate(logp, torch.zeros(3, 5, dtype=D), adv, mask, 0.3)
    assert value.item() == pytest.approx(-(logp.exp() * adv).mean().item(), abs=1e-14)


@pytest.mark.parametrize("sampling_term", ["lvc", "none"])
def test_one_ppo_epoch_at_ratio_one_is_a_step_on_the_meta_policy_gradient(sampling_term):
    """At the first epoch the adapted policy is the one that sampled the query trajectories (r = 1): the PPO
    gradient is MAMLRL.meta_gradient of the same iteration (the same trajectories), through the inner step."""
    ref, env = nav_alg(sampling_term=sampling_term)
    tasks = env.sample_tasks(3, torch.Generator().manual_seed(1))
    grads = ref.meta_gradient(tasks, 0)
    alg, _ = nav_alg(sampling_term=sampling_term)
    before = {k: v.detach().clone() for k, v in alg.params().items()}
    lr = 1e-3
    metrics = ppo_step(alg, tasks, torch.optim.SGD(alg.meta_parameters().values(), lr=lr), 0, clip=0.2, epochs=1)
    assert metrics["clip_fraction"] == 0.0
    for name, p in alg.meta_parameters().items():
        key = name[len("model."):]
        assert torch.allclose((before[key] - p.detach()) / lr, grads[name], rtol=1e-9, atol=1e-12), name
    assert metrics["return"] == pytest.approx(grads.metrics["return"], abs=1e-12)
    assert any(g.abs().max() > 1e-3 for g in grads.values())  # a real step, not a zero gradient


def test_ppo_epochs_lower_the_surrogate_on_the_same_trajectories():
    alg, env = nav_alg(outer="ppo", ppo_clip=0.2, ppo_epochs=8)
    tasks = env.sample_tasks(3, torch.Generator().manual_seed(1))
    opt = torch.optim.Adam(alg.meta_parameters().values(), lr=3e-3)
    m = alg.train_step(tasks, opt, 0)
    assert m["surrogate_last"] < m["surrogate_first"]
    assert int(alg.iteration) == 1


@pytest.mark.parametrize("outer", ["gradient", "trpo", "ppo"])
def test_interrupted_and_resumed_rl_run_reaches_the_same_parameters(tmp_path, outer):
    """meta_train on MAML-RL: 4 iterations straight, against 2 iterations, a checkpoint, and a fresh process
    state (new objects) resumed to 4: the same parameters, Adam state and metrics, bit for bit."""
    def train(path, iterations, resume):
        alg, env = nav_alg(outer=outer, ppo_epochs=2)
        run = Run(path, {"outer": outer}, resume=resume)
        meta_train(alg, env, iterations, meta_batch=3, outer_lr=1e-3, run=run, seed=5, log_every=1,
                   checkpoint_every=100, progress=False)
        return alg, run

    full, full_run = train(tmp_path / "full", 4, False)
    half, _ = train(tmp_path / "split", 2, False)
    resumed, resumed_run = train(tmp_path / "split", 4, True)
    assert int(resumed.iteration) == 4
    changed = False
    for k, v in full.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
        changed |= not torch.equal(v, half.state_dict()[k]) and v.is_floating_point()
    assert changed  # the resumed half of the run did move the parameters
    lines = [[{k: v for k, v in m.items() if k != "time"} for m in r.metrics()] for r in (full_run, resumed_run)]
    assert lines[0] == lines[1] and len(lines[0]) == 4
