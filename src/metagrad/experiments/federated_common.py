"""What the federated experiments share: the client families, the model and algorithm per strategy, bytes on the wire.

    federation(family, ...)      training clients, new (held-out) clients, the model, the loss, the metric
    algorithm(strategy, ...)     MAML for every strategy but FedReptile (Reptile) and Meta-SGD (MetaSGD)
    wire_bytes(params, ...)      the size of the Flower messages of a round: the server's instruction (the
                                 meta-parameters and the round's config) and a client's reply (its update and
                                 metrics), each built as metagrad.federated.flower builds it and serialized by
                                 Flower's own serde (`message_to_proto(...).ByteSize()`); gRPC framing not counted

A client is a one-task `TaskBatch` (fixed local data) or, for Omniglot alphabets, a task family whose
`sample(1, generator)` is the episode it trains on in a round: `local_data(client, generator)`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from metagrad import federated as fed
from metagrad.algorithms import MAML, MetaSGD, Reptile
from metagrad.algorithms.base import Algorithm
from metagrad.core import TaskBatch
from metagrad.federated import data as fdata
from metagrad.models import MLP

FAMILIES = ("sinusoid", "synthetic", "digits", "medicine", "omniglot")
STRATEGIES = ("fedavg", "fedavg+ft", "fedmaml", "fedmaml-fo", "fedreptile", "perfedavg-fo", "perfedavg-hf",
              "metasgd")


@dataclass
class Federation:
    """Training clients and new clients (name -> one-task TaskBatch or episodic family), the model and its loss."""

    family: str
    train: dict[str, Any]
    new: dict[str, Any]
    model: Callable[[], nn.Module]
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None  # None: the algorithms' default (MSE)
    metric: str  # "accuracy" (higher is better) or "loss" (lower is better)


def federation(family: str, n_clients: int = 30, n_new: int = 20, seed: int = 0, ways: int = 5, shots: int = 1,
               hidden: int = 32, data: str = "") -> Federation:
    """The clients of `family` (one of FAMILIES): `n_clients` to train on, `n_new` held out (Omniglot: the 30
    background alphabets and the 20 evaluation alphabets, whatever the counts)."""
    g = torch.Generator().manual_seed(seed)

    def split(clients: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        names = list(clients)
        return {n: clients[n] for n in names[:n_clients]}, {n: clients[n] for n in names[n_clients:]}

    ce = nn.functional.cross_entropy
    if family == "sinusoid":
        train, new = split(fdata.sinusoid_clients(n_clients + n_new, shots=10, query_shots=10, generator=g))
        return Federation(family, train, new, lambda: MLP((1, 40, 40, 1)), None, "loss")
    if family == "synthetic":  # synthetic(1, 1): every device its own W_k, b_k and input mean
        train, new = split(fdata.synthetic_clients(1.0, 1.0, n_clients + n_new, generator=g))
        return Federation(family, train, new, lambda: nn.Linear(60, 10), ce, "accuracy")
    if family == "digits":
        train, new = split(fdata.digits_clients(n_clients + n_new, concentration=0.5, generator=g))
        return Federation(family, train, new, lambda: MLP((64, hidden, 10)), ce, "accuracy")
    if family == "medicine":
        train, new = split(fdata.medicine_clients(n_clients + n_new, generator=g))
        return Federation(family, train, new, lambda: nn.Linear(4, 1), None, "loss")
    if family == "omniglot":
        from metagrad.models import Conv4

        root = data or None
        train = fdata.omniglot_clients("background", ways, shots, shots, root=root)
        new = fdata.omniglot_clients("evaluation", ways, shots, shots, root=root)
        return Federation(family, train, new, lambda: Conv4(ways, hidden=hidden), ce, "accuracy")
    raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")


def local_data(client: Any, generator: torch.Generator) -> TaskBatch:
    """A client's data for one round: its fixed split, or a fresh episode of an episodic client."""
    return client if isinstance(client, TaskBatch) else client.sample(1, generator)


def strategy(name: str, eval_steps: int, local_steps: int = 1, beta: float = 0.01) -> fed.Strategy:
    """The strategy `name` (one of STRATEGIES), every one evaluated after `eval_steps` local steps except plain
    FedAvg (its global model as it is)."""
    makers = {
        "fedavg": lambda: fed.fedavg(local_steps),
        "fedavg+ft": lambda: fed.fedavg_finetune(local_steps, eval_steps),
        "fedmaml": lambda: fed.fedmaml(2, eval_steps),
        "fedmaml-fo": lambda: fed.fedmaml(1, eval_steps),
        "fedreptile": lambda: fed.fedreptile(eval_steps),
        "perfedavg-fo": lambda: fed.perfedavg(1, local_steps, beta=beta, eval_steps=eval_steps),
        "perfedavg-hf": lambda: fed.perfedavg(2, local_steps, beta=beta, eval_steps=eval_steps),
        "metasgd": lambda: fed.metasgd(eval_steps),
    }
    if name not in makers:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {name!r}")
    return makers[name]()


def algorithm(name: str, fedn: Federation, inner_lr: float, inner_steps: int, seed: int) -> Algorithm:
    """The client algorithm of strategy `name` on a fresh model with the initial weights of `seed`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = fedn.model()
    if name == "fedreptile":
        return Reptile(model, inner_lr=inner_lr, inner_steps=inner_steps, loss_fn=fedn.loss_fn, path="loop")
    if name == "metasgd":
        return MetaSGD(model, inner_lr=inner_lr, inner_steps=inner_steps, loss_fn=fedn.loss_fn, path="loop")
    return MAML(model, inner_lr=inner_lr, inner_steps=inner_steps, loss_fn=fedn.loss_fn, path="loop")


def wire_bytes(params: dict[str, Tensor], update: fed.ClientUpdate, server_round: int = 1) -> dict[str, int]:
    """Bytes of one round's two Flower messages for one client, by Flower's serde: `down` (the server's train
    instruction: `params` as an ArrayRecord and the round's ConfigRecord), `up` (the reply as the ClientApp
    sends it: the update as an ArrayRecord, its size and metrics as a MetricRecord) and `up_arrays` (the
    update's ArrayRecord alone). Needs flwr (the `federated` extra)."""
    from flwr.app import ConfigRecord, Metadata, MetricRecord, RecordDict
    from flwr.app.message.message import make_message
    from flwr.common.serde import array_record_to_proto, message_to_proto

    from metagrad.federated.flower import to_record

    def message(content: RecordDict, src: int, dst: int, reply_to: str) -> int:
        # Identifiers of the sizes Flower gives them (64-bit ids, 64-hex message ids).
        meta = Metadata(run_id=2 ** 63 - 1, message_id="f" * 64, src_node_id=src, dst_node_id=dst,
                        reply_to_message_id=reply_to, group_id=str(server_round), created_at=time.time(),
                        ttl=43200.0, message_type="train")
        return message_to_proto(make_message(meta, content)).ByteSize()

    server, node = 1, 2 ** 63 - 1
    down = message(RecordDict({"arrays": to_record(params), "config": ConfigRecord({"server-round": server_round})}),
                   server, node, "")
    arrays = to_record(update.update)
    metrics = MetricRecord({"num-examples": update.size, "client-rounds": server_round, **update.metrics})
    up = message(RecordDict({"arrays": arrays, "metrics": metrics}), node, server, "f" * 64)
    return {"down": down, "up": up, "up_arrays": array_record_to_proto(arrays).ByteSize()}
