"""Where bf16 gains and loses on a CPU: one meta-iteration in float32 and in bf16, and its time per kind of kernel.

Issue 14 asked whether `+bf16` (torch's bfloat16 autocast around the network) buys accuracy per hour. This
script shows where the time of one second-order MAML meta-iteration goes on the Omniglot workloads, float32
against `+bf16` and `+cl+bf16`: seconds per meta-iteration (median of `--repeats`, one thread, the loop path,
so that every kernel runs in this process) and the self CPU time of each kind of kernel in one profiled
iteration (convolutions, max-pooling, batch norm, ReLU, dtype casts, the rest). Synthetic images, so nothing to
download; the shapes are the workloads':

- paper-5w1s:  the MAML paper's 5-way 1-shot (stride-2 Conv4, 1 query drawing per class, meta-batch 32, 1 step)
- paper-20w1s: its 20-way 1-shot (1 query per class, meta-batch 16, 5 steps)
- speed-5w1s:  benchmarks/speed.py's 5-way problem (15 query per class, meta-batch 32, 1 step), both nets

    python benchmarks/bf16_profile.py                       # every workload, ~10 min (measured 9.5 on 2 idle cores)
    python benchmarks/bf16_profile.py --workloads paper-5w1s --repeats 3

The CPU matters: without oneDNN bfloat16 kernels (AVX2 only) a bf16 convolution falls back to a slow reference
kernel; the header says which case the run is in.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from speed import conv_tasks
from torch import nn
from torch.profiler import ProfilerActivity, profile

from metagrad import TaskBatch, paths
from metagrad.algorithms import MAML

# name -> (pool, ways, shots, query per class, meta-batch, inner steps, inner rate)
WORKLOADS = {
    "paper-5w1s": ("stride", 5, 1, 1, 32, 1, 0.4),
    "paper-20w1s": ("stride", 20, 1, 1, 16, 5, 0.1),
    "speed-5w1s-stride": ("stride", 5, 1, 15, 32, 1, 0.4),
    "speed-5w1s-max": ("max", 5, 1, 15, 32, 1, 0.4),
}
PATHS = ("loop", "loop+bf16", "loop+cl+bf16")
KINDS = {"convolution": ("convolution",), "max-pool": ("max_pool",), "batch norm": ("batch_norm",),
         "ReLU": ("threshold", "clamp_min", "relu"), "dtype casts": ("copy_", "_to_copy")}


def kind(op: str) -> str:
    """The kind of kernel an aten op is."""
    return next((k for k, keys in KINDS.items() if any(key in op for key in keys)), "other")


def problem(name: str) -> tuple[nn.Module, TaskBatch, float, int]:
    """The workload's net (seed 0), a task batch of random images (seed 0), its inner rate and steps."""
    pool, ways, shots, query, meta_batch, steps, inner_lr = WORKLOADS[name]
    return *conv_tasks(pool, ways, shots, query, meta_batch), inner_lr, steps


def measure(name: str, path: str, repeats: int) -> dict:
    """Median seconds of a meta-iteration on `path`, and milliseconds of self CPU time per kind of kernel."""
    model, batch, inner_lr, steps = problem(name)
    alg = MAML(model, inner_lr=inner_lr, inner_steps=steps, order=2, loss_fn=nn.functional.cross_entropy, path=path)
    for _ in range(2):  # warm-up: oneDNN primitives, allocator
        alg.meta_gradient(batch)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        alg.meta_gradient(batch)
        times.append(time.perf_counter() - t0)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        alg.meta_gradient(batch)
    ms: dict[str, float] = {}
    for event in prof.key_averages():
        if event.key.startswith("aten::"):
            ms[kind(event.key)] = ms.get(kind(event.key), 0.0) + event.self_cpu_time_total / 1e3
    return {"workload": name, "path": path, "seconds": statistics.median(times), "ms": ms}


def main(argv: list[str] | None = None) -> None:
    """Measure every workload on every path, print the table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread, load {os.getloadavg()[0]:.2f}; CPU kernels "
          f"{torch.backends.cpu.get_cpu_capability()}, oneDNN bf16 "
          f"{'yes' if paths.cpu_has_fast_bf16() else 'NO (bf16 convolutions fall back to a slow kernel)'}\n")
    kinds = [*KINDS, "other"]
    print("| workload | path | s per meta-iteration | speed-up over float32 | "
          + " | ".join(f"{k} ms" for k in kinds) + " |")
    print("|---|---|---|---|" + "---|" * len(kinds))
    for name in args.workloads:
        base = None
        for path in PATHS:
            r = measure(name, path, args.repeats)
            base = base or r["seconds"]
            print(f"| {name} | {path} | {r['seconds']:.3f} | {base / r['seconds']:.2f}x | "
                  + " | ".join(f"{r['ms'].get(k, 0.0):.0f}" for k in kinds) + " |", flush=True)


if __name__ == "__main__":
    main()
