"""The MAML paper's half-cheetah locomotion (Finn et al. 2017, section 5.3, figure 5): `rl-cheetah-dir` (run
forward or backward) and `rl-cheetah-vel` (run at a goal velocity in U[0, 2]) on gymnasium's HalfCheetah-v5
(MuJoCo, headless; rewards as in the MAML code and ProMP: `metagrad.rl.locomotion`).

Claim (the paper's figure 5, values read off the figure, so approximate): after one policy-gradient step
on K = 20 trajectories of a new task, MAML's return rises from about 0 to about 300 (dir) and from about
-130 to about -75 (vel), well above a policy pretrained on all tasks pooled and a random start.

The paper's settings (the full config): policy MLP 100-100 (ReLU), Gaussian with a learned log-std;
horizon 200; K = 20 trajectories per task and step; meta-batch 40; inner rate 0.1, one inner step; TRPO
outer step (max KL 0.01); 500 meta-iterations (its figure's training length). That is

    metagrad run rl-cheetah-dir --set meta_batch=40 --set iterations=500 --set budget_minutes=0 \
        --set eval_tasks=40 --set eval_steps=3

about 320k simulator steps per iteration; at the ~1.1e7 simulator steps per hour that MAML meta-training
ran at here (one thread, loaded machine, TRPO included) that is ~13 hours per trained start. The
DEFAULT is budget-limited: meta-batch 10 and `budget_minutes` of training per start (MAML, pretrained),
everything else the paper's; it shows how far a few minutes get, not the paper's numbers. The pretrained
policy is trained by the same code and outer step with no inner step; the random start is the same seeded
network untrained; every start is fine-tuned at test with the same inner rate. Meta-training runs through
`train.meta_train` (checkpoints, `--resume`, a clean stop at the budget).

    for start in (MAML, pretrained): meta_train(MAMLRL(outer=trpo|ppo|gradient), cheetah tasks, budget)
    on `eval_tasks` held-out tasks: mean return of K fresh trajectories after 0..eval_steps steps -> table
      with 95% CIs beside the paper's figure, training hours and simulator steps per hour, plots
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from metagrad.evaluation import mean_ci95
from metagrad.experiments import experiment
from metagrad.rl import MAMLRL, GaussianMLPPolicy
from metagrad.runs import Run
from metagrad.train import meta_train

# Read off the MAML paper's figure 5 (approximate): MAML's return after 0 and 1 policy-gradient steps.
PAPER_FIGURE_5 = {"dir": (0.0, 300.0), "vel": (-130.0, -75.0)}


@dataclass
class CheetahConfig:
    budget_minutes: float = 1.5     # training wall time per trained start (MAML, pretrained); 0: none (full run)
    iterations: int = 500           # meta-iterations per start (the paper's figure); the budget stops earlier
    meta_batch: int = 10            # tasks per meta-iteration (the paper: 40)
    episodes: int = 20              # K: trajectories per task and policy-gradient step
    horizon: int = 200
    hidden: tuple[int, ...] = (100, 100)
    inner_lr: float = 0.1
    order: int = 2
    outer: str = "trpo"             # trpo (the paper's) | ppo (ProMP's clipped surrogate) | gradient (Adam)
    max_kl: float = 0.01
    outer_lr: float = 1e-3          # Adam's rate for ppo and gradient (unused by trpo)
    ppo_clip: float = 0.3
    ppo_epochs: int = 5
    # The estimator for outer=gradient and the inner loss for ppo (lvc: ProMP's); TRPO optimises the original
    # surrogate whatever this says (metagrad.rl.trpo).
    sampling_term: str = "lvc"
    gamma: float = 0.99
    init_std: float = 1.0
    eval_tasks: int = 10            # held-out tasks (the same ones for every start)
    eval_steps: int = 2
    checkpoint_every: int = 5
    path: str = "vmap"
    seed: int = 0


def make(kind: str, cfg: CheetahConfig, inner_steps: int, env=None) -> tuple[MAMLRL, object]:
    """The task family and a freshly initialised algorithm (the same seeded network for every start)."""
    from metagrad.rl.locomotion import cheetah

    env = env or cheetah(kind, horizon=cfg.horizon)
    torch.manual_seed(cfg.seed)
    policy = GaussianMLPPolicy(env.obs_dim, env.action_space.dim, tuple(cfg.hidden), init_std=cfg.init_std)
    alg = MAMLRL(policy, env, episodes=cfg.episodes, inner_lr=cfg.inner_lr, inner_steps=inner_steps,
                 order=cfg.order, gamma=cfg.gamma, sampling_term=cfg.sampling_term, path=cfg.path, seed=cfg.seed,
                 outer=cfg.outer, max_kl=cfg.max_kl, ppo_clip=cfg.ppo_clip, ppo_epochs=cfg.ppo_epochs)
    return alg, env


def run_cheetah(kind: str, cfg: CheetahConfig, run: Run) -> dict:
    maml, env = make(kind, cfg, inner_steps=1)
    pretrained, _ = make(kind, cfg, inner_steps=0, env=env)
    random_start, _ = make(kind, cfg, inner_steps=1, env=env)
    trained, curves_train = {}, {}
    try:
        for name, alg in (("MAML", maml), ("pretrained", pretrained)):
            child = run.child(name.lower())
            trained[name] = meta_train(
                alg, env, cfg.iterations, cfg.meta_batch, cfg.outer_lr, run=child, seed=cfg.seed, log_every=1,
                checkpoint_every=cfg.checkpoint_every, time_budget=cfg.budget_minutes * 60 or None,
                desc=f"{name} cheetah-{kind} ({cfg.outer})")
            curves_train[name] = [(m["step"], m["time"] / 3600, m.get("return")) for m in child.metrics()
                                  if "return" in m]
        tasks = env.sample_tasks(cfg.eval_tasks, torch.Generator().manual_seed(cfg.seed + 10_000))
        per_task, curves = {}, {}
        for name, alg in (("MAML", maml), ("pretrained", pretrained), ("random start", random_start)):
            # The same held-out tasks and evaluation seed for every start; fine-tuning at inner_lr.
            per_task[name] = alg.returns_after_steps(tasks, cfg.eval_steps, seed=cfg.seed + 20_000,
                                                     inner_lr=cfg.inner_lr)
            curves[name] = [mean_ci95(per_task[name][:, k]) for k in range(cfg.eval_steps + 1)]
    finally:
        env.close()
    steps_per_iteration = {"MAML": 2, "pretrained": 1}  # rollouts of meta_batch x K episodes per iteration
    rows, throughput = [], {}
    for name, curve in curves.items():
        row = {"start": name, **{f"return after {k} steps (95% CI)": f"{m:.1f} ± {c:.1f}"
                                 for k, (m, c) in enumerate(curve)}}
        if name in trained:
            t = trained[name]
            sim_steps = t.iteration * steps_per_iteration[name] * cfg.meta_batch * cfg.episodes * cfg.horizon
            hours = t.seconds / 3600
            throughput[name] = {"iterations": t.iteration, "train_hours": hours, "simulator_steps": sim_steps,
                                "simulator_steps_per_hour": sim_steps / hours if hours else 0.0,
                                "iterations_per_hour": t.iteration / hours if hours else 0.0, "stopped": t.stopped}
            row.update({"iterations": t.iteration, "train minutes": round(t.seconds / 60, 1),
                        "simulator steps per hour": f"{sim_steps / max(hours, 1e-9):.3g}"})
        rows.append(row)
    before, after = PAPER_FIGURE_5[kind]
    rows.append({"start": "MAML, paper figure 5 (read off the figure)", "return after 0 steps (95% CI)": f"~{before:g}",
                 "return after 1 steps (95% CI)": f"~{after:g}"})
    claim = {}
    for k in range(1, cfg.eval_steps + 1):
        diffs = {o: mean_ci95(per_task["MAML"][:, k] - per_task[o][:, k]) for o in ("pretrained", "random start")}
        claim[k] = {**{f"MAML minus {o}": list(d) for o, d in diffs.items()},
                    "holds": all(m - c > 0 for m, c in diffs.values())}
    plot(run, kind, curves, curves_train, cfg)
    full = cfg.meta_batch >= 40 and all(t.iteration >= 500 for t in trained.values())
    return {"table": rows, "curves": {n: [list(x) for x in c] for n, c in curves.items()},
            "training_curves": curves_train, "throughput": throughput, "paper_figure_5": [before, after],
            "claim": {"after_steps": claim, "holds_after_1_step": claim[1]["holds"] if claim else False},
            "note": (f"{'Full' if full else 'Budget-limited'} run: {cfg.outer} outer step, meta-batch "
                     f"{cfg.meta_batch}, K={cfg.episodes}, horizon {cfg.horizon}, "
                     + ", ".join(f"{n} {t.iteration} iterations ({t.stopped}, {t.seconds / 60:.1f} min)"
                                 for n, t in trained.items())
                     + f"; returns on {cfg.eval_tasks} held-out tasks. The paper's numbers are read off its figure "
                       "5 and are for 500 iterations of meta-batch 40.")}


def plot(run: Run, kind: str, curves: dict, curves_train: dict, cfg: CheetahConfig) -> None:
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(9, 3.5))
    steps = list(range(cfg.eval_steps + 1))
    for name, curve in curves.items():
        ax.errorbar(steps, [m for m, _ in curve], yerr=[c for _, c in curve], marker="o", ms=3, capsize=3,
                    label=name)
    ax.plot([0, 1], PAPER_FIGURE_5[kind], "k--", marker="x", lw=1, label="MAML, paper fig. 5 (approx.)")
    ax.set(xlabel="policy-gradient steps at meta-test", ylabel="return (95% CI)", xticks=steps,
           title=f"cheetah-{kind}, K={cfg.episodes}, {cfg.eval_tasks} held-out tasks")
    ax.legend(fontsize=7)
    for name, points in curves_train.items():
        bx.plot([h for _, h, _ in points], [r for _, _, r in points], marker=".", label=f"{name} (meta-train)")
    bx.set(xlabel="training hours (this machine)", ylabel="return of the sampled policies",
           title="meta-training return per hour")
    bx.legend(fontsize=7)
    run.save_figure(fig, "adaptation_curve")


def run_dir(cfg: CheetahConfig, run: Run) -> dict:
    return run_cheetah("dir", cfg, run)


def run_vel(cfg: CheetahConfig, run: Run) -> dict:
    return run_cheetah("vel", cfg, run)


experiment("rl-cheetah-dir", "MAML-RL on HalfCheetah-v5 forward/backward (MAML paper fig. 5): return after 0-2 "
           "steps vs pretrained and random start; budget-limited by default", CheetahConfig)(run_dir)
experiment("rl-cheetah-vel", "MAML-RL on HalfCheetah-v5 goal velocity (MAML paper fig. 5): return after 0-2 "
           "steps vs pretrained and random start; budget-limited by default", CheetahConfig)(run_vel)
