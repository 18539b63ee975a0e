"""Flower apps that carry metagrad's pure federated functions (needs the `federated` extra: flwr==1.42.0).

    client_app   ClientApp: `train` replies `client_update(...)` (the update as an ArrayRecord, its size as
                 "num-examples"), `evaluate` replies `client_evaluate(...)`; per-client state in `context.state`
    server_app   ServerApp: builds the algorithm and a `Server` from the run config, resumes from its
                 checkpoint if there is one, and runs `MetaStrategy`
    MetaStrategy a Flower strategy whose aggregation is `Server.round` (size-weighted, bad updates rejected,
                 the server's SGD/Adam step) and which checkpoints the server after every round

The run config (the app's pyproject `[tool.flwr.app.config]`) names what both sides build: `tasks`
(sinusoid | synthetic), `num-clients`, `seed`, `strategy` (fedavg | fedavg+ft | fedmaml | fedmaml-fo |
fedreptile | perfedavg-fo | perfedavg-hf | metasgd), `inner-lr`, `inner-steps`, `local-steps`, `beta`,
`eval-steps`, `server-optimizer` (sgd | adam), `server-lr`, `num-server-rounds`, and `out` (a folder where
the server writes `server.safetensors` and a line of `rounds.jsonl` every round). Drop-outs: `fraction-train`
of the connected nodes is sampled each round, a round waits at most `round-timeout` seconds for their replies
and counts when at least `min-train-nodes` acceptable updates came; otherwise it is retried (at most
`round-retries` times, then the run fails with the model and checkpoint of the last complete round). A
SuperNode's `--node-config "partition-id=K"` says which client it is.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

try:
    import flwr
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError("metagrad.federated.flower needs Flower: pip install 'metagrad[federated]' (flwr==1.42.0); "
                      "the pure functions of metagrad.federated work without it") from err

from metagrad.algorithms import MAML, MetaSGD, Reptile
from metagrad.federated import data as fdata
from metagrad.federated import strategies as S
from metagrad.federated.deploy import toml_value
from metagrad.models import MLP
from metagrad.runs import read_checkpoint, save_checkpoint

log = logging.getLogger("metagrad.federated")

FLWR_VERSION = "1.42.0"  # the version pinned in the `federated` extra; Flower's API moves between minor versions
if flwr.__version__ != FLWR_VERSION:  # pragma: no cover - depends on the environment
    log.warning("metagrad.federated.flower is written and tested for flwr==%s; flwr %s is installed",
                FLWR_VERSION, flwr.__version__)

DEFAULTS: dict[str, Any] = {"tasks": "sinusoid", "num-clients": 2, "seed": 0, "strategy": "fedmaml", "inner-lr": 0.01,
                            "inner-steps": 1, "local-steps": 1, "beta": 0.01, "eval-steps": 1,
                            "server-optimizer": "adam", "server-lr": 0.001, "num-server-rounds": 3, "out": "",
                            "fraction-train": 1.0, "min-train-nodes": 1, "round-timeout": 600.0, "round-retries": 2}

STRATEGIES = {
    "fedavg": lambda c: S.fedavg(c["local-steps"]),
    "fedavg+ft": lambda c: S.fedavg_finetune(c["local-steps"], c["eval-steps"]),
    "fedmaml": lambda c: S.fedmaml(2, c["eval-steps"]),
    "fedmaml-fo": lambda c: S.fedmaml(1, c["eval-steps"]),
    "fedreptile": lambda c: S.fedreptile(c["eval-steps"]),
    "perfedavg-fo": lambda c: S.perfedavg(1, c["local-steps"], beta=c["beta"], eval_steps=c["eval-steps"]),
    "perfedavg-hf": lambda c: S.perfedavg(2, c["local-steps"], beta=c["beta"], eval_steps=c["eval-steps"]),
    "metasgd": lambda c: S.metasgd(c["eval-steps"]),
}


def settings(config: Any) -> dict[str, Any]:
    """The run config with defaults for missing keys; unknown strategy or task family named in the error."""
    c = {**DEFAULTS, **{k: v for k, v in dict(config).items() if k in DEFAULTS}}
    if c["strategy"] not in STRATEGIES:
        raise ValueError(f"run config strategy must be one of {sorted(STRATEGIES)}, got {c['strategy']!r}")
    if c["tasks"] not in ("sinusoid", "synthetic"):
        raise ValueError(f"run config tasks must be 'sinusoid' or 'synthetic', got {c['tasks']!r}")
    if not 1 <= int(c["min-train-nodes"]) <= int(c["num-clients"]):
        raise ValueError(f"run config min-train-nodes must be in 1..num-clients ({c['num-clients']}), "
                         f"got {c['min-train-nodes']!r}")
    if not 0 < float(c["fraction-train"]) <= 1 or not float(c["round-timeout"]) > 0 or int(c["round-retries"]) < 0:
        raise ValueError(f"run config needs 0 < fraction-train <= 1, round-timeout > 0, round-retries >= 0; got "
                         f"{c['fraction-train']!r}, {c['round-timeout']!r}, {c['round-retries']!r}")
    return c


def build(config: Any) -> tuple[Any, S.Strategy]:
    """The algorithm (same initial weights on every node: seeded) and the strategy the run config names."""
    c = settings(config)
    torch.manual_seed(int(c["seed"]))
    if c["tasks"] == "sinusoid":
        model, loss = MLP((1, 40, 40, 1)), None
    else:
        model, loss = torch.nn.Linear(60, 10), torch.nn.functional.cross_entropy
    cls = {"fedreptile": Reptile, "metasgd": MetaSGD}.get(c["strategy"], MAML)
    kwargs = {"inner_lr": float(c["inner-lr"]), "inner_steps": int(c["inner-steps"]), "path": "loop"}
    if cls is not MetaSGD:
        kwargs["loss_fn"] = loss
    elif loss is not None:
        raise ValueError("metasgd runs here on the sinusoid tasks only")
    return cls(model, **kwargs), STRATEGIES[c["strategy"]](c)


def client_data(config: Any, partition_id: int) -> Any:
    """Client `partition_id`'s one-task data, drawn from the run's seed (every node draws the same clients)."""
    c = settings(config)
    n = int(c["num-clients"])
    if not 0 <= partition_id < n:
        raise ValueError(f"partition-id must be in 0..{n - 1} (num-clients {n}), got {partition_id}")
    g = torch.Generator().manual_seed(int(c["seed"]) + 1)
    if c["tasks"] == "sinusoid":
        clients = fdata.sinusoid_clients(n, shots=10, query_shots=10, generator=g)
    else:
        clients = fdata.synthetic_clients(1.0, 1.0, n_clients=n, generator=g)
    return list(clients.values())[partition_id]


def to_record(params: dict[str, torch.Tensor]) -> ArrayRecord:
    """Tensors as a Flower ArrayRecord (numpy arrays on the wire, dtypes kept)."""
    return ArrayRecord({n: t.detach().cpu().contiguous() for n, t in params.items()})


def from_record(record: ArrayRecord, order: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """An ArrayRecord as tensors; in `order` when it holds exactly those names (otherwise as received, so that
    `check_update` rejects the mismatch)."""
    tensors = {n: t.clone() for n, t in record.to_torch_state_dict().items()}
    order = list(order) if order is not None else None
    if order is not None and set(order) == set(tensors):
        return {n: tensors[n] for n in order}
    return tensors


client_app = ClientApp()


def _partition(context: Context) -> int:
    return int(context.node_config.get("partition-id", 0))


def _received(msg: Message, context: Context) -> tuple[dict, Any, S.Strategy, Any, dict[str, torch.Tensor]]:
    """What both client handlers start from: the run config with the round's, the algorithm and strategy it
    builds, this client's data and the meta-parameters received."""
    config = {**dict(context.run_config), **dict(msg.content.get("config", ConfigRecord()))}
    alg, strategy = build(config)
    return config, alg, strategy, client_data(config, _partition(context)), from_record(
        msg.content["arrays"], alg.meta_parameters())


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    """One client's reply in a round: `client_update` of the meta-parameters received, on its own data."""
    config, alg, strategy, data, theta = _received(msg, context)
    kept = context.state.get("metagrad", ConfigRecord())
    state = {"rounds": int(kept.get("rounds", 0))}
    update = S.client_update(strategy, alg, theta, data, int(config.get("server-round", 1)) - 1, state,
                             client=str(_partition(context)))
    context.state["metagrad"] = ConfigRecord({"rounds": state["rounds"], "last-round": state["last_round"]})
    metrics = {"num-examples": update.size, "partition-id": _partition(context), "client-rounds": state["rounds"],
               **update.metrics}
    return Message(content=RecordDict({"arrays": to_record(update.update), "metrics": MetricRecord(metrics)}),
                   reply_to=msg)


@client_app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """A client's query loss after `eval-steps` local steps on its support split."""
    _, alg, strategy, data, theta = _received(msg, context)
    metrics = S.client_evaluate(strategy, alg, theta, data)
    return Message(content=RecordDict({"metrics": MetricRecord({"num-examples": S.client_size(data), **metrics})}),
                   reply_to=msg)


class MetaStrategy(FedAvg):
    """Flower's messages, metagrad's aggregation: `Server.round` on the replies, then the new meta-parameters go
    out; the server is checkpointed to `checkpoint` and the round logged to `log_path` (JSON lines) after every
    round. `start` bounds every round by `round_timeout` seconds (a dropped node never stalls it), steps only when
    at least `min_train_nodes` acceptable updates came and retries the round otherwise (`round_retries` times)."""

    def __init__(self, server: S.Server, checkpoint: str | Path | None = None, round_timeout: float = 600.0,
                 round_retries: int = 2, log_path: str | Path | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.server = server
        self.checkpoint = Path(checkpoint) if checkpoint else None
        self.log_path = Path(log_path) if log_path else None
        self.round_timeout, self.round_retries = float(round_timeout), int(round_retries)
        self.reports: list[dict[str, Any]] = []

    def updates(self, replies: Iterable[Message]) -> list[S.ClientUpdate]:
        """The replies without a Flower error as `ClientUpdate`s named by partition id (else node id); a reply
        without an update or size is rejected here, the rest by `check_update` in `Server.round`."""
        valid, _ = self._check_and_log_replies(replies, is_train=True, validate=False)
        updates = []
        for msg in valid:
            name = str(msg.metadata.src_node_id)
            try:
                metrics = msg.content["metrics"]
                name = str(int(metrics["partition-id"])) if "partition-id" in metrics else name
                size = metrics["num-examples"]
                updates.append(S.ClientUpdate(from_record(msg.content["arrays"], self.server.params),
                                              int(size) if float(size) == int(size) else -1,
                                              {k: float(v) for k, v in metrics.items() if k == "meta_loss"}, name))
            except (KeyError, TypeError, ValueError) as err:
                log.warning("rejected the reply of node %s: %s", name, err)
        return updates

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None,
                                                                                      MetricRecord | None]:
        """One server step on the acceptable updates, or none (arrays None) when fewer than `min_train_nodes`."""
        updates = self.updates(replies)
        reference = {n: p.detach() for n, p in self.server.params.items()}
        good = sum(S.check_update(u, reference) is None for u in updates)
        if good < self.min_train_nodes:
            log.warning("round %d: %d acceptable updates of %d replies, %d needed: the model is not stepped",
                        server_round, good, len(updates), self.min_train_nodes)
            return None, MetricRecord({"accepted": good, "rejected": len(updates) - good})
        report = self.server.round(updates)
        self.reports.append(report)
        if self.checkpoint is not None:
            save_checkpoint(self.checkpoint, self.server.state())
        metrics = MetricRecord({"accepted": len(report["accepted"]), "rejected": len(report["rejected"]),
                                **{k: v for k, v in report.items() if k == "meta_loss"}})
        return to_record(self.server.weights()), metrics

    def _nodes(self, grid: Grid, wait_for: int, deadline: float) -> list[int]:
        """A `fraction_train` sample (at least `min_train_nodes`) of the connected nodes, once `wait_for` are
        connected or at `deadline` (then [] if fewer than `min_train_nodes` are)."""
        while len(nodes := sorted(grid.get_node_ids())) < wait_for and time.monotonic() < deadline:
            time.sleep(1.0)
        if len(nodes) < self.min_train_nodes:
            return []
        return sorted(random.sample(nodes, max(self.min_train_nodes, int(len(nodes) * self.fraction_train))))

    def start(self, grid: Grid, num_rounds: int, wait_for: int = 0) -> list[dict[str, Any]]:  # type: ignore[override]
        """Take `num_rounds` server steps (Flower's own `start` counts attempts, not steps); returns their reports.

        Each attempt at a round samples the connected nodes (the first waits up to `round_timeout` for `wait_for`
        of them), sends the meta-parameters and waits at most `round_timeout` seconds; late and missing replies
        are left out. The nodes that replied then evaluate the new model (same bound). Raises RuntimeError when
        a round fails `round_retries + 1` times: the model and checkpoint stay at the last complete round.
        """
        reports = []
        for _ in range(num_rounds):
            t0, round_no = time.monotonic(), self.server.rounds + 1  # 1-based, counted across restarts
            for attempt in range(1, self.round_retries + 2):
                deadline = time.monotonic() + self.round_timeout
                nodes = self._nodes(grid, wait_for, deadline)
                wait_for = 0
                config = ConfigRecord({"server-round": round_no})
                record = RecordDict({"arrays": to_record(self.server.weights()), "config": config})
                replies = list(grid.send_and_receive(self._construct_messages(record, nodes, MessageType.TRAIN),
                                                     timeout=max(0.0, deadline - time.monotonic()))) if nodes else []
                arrays, metrics = self.aggregate_train(round_no, replies)
                if arrays is not None:
                    break
                log.warning("round %d, attempt %d: %d replies without error from %d sampled nodes (timeout %.0f s); %s",
                            round_no, attempt, sum(not m.has_error() for m in replies), len(nodes),
                            self.round_timeout, "retrying" if attempt <= self.round_retries else "giving up")
            else:
                raise RuntimeError(f"round {round_no} failed {self.round_retries + 1} times (fewer than "
                                   f"{self.min_train_nodes} acceptable updates within {self.round_timeout} s each); "
                                   f"the model and checkpoint stay at round {self.server.rounds}")
            report = {**self.reports[-1], "round": round_no, "attempts": attempt, "sampled": len(nodes),
                      "train_seconds": time.monotonic() - t0}
            repliers = [m.metadata.src_node_id for m in replies if not m.has_error()]
            evaluation = RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": round_no})})
            evaluated = grid.send_and_receive(self._construct_messages(evaluation, repliers, MessageType.EVALUATE),
                                              timeout=self.round_timeout)
            eval_metrics = self.aggregate_evaluate(round_no, evaluated)
            if eval_metrics is not None:
                report.update({f"eval_{k}": float(v) for k, v in eval_metrics.items() if k != "num-examples"})
            report["seconds"] = time.monotonic() - t0
            if self.log_path is not None:
                with open(self.log_path, "a") as fh:
                    fh.write(json.dumps(report) + "\n")
            log.info("round %d done in %.1f s (attempts %d): accepted %s", round_no, report["seconds"], attempt,
                     report["accepted"])
            reports.append(report)
        return reports


server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    """Build the algorithm and server from the run config, resume from `out/server.safetensors`, run the rounds."""
    c = settings(context.run_config)
    alg, _ = build(c)
    server = S.Server({n: p.detach() for n, p in alg.meta_parameters().items()}, c["server-optimizer"],
                      float(c["server-lr"]))
    out = Path(c["out"]) if c["out"] else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    checkpoint = out / "server.safetensors" if out is not None else None
    if checkpoint is not None and checkpoint.is_file():
        server.load_state(read_checkpoint(checkpoint))
        log.warning("resumed the server from %s at round %d", checkpoint, server.rounds)
    rounds = int(c["num-server-rounds"]) - server.rounds
    n, least = int(c["num-clients"]), int(c["min-train-nodes"])
    strategy = MetaStrategy(server, checkpoint, float(c["round-timeout"]), int(c["round-retries"]),
                            out / "rounds.jsonl" if out is not None else None,
                            fraction_train=float(c["fraction-train"]), min_train_nodes=least,
                            min_evaluate_nodes=1, min_available_nodes=least)
    if rounds > 0:
        strategy.start(grid, rounds, wait_for=n)


def write_app(folder: str | Path, **config: Any) -> Path:
    """A Flower app folder whose components are this module's apps: a hand-written `pyproject.toml`
    (`flwr new` would fetch a template from the network). `config` overrides `DEFAULTS` in its run config."""
    c = settings({k.replace("_", "-"): v for k, v in config.items()})

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["[build-system]", 'requires = ["hatchling"]', 'build-backend = "hatchling.build"', "",
             "[project]", 'name = "metagrad-federated-app"', 'version = "1.0.0"',
             "# metagrad (and flwr) are already installed where the nodes run: nothing is installed at run time",
             "dependencies = []", "", "[tool.hatch.build.targets.wheel]", 'packages = ["."]', "",
             "[tool.flwr.app]", 'publisher = "metagrad"', "", "[tool.flwr.app.components]",
             'serverapp = "metagrad.federated.flower:server_app"',
             'clientapp = "metagrad.federated.flower:client_app"', "", "[tool.flwr.app.config]"]
    lines += [f"{k} = {toml_value(v)}" for k, v in c.items()]
    (folder / "pyproject.toml").write_text("\n".join(lines) + "\n")
    return folder
