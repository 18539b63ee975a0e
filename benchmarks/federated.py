"""Federated meta-learning throughput: rounds per second and bytes per round for 10 and 100 clients, and the wall
time of a deployment run (a SuperLink and 4 SuperNodes on loopback, 20 rounds).

    OMP_NUM_THREADS=1 python benchmarks/federated.py                    # all three engines
    python benchmarks/federated.py --skip-deployment --rounds 3

Task: FedMAML (order 2) on sinusoid clients (MLP 1-40-40-1, 10 support + 10 query points each), server Adam.
Engines: `in-process` (metagrad's `run_round`: `client_update` per client, `Server.round`); `flower-simulation`
(`flwr.simulation.run_simulation`, Ray; runs only where `ray` is installed, else the reason is printed);
`deployment` (`metagrad.federated.deploy.Loopback`: separate processes over HTTP, a clientapp process per
message). Bytes per round: the Flower messages of one round serialized as Flower sends them (every nested
object's `deflate()`: the server's train message to each client and each client's reply), down + up; the
HTTP framing on top is not counted. Evaluation messages are not counted (the in-process engine has none).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from metagrad import federated as fed
from metagrad.federated import flower as F


def round_bytes(cfg: dict, clients: int) -> tuple[int, int]:
    """(down, up) bytes of one round's serialized train messages and replies, summed over `clients`."""
    from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    alg, _ = F.build(cfg)
    weights = F.to_record({n: p.detach() for n, p in alg.meta_parameters().items()})

    def size(msg: Message) -> int:
        return sum(len(o.deflate()) for o in get_all_nested_objects(msg).values())

    down = up = 0
    for k in range(clients):
        msg = Message(content=RecordDict({"arrays": weights, "config": ConfigRecord({"server-round": 1})}),
                      dst_node_id=100 + k, message_type=MessageType.TRAIN)
        ctx = Context(run_id=1, node_id=100 + k, node_config={"partition-id": k}, state=RecordDict(), run_config=cfg)
        down += size(msg)
        up += size(F.train(msg, ctx))
    return down, up


def in_process(cfg: dict, rounds: int) -> float:
    """Seconds per round of `run_round` over every client (the median of `rounds` rounds)."""
    alg, strategy = F.build(cfg)
    clients = {str(k): F.client_data(cfg, k) for k in range(cfg["num-clients"])}
    server = fed.Server({n: p.detach() for n, p in alg.meta_parameters().items()}, "adam", cfg["server-lr"])
    fed.run_round(server, strategy, alg, clients)  # warm-up
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fed.run_round(server, strategy, alg, clients)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def simulation(cfg: dict, rounds: int) -> tuple[float | None, str]:
    """Wall seconds of `run_simulation` for `rounds` rounds (Ray start included), or None and why it did not run."""
    try:
        import ray  # noqa: F401
    except ImportError:
        return None, "ray not installed (pip install 'flwr[simulation]==1.42.0')"
    from flwr.app import Context
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    # run_simulation takes no run config and a Context's run_config cannot be changed: these apps hand metagrad's
    # functions a Context with ours (and the node's own state, so per-client state still persists)
    run_cfg = {**cfg, "num-server-rounds": rounds, "round-timeout": 600.0}
    client_app, server_app = ClientApp(), ServerApp()

    def ours(context: Context) -> Context:
        return Context(run_id=context.run_id, node_id=context.node_id, node_config=context.node_config,
                       state=context.state, run_config=run_cfg)

    @client_app.train()
    def train(msg, context):
        return F.train(msg, ours(context))

    @client_app.evaluate()
    def evaluate(msg, context):
        return F.evaluate(msg, ours(context))

    @server_app.main()
    def main(grid, context):
        F.main(grid, ours(context))

    t0 = time.perf_counter()
    try:
        run_simulation(server_app, client_app, num_supernodes=cfg["num-clients"],
                       backend_config={"client_resources": {"num_cpus": 1}})
    except Exception as err:  # noqa: BLE001 - the reason is the result here
        return None, f"failed: {type(err).__name__}: {str(err)[:200]}"
    return time.perf_counter() - t0, "Ray start included"


def deployment(cfg: dict, rounds: int, nodes: int, folder: Path) -> tuple[float, float]:
    """(wall seconds of `flwr run` for `rounds` rounds, median seconds per round from rounds.jsonl)."""
    import json

    from metagrad.federated import deploy

    run_cfg = {**cfg, "num-clients": nodes, "num-server-rounds": rounds, "out": str(folder / "out")}
    app = F.write_app(folder / "app", **{k.replace("-", "_"): v for k, v in run_cfg.items()})
    with deploy.Loopback(folder / "nodes", nodes) as link:
        t0 = time.perf_counter()
        link.run(app, timeout=3000)
        wall = time.perf_counter() - t0
    per_round = sorted(json.loads(x)["seconds"] for x in (folder / "out" / "rounds.jsonl").read_text().splitlines())
    return wall, per_round[len(per_round) // 2]


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[10, 100])
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds in process and in the simulation")
    ap.add_argument("--deployment-rounds", type=int, default=20)
    ap.add_argument("--nodes", type=int, default=4, help="SuperNodes of the deployment run")
    ap.add_argument("--skip-simulation", action="store_true")
    ap.add_argument("--skip-deployment", action="store_true")
    args = ap.parse_args()
    base = {"strategy": "fedmaml", "server-optimizer": "adam", "server-lr": 0.001, "inner-lr": 0.01}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; FedMAML order 2, MLP 1-40-40-1, "
          f"sinusoid clients 10+10 points")
    rows = []
    for n in args.clients:
        cfg = {**base, "num-clients": n}
        down, up = round_bytes(cfg, n)
        s = in_process(cfg, args.rounds)
        rows.append(("in-process", n, args.rounds, 1 / s, s, down, up, "median round"))
        if not args.skip_simulation:
            wall, note = simulation(cfg, args.rounds)
            rows.append(("flower-simulation", n, args.rounds, None if wall is None else args.rounds / wall,
                         None if wall is None else wall / args.rounds, down, up, note))
    if not args.skip_deployment:
        cfg = {**base, "num-clients": args.nodes}
        down, up = round_bytes(cfg, args.nodes)
        with tempfile.TemporaryDirectory() as tmp:
            wall, median = deployment(cfg, args.deployment_rounds, args.nodes, Path(tmp))
        rows.append(("deployment (loopback)", args.nodes, args.deployment_rounds, args.deployment_rounds / wall,
                     wall / args.deployment_rounds, down, up,
                     f"wall {wall:.0f} s for the run (ServerApp start included); median round {median:.1f} s"))
    print("\n| engine | clients | rounds | rounds/s | s/round | bytes/round down | bytes/round up | note |")
    print("|---|---|---|---|---|---|---|---|")
    for engine, n, r, rps, spr, down, up, note in rows:
        print(f"| {engine} | {n} | {r} | {_num(rps)} | {_num(spr)} | {down:,} | {up:,} | {note} |")


if __name__ == "__main__":
    main()
