"""Federated meta-learning as pure functions: a client update, a server aggregation, a server step.

Each client holds its own data and is one task: a one-task `TaskBatch` (or `Tasks`) whose support and
query parts are its local split. A round is one meta-iteration:

    server:  theta (the meta-parameters, named and ordered as `alg.meta_parameters()`)
    client:  update_k, n_k = client_update(strategy, alg, theta, data_k, state_k)
    server:  g = sum_k n_k update_k / sum_k n_k        (bad updates rejected first, nothing half-applied)
             theta <- server optimizer step with gradient g   (SGD or Adam; its state kept across rounds)

What a client returns, by strategy (the server's optimizer then steps with it as a gradient):

    FedAvg          theta - theta_k      theta_k: `local_steps` inner-optimizer steps on all local data
                                         (support and query); server SGD with lr 1 is FedAvg exactly
    FedAvg+FT       as FedAvg; evaluated after `eval_steps` local fine-tuning steps on the support split
    FedMAML         alg.meta_gradient of the client's one-task batch (order 2: exact MAML)
    FedMAML (FO)    the same at order 1 (first-order MAML)
    FedReptile      alg.meta_gradient of a Reptile algorithm: theta - W_k
    Per-FedAvg      (Fallah, Mokhtari & Ozdaglar 2020) `local_steps` steps of
                        tmp = w - alpha grad f(w; D);  w <- w - beta * (I - alpha H(w; D'')) grad f(tmp; D')
                    D = support, D' = query, D'' = support; first order drops the Hessian term, Hessian-free
                    uses the exact Hessian-vector product (double backward); returns (theta - w) / beta
    Meta-SGD        FedMAML on a `MetaSGD` algorithm: the learned rates are meta-parameters, aggregated too

Nothing here imports Flower: the Flower apps only carry these functions and tensors.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from metagrad import core
from metagrad.algorithms.base import Algorithm, pooled
from metagrad.algorithms.reptile import Reptile

log = logging.getLogger("metagrad.federated")

Params = dict[str, Tensor]

KINDS = ("fedavg", "fedmaml", "fedreptile", "perfedavg")


@dataclass(frozen=True)
class Strategy:
    """What a client computes in a round (`kind`) and how clients are evaluated (`eval_steps`).

    kind: 'fedavg', 'fedmaml', 'fedreptile' or 'perfedavg'. order: 1 or 2 for FedMAML (None: the
    algorithm's own) and for Per-FedAvg (1: first order, 2: Hessian-free with an exact Hessian-vector
    product). local_steps: local epochs (FedAvg) or local steps (Per-FedAvg), each on the full local
    data. alpha, beta: Per-FedAvg's rates (alpha None: the algorithm's inner_lr). eval_steps: local
    fine-tuning steps on the support split before a client's query loss is measured.
    """

    name: str
    kind: str
    order: int | None = None
    local_steps: int = 1
    alpha: float | None = None
    beta: float = 0.01
    eval_steps: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Strategy.kind must be one of {KINDS}, got {self.kind!r}")
        if self.order not in (None, 1, 2):
            raise ValueError(f"Strategy.order must be None, 1 or 2, got {self.order!r}")
        if isinstance(self.local_steps, bool) or not isinstance(self.local_steps, int) or self.local_steps < 1:
            raise ValueError(f"Strategy.local_steps must be a positive integer, got {self.local_steps!r}")
        if isinstance(self.eval_steps, bool) or not isinstance(self.eval_steps, int) or self.eval_steps < 0:
            raise ValueError(f"Strategy.eval_steps must be a non-negative integer, got {self.eval_steps!r}")
        if not self.beta > 0 or (self.alpha is not None and not self.alpha > 0):
            raise ValueError(f"Strategy alpha and beta must be positive, got alpha={self.alpha!r}, beta={self.beta!r}")


def fedavg(local_steps: int = 1) -> Strategy:
    """FedAvg (McMahan et al. 2017): clients train locally, the server averages (server SGD, lr 1)."""
    return Strategy("fedavg", "fedavg", local_steps=local_steps)


def fedavg_finetune(local_steps: int = 1, eval_steps: int = 5) -> Strategy:
    """FedAvg trained as usual, each client's model fine-tuned `eval_steps` steps on its support split
    before evaluation: the strong personalisation baseline."""
    return Strategy("fedavg+ft", "fedavg", local_steps=local_steps, eval_steps=eval_steps)


def fedmaml(order: int = 2, eval_steps: int | None = None) -> Strategy:
    """FedMAML (Chen et al. 2018, FedMeta): each client's MAML meta-gradient; order 1: first-order."""
    return Strategy("fedmaml" if order == 2 else "fedmaml-fo", "fedmaml", order=order,
                    eval_steps=1 if eval_steps is None else eval_steps)


def fedreptile(eval_steps: int = 1) -> Strategy:
    """FedReptile: each client's Reptile direction theta - W_k (the algorithm must be a `Reptile`)."""
    return Strategy("fedreptile", "fedreptile", eval_steps=eval_steps)


def perfedavg(order: int = 1, local_steps: int = 1, alpha: float | None = None, beta: float = 0.01,
              eval_steps: int = 1) -> Strategy:
    """Per-FedAvg (Fallah et al. 2020): order 1 is Per-FedAvg (FO), order 2 Per-FedAvg (HF)."""
    return Strategy("perfedavg-fo" if order == 1 else "perfedavg-hf", "perfedavg", order=order,
                    local_steps=local_steps, alpha=alpha, beta=beta, eval_steps=eval_steps)


def metasgd(eval_steps: int = 1) -> Strategy:
    """Meta-SGD federated: FedMAML on a `MetaSGD` algorithm, whose learned rates are aggregated too."""
    return Strategy("metasgd", "fedmaml", order=None, eval_steps=eval_steps)


@dataclass
class ClientUpdate:
    """A client's reply: `update` (name -> tensor, the server's gradient), `size` (its examples), metrics."""

    update: Params
    size: int
    metrics: dict[str, float] = field(default_factory=dict)
    client: str = ""


def client_size(data: Any) -> int:
    """Number of examples of a client's one-task data: support plus query (dim 1 of the first tensor of each)."""
    sizes = []
    for part in (data.support, data.query):
        leaves = [t for t in core.tree_flatten(part)[0] if isinstance(t, Tensor)]
        sizes.append(int(leaves[0].shape[1]))
    return sum(sizes)


@contextlib.contextmanager
def loaded(alg: Algorithm, params: Params) -> Iterator[Algorithm]:
    """`alg` with its meta-parameters set to `params` for the duration; restored afterwards."""
    own = alg.meta_parameters()
    if list(params) != list(own):
        raise ValueError(f"the parameters sent must be the algorithm's meta_parameters() in order: got "
                         f"{list(params)}, expected {list(own)}")
    saved = {n: p.detach().clone() for n, p in own.items()}
    with torch.no_grad():
        for n, p in own.items():
            p.copy_(params[n])
    try:
        yield alg
    finally:
        with torch.no_grad():
            for n, p in own.items():
                p.copy_(saved[n])


@contextlib.contextmanager
def _order(alg: Algorithm, order: int | None) -> Iterator[None]:
    if order is None or order == alg.order:
        yield
        return
    saved = alg.order
    alg.order = order
    try:
        yield
    finally:
        alg.order = saved


def _one_task(data: Any) -> Any:
    if not isinstance(data, (core.TaskBatch, core.Tasks)):
        raise TypeError(f"a client's data must be a one-task metagrad.TaskBatch or Tasks, got {type(data).__name__}")
    if len(data) != 1:
        raise ValueError(f"a client is one task: its data must have exactly 1 task (dim 0), got {len(data)}")
    return data


def _sgd_alpha(alg: Algorithm, strategy: Strategy) -> float:
    if strategy.alpha is not None:
        return float(strategy.alpha)
    if alg.inner_opt.name != "sgd":
        raise ValueError(f"Per-FedAvg's inner step is plain SGD: give Strategy.alpha, or use an algorithm whose "
                         f"inner optimizer is sgd (got {alg.inner_opt.name!r})")
    return alg.inner_lr


def hessian_vector_product(loss_of: Any, params: Params, vector: Params) -> Params:
    """H(params) @ vector of the scalar `loss_of(params)`, exactly: the gradient of <grad loss, vector>
    (reverse over reverse with autograd; no finite difference)."""
    names = list(params)
    with torch.enable_grad():
        leaves = {n: params[n].detach().requires_grad_(True) for n in names}
        g = torch.autograd.grad(loss_of(leaves), [leaves[n] for n in names], create_graph=True)
        dot = sum((gi * vector[n].detach()).sum() for gi, n in zip(g, names))
        hv = torch.autograd.grad(dot, [leaves[n] for n in names], allow_unused=True)
    return {n: (h.detach() if h is not None else torch.zeros_like(params[n])) for n, h in zip(names, hv)}


def _perfedavg(alg: Algorithm, strategy: Strategy, theta: Params, data: Any) -> Params:
    """`(theta - w) / beta` after Per-FedAvg's local steps (Fallah et al. 2020, Algorithm 1)."""
    ad = alg.adapter(order=0)
    support = core.index_tasks(data.support, 0)
    query = core.index_tasks(data.query, 0)
    alpha, beta = _sgd_alpha(alg, strategy), strategy.beta
    names = list(ad.inner_opt.select(theta))

    def grad_at(w: Params, part: Any) -> Params:
        return ad.gradient(w, part, create_graph=False)[1]

    w = {n: p.detach().clone() for n, p in theta.items()}
    for _ in range(strategy.local_steps):
        g = grad_at(w, support)  # D
        tmp = {**w, **{n: w[n] - alpha * g[n] for n in names}}
        direction = grad_at(tmp, query)  # D'
        if strategy.order == 2:  # Hessian-free variant: (I - alpha H(w; D'')) grad f(tmp; D'), D'' = support
            def loss_of(sub: Params, w: Params = w) -> Tensor:
                return ad.loss({**w, **sub}, support)

            hv = hessian_vector_product(loss_of, {n: w[n] for n in names}, direction)
            direction = {n: direction[n] - alpha * hv[n] for n in names}
        w = {**w, **{n: w[n] - beta * direction[n] for n in names}}
    return {n: (theta[n].detach() - w[n]) / beta for n in theta}


def _as_meta(alg: Algorithm, model_update: Params) -> Params:
    """An update of the model's parameters (`alg.params()` names) over `alg.meta_parameters()`: the model's
    are under `model.`; meta-parameters outside the model (learned inner rates) get a zero update."""
    out = {}
    for n, p in alg.meta_parameters().items():
        inner = n[len("model."):] if n.startswith("model.") else None
        out[n] = model_update[inner].detach() if inner in model_update else torch.zeros_like(p)
    return out


def client_update(strategy: Strategy, alg: Algorithm, theta: Params, data: Any, iteration: int = 0,
                  state: dict[str, Any] | None = None, client: str = "") -> ClientUpdate:
    """One client's reply in a round: its update over `alg.meta_parameters()` (in that order), its size.

    `theta` are the meta-parameters the server sent; `data` the client's one-task split; `state` the dict
    the client keeps across rounds (updated in place: rounds taken part in, last metrics). `alg` is left as
    it was (its parameters are restored).
    """
    data = _one_task(data)
    metrics: dict[str, float] = {}
    with loaded(alg, theta):
        if strategy.kind in ("fedmaml", "fedreptile"):
            if strategy.kind == "fedreptile" and not isinstance(alg, Reptile):
                raise TypeError(f"FedReptile needs a metagrad.algorithms.Reptile algorithm, got {type(alg).__name__}")
            with _order(alg, strategy.order):
                grads = alg.meta_gradient(data, iteration)
            update = {n: g.detach() for n, g in grads.items()}
            metrics = dict(grads.metrics)
        elif strategy.kind == "fedavg":
            start = alg.params()
            local = alg.adapter(steps=strategy.local_steps, order=0).adapt(start, core.index_tasks(pooled(data), 0))
            update = _as_meta(alg, {n: start[n].detach() - local[n] for n in local})
        else:
            update = _as_meta(alg, _perfedavg(alg, strategy, alg.params(), data))
    if state is not None:
        state["rounds"] = int(state.get("rounds", 0)) + 1
        state["last_round"] = int(iteration)
        state["last_metrics"] = dict(metrics)
    return ClientUpdate(update, client_size(data), metrics, client)


@torch.no_grad()
def client_evaluate(strategy: Strategy, alg: Algorithm, theta: Params, data: Any) -> dict[str, float]:
    """A client's query loss (and accuracy for labels) after `strategy.eval_steps` steps of the algorithm's
    inner optimizer on its support split, starting from the server's `theta`."""
    data = _one_task(data)
    with loaded(alg, theta):
        ad = alg.adapter(steps=strategy.eval_steps, order=0)
        adapted = ad.adapt(alg.params(), core.index_tasks(data.support, 0))
        loss, metrics = ad.evaluate(adapted, core.index_tasks(data.query, 0))
    return {"loss": float(loss), **{k: float(v) for k, v in metrics.items()}}


def check_update(update: ClientUpdate, reference: Params) -> str | None:
    """Why the server must reject `update` (names, shapes, dtypes against `reference`, non-finite
    values, a size that is not a positive integer), or None when it is acceptable."""
    if not isinstance(update, ClientUpdate):
        return f"not a ClientUpdate but {type(update).__name__}"
    if isinstance(update.size, bool) or not isinstance(update.size, int) or update.size <= 0:
        return f"size must be a positive integer, got {update.size!r}"
    if list(update.update) != list(reference):
        return f"parameter names {list(update.update)} differ from the server's {list(reference)}"
    for n, ref in reference.items():
        t = update.update[n]
        if not isinstance(t, Tensor):
            return f"{n} is {type(t).__name__}, not a tensor"
        if t.shape != ref.shape:
            return f"{n} has shape {tuple(t.shape)}, expected {tuple(ref.shape)}"
        if t.dtype != ref.dtype:
            return f"{n} has dtype {t.dtype}, expected {ref.dtype}"
        if not bool(torch.isfinite(t).all()):
            return f"{n} has non-finite values"
    return None


def aggregate(updates: Sequence[ClientUpdate], reference: Params) -> tuple[Params | None, list[ClientUpdate],
                                                                          list[tuple[ClientUpdate, str]]]:
    """The size-weighted mean of the acceptable updates: `(mean or None if none, accepted, rejected with why)`.
    Every rejection is logged (warning) with the client's name and the reason."""
    accepted, rejected = [], []
    for u in updates:
        why = check_update(u, reference)
        if why is None:
            accepted.append(u)
        else:
            log.warning("rejected the update of client %r: %s", getattr(u, "client", "?"), why)
            rejected.append((u, why))
    if not accepted:
        return None, accepted, rejected
    total = sum(u.size for u in accepted)
    mean = {n: sum(u.update[n] * (u.size / total) for u in accepted) for n in reference}
    return mean, accepted, rejected


class Server:
    """The server's meta-parameters and its optimizer (`'sgd'` or `'adam'`), state kept across rounds.

    `round(updates)` validates every update, aggregates the acceptable ones by size and takes one
    optimizer step with the aggregate as the gradient; a round with no acceptable update (or a step
    that would produce non-finite parameters) leaves the model and the optimizer state as they were.
    """

    def __init__(self, params: Params, optimizer: str = "sgd", lr: float = 1.0, **optimizer_args: Any) -> None:
        if optimizer not in ("sgd", "adam"):
            raise ValueError(f"the server optimizer must be 'sgd' or 'adam', got {optimizer!r}")
        if not lr > 0:
            raise ValueError(f"the server lr must be positive, got {lr!r}")
        self.params = {n: torch.nn.Parameter(p.detach().clone()) for n, p in params.items()}
        self.optimizer_name, self.lr, self.optimizer_args = optimizer, float(lr), dict(optimizer_args)
        cls = torch.optim.SGD if optimizer == "sgd" else torch.optim.Adam
        self.optimizer = cls(list(self.params.values()), lr=self.lr, **optimizer_args)
        self.rounds = 0

    def weights(self) -> Params:
        """The meta-parameters to send: detached copies, in order."""
        return {n: p.detach().clone() for n, p in self.params.items()}

    def round(self, updates: Sequence[ClientUpdate]) -> dict[str, Any]:
        """Aggregate and step; returns what happened (clients accepted, rejected with reasons, stepped)."""
        reference = {n: p.detach() for n, p in self.params.items()}
        mean, accepted, rejected = aggregate(updates, reference)
        report = {"round": self.rounds, "accepted": [u.client for u in accepted],
                  "rejected": [(u.client if isinstance(u, ClientUpdate) else "?", why) for u, why in rejected],
                  "stepped": False}
        if mean is not None:
            saved = (self.weights(), _clone_state(self.optimizer.state_dict()))
            for n, p in self.params.items():
                p.grad = mean[n].detach().clone()
            self.optimizer.step()
            if all(bool(torch.isfinite(p).all()) for p in self.params.values()):
                report["stepped"] = True
            else:  # never half-updated: back to the state before the step
                log.warning("round %d: the server step gave non-finite parameters; the round is not applied",
                            self.rounds)
                with torch.no_grad():
                    for n, p in self.params.items():
                        p.copy_(saved[0][n])
                self.optimizer.load_state_dict(saved[1])
            for p in self.params.values():
                p.grad = None
        else:
            log.warning("round %d: no acceptable client update; the model is unchanged", self.rounds)
        total = sum(u.size for u in accepted)
        for k in sorted({k for u in accepted for k in u.metrics}):
            report[k] = sum(u.metrics.get(k, math.nan) * u.size for u in accepted) / total
        self.rounds += 1
        return report

    def state(self) -> dict[str, Any]:
        """Everything a restarted server needs (for `metagrad.runs.save_checkpoint`)."""
        return {"algorithm": self.weights(), "identity": {"kind": "federated-server", "optimizer": self.optimizer_name,
                                                          "lr": self.lr, "names": list(self.params)},
                "optimizer": self.optimizer.state_dict(), "rounds": self.rounds}

    def load_state(self, state: dict[str, Any]) -> None:
        """Take a saved `state()` (after `metagrad.runs.read_checkpoint`)."""
        identity = state["identity"]
        if identity.get("names") != list(self.params) or identity.get("optimizer") != self.optimizer_name:
            raise ValueError(f"the checkpoint is of another server (parameters {identity.get('names')}, optimizer "
                             f"{identity.get('optimizer')!r}); this one has {list(self.params)}, "
                             f"{self.optimizer_name!r}")
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(state["algorithm"][n])
        self.optimizer.load_state_dict(state["optimizer"])
        self.rounds = int(state["rounds"])


def _clone_state(state: Any) -> Any:
    if isinstance(state, Tensor):
        return state.detach().clone()
    if isinstance(state, dict):
        return {k: _clone_state(v) for k, v in state.items()}
    if isinstance(state, list):
        return [_clone_state(v) for v in state]
    return state


def run_round(server: Server, strategy: Strategy, alg: Algorithm, clients: dict[str, Any],
              states: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """One round in this process: every client of `clients` (name -> one-task data) replies, the server
    aggregates and steps. A client whose update raises is logged and left out, as a dropped client."""
    theta = server.weights()
    updates = []
    for name, data in clients.items():
        try:
            updates.append(client_update(strategy, alg, theta, data, server.rounds,
                                         None if states is None else states.setdefault(name, {}), name))
        except (FloatingPointError, RuntimeError, ValueError) as err:
            log.warning("client %r failed in round %d and is left out: %s", name, server.rounds, err)
    return server.round(updates)
