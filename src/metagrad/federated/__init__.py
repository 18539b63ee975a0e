"""Federated meta-learning: each client holds its own data and is one task; a round is one meta-iteration.

The algorithm lives in pure functions (`strategies`): `client_update` (a client's update and size from
the meta-parameters and its local split), `aggregate` (size-weighted, bad updates rejected) and
`Server` (the server's optimizer step, SGD or Adam, state kept across rounds, checkpointable).
Client data that needs no download: `data`. Importing this package does not import Flower (the
optional `federated` extra).
"""

from metagrad.federated.strategies import (
    ClientUpdate,
    Server,
    Strategy,
    aggregate,
    check_update,
    client_evaluate,
    client_size,
    client_update,
    fedavg,
    fedavg_finetune,
    fedmaml,
    fedreptile,
    hessian_vector_product,
    metasgd,
    perfedavg,
    run_round,
)

__all__ = ["ClientUpdate", "Server", "Strategy", "aggregate", "check_update", "client_evaluate", "client_size",
           "client_update", "fedavg", "fedavg_finetune", "fedmaml", "fedreptile", "hessian_vector_product",
           "metasgd", "perfedavg", "run_round"]
