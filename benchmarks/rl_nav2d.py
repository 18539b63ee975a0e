"""Speed of meta-RL on the MAML paper's 2D navigation: environment steps per second of the batched rollout,
and seconds per meta-iteration (sample support, adapt, sample query, order-2 meta-gradient) by path.

    OMP_NUM_THREADS=1 python benchmarks/rl_nav2d.py            # the paper's sizes: 20 tasks x 20 episodes x 100 steps
    python benchmarks/rl_nav2d.py --tasks 40 --repeats 5

No peer runs here: learn2learn's maml_trpo example and pytorch-maml-rl need gym and old MuJoCo bindings
(../shared/notes/rl-federated-distributed.md), so there is no ratio yet.
"""

from __future__ import annotations

import argparse
import time

import torch

from metagrad.rl import MAMLRL, GaussianMLPPolicy, Nav2D, rollout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=20)
    ap.add_argument("--episodes", type=int, default=20)
    ap.add_argument("--horizon", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    env = Nav2D(horizon=args.horizon)
    torch.manual_seed(0)
    policy = GaussianMLPPolicy(2, 2, (100, 100))
    goals = env.sample_tasks(args.tasks, torch.Generator().manual_seed(0))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.tasks} tasks x {args.episodes} "
          f"episodes x {args.horizon} steps, policy MLP 100-100")
    alg = MAMLRL(policy, env, episodes=args.episodes)
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        rollout(alg.f, alg.params(), env, goals, args.episodes, policy.space, torch.Generator().manual_seed(1))
        times.append(time.perf_counter() - start)
    steps = args.tasks * args.episodes * args.horizon
    print(f"rollout: {steps / min(times):,.0f} environment steps/s (best of {args.repeats})")
    for path in ("loop", "vmap"):
        alg = MAMLRL(policy, env, episodes=args.episodes, path=path)
        times = []
        for it in range(args.repeats):
            start = time.perf_counter()
            alg.meta_gradient(goals, it)
            times.append(time.perf_counter() - start)
        print(f"meta-iteration, path {path}: {min(times):.2f} s (best of {args.repeats}; two rollouts of "
              f"{steps:,} steps each, adaptation and the order-2 meta-gradient)")


if __name__ == "__main__":
    main()
