"""MuJoCo (gymnasium[mujoco]): the half-cheetah task families' rewards, reused sub-environments that keep
nothing across tasks, and a smoke run of rl-cheetah-dir / rl-cheetah-vel at tiny sizes."""

import math

import pytest
import torch

pytest.importorskip("mujoco")
gym = pytest.importorskip("gymnasium")

from metagrad.experiments import get  # noqa: E402
from metagrad.rl.locomotion import CTRL_COST, cheetah  # noqa: E402
from metagrad.runs import Run  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def reference_velocities(actions, steps):
    """HalfCheetah-v5 itself (no reset noise), driven by `actions`: its forward velocity per step."""
    env = gym.make("HalfCheetah-v5", reset_noise_scale=0.0)
    env.reset(seed=0)
    out = [env.step(actions[t])[4]["x_velocity"] for t in range(steps)]
    env.close()
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("kind", ["dir", "vel"])
def test_cheetah_rewards_are_the_tasks_and_nothing_leaks_across_batches(kind):
    """Two tasks stepped with the same actions from the same (noise-free) start: each reward is the task's
    formula on HalfCheetah-v5's own velocity; the next batch on the reused sub-environments, with the
    tasks swapped, gives the swapped rewards (the reset re-initialises the physics and sets the new task)."""
    steps = 6
    env = cheetah(kind, horizon=steps, reset_noise_scale=0.0)
    gen = torch.Generator().manual_seed(0)
    actions = torch.rand(steps, 6, generator=gen, dtype=torch.float64) * 2 - 1
    v = reference_velocities(actions.numpy(), steps)
    ctrl = CTRL_COST * (actions ** 2).sum(-1)
    settings = torch.tensor([[1.0], [-1.0]]) if kind == "dir" else torch.tensor([[0.5], [1.5]])
    rewards = []
    for order in ([0, 1], [1, 0]):
        batch = env.batch(settings[order], 1, gen)
        batch.reset()
        rewards.append(torch.stack([batch.step(actions[t].expand(2, 1, 6).float())[1][:, 0].double()
                                    for t in range(steps)], 1))
        batch.close()
    env.close()
    for i, task in enumerate(settings[:, 0].double()):
        expected = task * v - ctrl if kind == "dir" else -(v - task).abs() - ctrl
        assert torch.allclose(rewards[0][i], expected, atol=1e-5), (kind, i)
    assert torch.equal(rewards[1], rewards[0].flip(0))
    assert v.abs().max() > 0.05  # the actions did move the cheetah


@pytest.mark.parametrize("kind, outer", [("dir", "trpo"), ("vel", "ppo")])
def test_cheetah_experiment_smoke(tmp_path, kind, outer):
    """A few meta-iterations at tiny sizes through the experiment: its table, counts and checkpoints."""
    exp = get(f"rl-cheetah-{kind}")
    cfg = exp.make_config({"budget_minutes": 0, "iterations": 2, "meta_batch": 2, "episodes": 2, "horizon": 10,
                           "hidden": (8,), "outer": outer, "ppo_epochs": 2, "eval_tasks": 3, "eval_steps": 1})
    run = Run(tmp_path / kind, {})
    out = exp.fn(cfg, run)
    assert [r["start"] for r in out["table"]][:3] == ["MAML", "pretrained", "random start"]
    for name, curve in out["curves"].items():
        assert len(curve) == 2 and all(math.isfinite(m) and c >= 0 for m, c in curve), name
    assert out["throughput"]["MAML"]["iterations"] == 2 and out["throughput"]["pretrained"]["iterations"] == 2
    assert out["throughput"]["MAML"]["simulator_steps"] == 2 * 2 * 2 * 2 * 10  # iterations x 2 rollouts x tasks x K x H
    assert out["throughput"]["pretrained"]["simulator_steps"] == 2 * 1 * 2 * 2 * 10
    for child in ("maml", "pretrained"):
        assert (run.dir / child / "checkpoint.safetensors").is_file()
        assert len(Run(run.dir / child, resume=True).metrics()) >= 2
    assert (run.dir / "adaptation_curve.png").is_file()
    assert out["paper_figure_5"] == ([0.0, 300.0] if kind == "dir" else [-130.0, -75.0])
