"""What a federated round costs a client: bytes on the wire against local compute, FedMAML order 2 against order 1.

Claim (the systems claim of FedMAML, Chen et al. 2018, and of first-order MAML): per round each client
uploads one vector of the model's size for FedMAML and first-order FedMAML alike, while the local compute
differs: order 2 differentiates through the inner steps. For a network whose FLOPs are its matrix products
(what `torch.utils.flop_counter.FlopCounterMode` counts), with F the forward FLOPs on the support set, f1
those of the first layer (whose input needs no gradient), k inner steps, and Q = 3 F_q - f1_q the query
forward and backward:

    order 1:  k (3 F - f1) + Q          each inner step a forward (F) and a backward (2 F - f1)
    order 2:  k (9 F - 5 f1) + Q        plus the backward through each step's forward and backward
                                        (2 F - f1, and 4 F - 3 f1 for the backward's two products per layer)

so with f1 << F the ratio goes from about 2 (k = 1) toward 3 (k large); a single linear layer (f1 = F) gives
(4k + 2) / (2k + 2). Measured here (torch 2.13): exact for the MLPs; for
the Conv4 (Omniglot) order 1 is exact and order 2 counts about 5% more than this (about one extra convolution
of the second layer's size per inner step in PyTorch's double backward), so the claim reports measured/analytic.

    for each strategy and k in inner_steps, on `clients` training clients:
        bytes   Flower's serialized train instruction (down) and reply (up) (federated_common.wire_bytes)
        FLOPs   FlopCounterMode around client_update
        seconds median wall time of `repeats` client_updates (one thread unless OMP_NUM_THREADS says more)
        memory  peak of the bytes torch's CPU allocator holds during client_update: torch.profiler with
                profile_memory, net allocations of every op cumulated in start order (not the process RSS)
    ratios against first-order FedMAML at the same k; the analytic FLOPs of FedMAML beside the measured
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from metagrad import core
from metagrad import federated as fed
from metagrad.evaluation import mean_ci95
from metagrad.experiments import experiment
from metagrad.experiments.federated_common import (
    STRATEGIES,
    Federation,
    algorithm,
    federation,
    local_data,
    strategy,
    wire_bytes,
)
from metagrad.runs import Run


@dataclass
class CostConfig:
    family: str = "sinusoid"        # sinusoid | synthetic | digits | medicine | omniglot
    inner_steps: tuple[int, ...] = (1, 5)
    inner_lr: float = 0.01
    local_steps: int = 1            # FedAvg's local epochs and Per-FedAvg's local steps
    strategies: tuple[str, ...] = tuple(s for s in STRATEGIES if s != "fedavg+ft")  # FedAvg+FT trains as FedAvg
    clients: int = 5                # training clients measured (mean and 95% CI over them)
    repeats: int = 10               # timed client updates per client (median)
    seed: int = 0
    ways: int = 5                   # omniglot
    shots: int = 1                  # omniglot
    hidden: int = 32                # digits MLP width, omniglot Conv4 filters
    data: str = ""                  # folder holding omniglot/; "": $METAGRAD_DATA


def flops(fn) -> int:
    """Matrix-product FLOPs of `fn()` as torch's FlopCounterMode counts them."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def peak_bytes(fn) -> int:
    """Peak of the bytes torch's CPU allocator holds during `fn()` beyond what it held before: the profiler's net
    allocation of every op (its own, children excluded), cumulated in order of start."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, profile_memory=True) as prof:
        fn()
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return int(peak)


def seconds(fn, repeats: int) -> float:
    """Median wall time of `repeats` calls of `fn()` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def forward_flops(model: torch.nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """(F, f1): forward FLOPs of `model` on `x [n, ...]` and of its first layer with parameters alone."""
    first = next(m for m in model.modules() if not list(m.children()) and list(m.parameters(recurse=False)))
    with torch.no_grad():
        return flops(lambda: model(x)), flops(lambda: first(x))


def analytic_flops(model: torch.nn.Module, data: core.TaskBatch, steps: int, order: int) -> int:
    """FedMAML's client FLOPs by the count in this module's docstring (matrix products only)."""
    F, f1 = forward_flops(model, data.support_x[0])
    Fq, f1q = forward_flops(model, data.query_x[0])
    per_step = 9 * F - 5 * f1 if order == 2 else 3 * F - f1
    return steps * per_step + 3 * Fq - f1q


def measure(cfg: CostConfig, name: str, steps: int, fedn: Federation, clients: list[core.TaskBatch]) -> dict:
    """Bytes, FLOPs, seconds and peak memory of strategy `name` at `steps` inner steps on every client."""
    alg = algorithm(name, fedn, cfg.inner_lr, steps, cfg.seed)
    strat = strategy(name, steps, cfg.local_steps, beta=cfg.inner_lr)
    theta = {n: p.detach().clone() for n, p in alg.meta_parameters().items()}
    rows = []
    for data in clients:
        def update(data: core.TaskBatch = data) -> fed.ClientUpdate:
            return fed.client_update(strat, alg, theta, data)

        u = update()
        wire = wire_bytes(theta, u)
        row = {"flops": flops(update), "seconds": seconds(update, cfg.repeats), "peak_bytes": peak_bytes(update),
               **wire}
        if strat.kind == "fedmaml" and name != "metasgd":
            row["analytic_flops"] = analytic_flops(alg.model, data, steps, strat.order)
        rows.append(row)
    params = sum(t.numel() for t in theta.values())
    return {"strategy": name, "inner_steps": steps, "parameters": params,
            "parameter_bytes": sum(t.numel() * t.element_size() for t in theta.values()),
            **{k: [r[k] for r in rows] for k in rows[0]}}


def run_cost(cfg: CostConfig, run: Run) -> dict:
    fedn = federation(cfg.family, n_clients=max(cfg.clients, 1), n_new=1, seed=cfg.seed, ways=cfg.ways,
                      shots=cfg.shots, hidden=cfg.hidden, data=cfg.data)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    clients = [local_data(c, g) for c in list(fedn.train.values())[:cfg.clients]]
    results = [measure(cfg, name, k, fedn, clients) for k in cfg.inner_steps for name in cfg.strategies]
    by = {(r["strategy"], r["inner_steps"]): r for r in results}
    rows = []
    for r in results:
        ref = by.get(("fedmaml-fo", r["inner_steps"]))
        row = {"strategy": r["strategy"], "k": r["inner_steps"], "parameters": r["parameters"],
               "bytes up": round(statistics.mean(r["up"])), "update ArrayRecord bytes": round(statistics.mean(
                   r["up_arrays"])), "bytes down": round(statistics.mean(r["down"])),
               "MFLOPs": float(f"{statistics.mean(r['flops']) / 1e6:.4g}")}
        s, ci = mean_ci95(torch.tensor(r["seconds"]))
        row["ms per client"] = f"{1e3 * s:.3f} ± {1e3 * ci:.3f}"
        row["peak KiB"] = round(statistics.mean(r["peak_bytes"]) / 1024, 1)
        if "analytic_flops" in r:
            row["analytic MFLOPs"] = float(f"{statistics.mean(r['analytic_flops']) / 1e6:.4g}")
        if ref is not None:
            for key, col in (("up", "bytes"), ("flops", "FLOPs"), ("seconds", "time"), ("peak_bytes", "memory")):
                row[f"{col} / FO-FedMAML"] = round(statistics.mean(r[key]) / statistics.mean(ref[key]), 3)
        rows.append(row)
    plot(run, rows, cfg)
    claim = {}
    for k in cfg.inner_steps:
        o2, o1 = by.get(("fedmaml", k)), by.get(("fedmaml-fo", k))
        if o2 is None or o1 is None:
            continue
        ratio = statistics.mean(o2["flops"]) / statistics.mean(o1["flops"])
        expected = statistics.mean(o2["analytic_flops"]) / statistics.mean(o1["analytic_flops"])
        claim[f"k={k}"] = {
            "bytes_up_equal": o2["up"] == o1["up"], "bytes_up": o2["up"][0],
            "model_bytes": o2["parameter_bytes"],
            "flops_ratio": ratio, "analytic_flops_ratio": expected,
            "order1_flops_over_analytic": statistics.mean(o1["flops"]) / statistics.mean(o1["analytic_flops"]),
            "order2_flops_over_analytic": statistics.mean(o2["flops"]) / statistics.mean(o2["analytic_flops"]),
            "seconds_ratio": statistics.mean(o2["seconds"]) / statistics.mean(o1["seconds"]),
            "memory_ratio": statistics.mean(o2["peak_bytes"]) / statistics.mean(o1["peak_bytes"]),
        }
    return {"table": rows, "measurements": results, "claim": claim,
            "note": (f"{cfg.family} clients, {cfg.clients} measured, one client update each (k inner steps at "
                     f"inner_lr {cfg.inner_lr}). Bytes: Flower {_flwr_version()} serde of the train instruction and "
                     "of the reply (message_to_proto, gRPC framing not counted). FLOPs: FlopCounterMode (matrix "
                     "products). Time: median of "
                     f"{cfg.repeats} calls, {torch.get_num_threads()} thread(s), on a shared, loaded machine. "
                     "Memory: peak of torch's CPU allocations during the update (torch.profiler profile_memory), "
                     "not the process RSS.")}


def _flwr_version() -> str:
    import flwr

    return flwr.__version__


def plot(run: Run, rows: list[dict], cfg: CostConfig) -> None:
    import matplotlib.pyplot as plt

    cols = [c for c in ("FLOPs / FO-FedMAML", "time / FO-FedMAML", "memory / FO-FedMAML", "bytes / FO-FedMAML")
            if all(c in r for r in rows)]
    fig, axes = plt.subplots(1, len(cols), figsize=(3.6 * len(cols), 3.6), squeeze=False)
    names = list(dict.fromkeys(r["strategy"] for r in rows))
    width = 0.8 / len(cfg.inner_steps)
    for ax, col in zip(axes[0], cols):
        for j, k in enumerate(cfg.inner_steps):
            values = [next(r[col] for r in rows if r["strategy"] == n and r["k"] == k) for n in names]
            ax.bar([i + j * width for i in range(len(names))], values, width, label=f"k={k}")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks([i + width * (len(cfg.inner_steps) - 1) / 2 for i in range(len(names))], names, rotation=60,
                      fontsize=7)
        ax.set(title=col, ylabel="ratio")
        ax.legend(fontsize=7)
    fig.suptitle(f"a client's round, {cfg.family}: cost against first-order FedMAML")
    fig.tight_layout()
    run.save_figure(fig, "federated_cost")


experiment("federated-cost", "per round a client uploads one model-sized vector for FedMAML order 2 and order 1 "
           "alike (Flower's serialized bytes) while FLOPs, time and memory differ: ratios, every strategy",
           CostConfig)(run_cost)
