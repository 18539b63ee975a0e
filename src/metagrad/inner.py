"""Inner optimizers as pure `(init, update)` pairs, in the style of optax.

`init(params) -> state`; `update(grads, state, params) -> (updates, state)`; the inner loop applies
`params + updates`. A transformation whose update depends on the step (Adam's bias correction,
MAML++'s per-step rates) keeps the step count in its state, as optax does (a Python int: the same
for every task, so a vmapped inner loop needs no batched counter); `update(..., step=k)` overrides
it. `chain` composes transformations left to right and `masked(opt, names)` adapts only the named
parameters: ANIL's head-only inner loop is a mask. Learned quantities (Meta-SGD's per-parameter rates, MAML++'s
per-layer-per-step rates, a learned optimizer's weights) live in `meta_params`: tensors that the
outer optimizer trains together with the model, and through which the meta-gradient flows
because `update` uses them differentiably.
"""

from __future__ import annotations

import copy
import math
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

Params = dict[str, Tensor]


@dataclass
class InnerOptimizer:
    """A pair of pure functions and the learnable tensors they read.

    `init(params) -> state`, `update(grads, state, params, step=None) -> (updates, state)`. `adapts`
    names the parameters the optimizer updates (None: all of them); the inner loop differentiates
    only those and leaves the others at the start.
    """

    init: Callable[[Params], object]
    update: Callable[..., tuple[Params, object]]
    meta_params: nn.ParameterDict = field(default_factory=nn.ParameterDict)
    name: str = "custom"
    adapts: tuple[str, ...] | None = None

    def select(self, params: Params) -> Params:
        """The parameters this optimizer adapts, in `params`' order."""
        return dict(params) if self.adapts is None else {n: p for n, p in params.items() if n in self.adapts}

    def __deepcopy__(self, memo: dict) -> InnerOptimizer:
        # `init` and `update` read their learned tensors through their closures: a copy must read the
        # copied tensors (the ones its algorithm's copy trains), not the original's.
        return InnerOptimizer(_copy_function(self.init, memo), _copy_function(self.update, memo),
                              copy.deepcopy(self.meta_params, memo), self.name, self.adapts)


def _copy_function(f: Callable, memo: dict) -> Callable:
    """`f` with the contents of its closure deep-copied (sharing `memo` with the rest of the copy)."""
    if not isinstance(f, types.FunctionType) or not f.__closure__:
        return copy.deepcopy(f, memo)
    cells = tuple(types.CellType(copy.deepcopy(c.cell_contents, memo)) for c in f.__closure__)
    g = types.FunctionType(f.__code__, f.__globals__, f.__name__, f.__defaults__, cells)
    g.__kwdefaults__ = f.__kwdefaults__
    return g


def _count(state: int, step: int | None) -> int:
    return state if step is None else int(step)


def chain(*opts: InnerOptimizer) -> InnerOptimizer:
    """The transformations applied left to right (optax.chain): each one's updates are the next one's grads."""
    if not opts:
        raise ValueError("chain needs at least one inner optimizer")
    meta = nn.ParameterDict()
    for i, o in enumerate(opts):
        for k, v in o.meta_params.items():
            meta[f"{i}_{k}" if k in meta else k] = v

    def init(params: Params) -> object:
        return tuple(o.init(params) for o in opts)

    def update(grads: Params, state: object, params: Params, step: int | None = None) -> tuple[Params, object]:
        new = []
        for o, s in zip(opts, state):
            grads, s = o.update(grads, s, params, step)
            new.append(s)
        return grads, tuple(new)

    masks = [set(o.adapts) for o in opts if o.adapts is not None]
    adapts = None if not masks else tuple(n for n in (opts[0].adapts or sorted(set.intersection(*masks)))
                                          if all(n in m for m in masks))
    return InnerOptimizer(init, update, meta, name="+".join(o.name for o in opts), adapts=adapts)


def masked(opt: InnerOptimizer, names: Sequence[str]) -> InnerOptimizer:
    """`opt` restricted to the parameters `names` (optax.masked); the others stay at the start (ANIL's head)."""
    names = tuple(names)
    if not names:
        raise ValueError("masked needs at least one parameter name")
    if opt.adapts is not None:
        names = tuple(n for n in names if n in opt.adapts)
    return InnerOptimizer(opt.init, opt.update, opt.meta_params, name=opt.name, adapts=names)


def _key(name: str) -> str:
    # ParameterDict keys may not contain dots.
    return name.replace(".", "__")


def scale(factor: float) -> InnerOptimizer:
    """Multiply the incoming updates by `factor` (optax.scale): `chain(adam(1.0), scale(lr))` is Adam at `lr`."""
    def update(grads: Params, state: object, params: Params, step: int | None = None) -> tuple[Params, object]:
        return {n: factor * g for n, g in grads.items()}, state

    return InnerOptimizer(lambda params: None, update, nn.ParameterDict(), name=f"scale({factor:g})")


def sgd(lr: float) -> InnerOptimizer:
    """Plain gradient descent with a fixed rate: the inner loop of MAML."""
    def update(grads: Params, state: object, params: Params, step: int | None = None) -> tuple[Params, object]:
        return {n: -lr * g for n, g in grads.items()}, state

    return InnerOptimizer(lambda params: None, update, nn.ParameterDict(), name="sgd")


def per_parameter_lr(params: Params, init_lr: float) -> InnerOptimizer:
    """Meta-SGD: a learned rate for every scalar parameter (same shape as the parameter)."""
    rates = nn.ParameterDict({_key(n): nn.Parameter(torch.full_like(p.detach(), init_lr))
                              for n, p in params.items()})

    def update(grads: Params, state: object, params: Params, step: int | None = None) -> tuple[Params, object]:
        return {n: -rates[_key(n)] * g for n, g in grads.items()}, state

    return InnerOptimizer(lambda params: None, update, rates, name="per_parameter_lr")


def per_layer_per_step_lr(params: Params, init_lr: float, steps: int) -> InnerOptimizer:
    """MAML++ LSLR: one learned rate per parameter tensor and inner step."""
    rates = nn.ParameterDict({_key(n): nn.Parameter(torch.full((steps,), float(init_lr),
                                                                 dtype=p.dtype, device=p.device))
                              for n, p in params.items()})

    def update(grads: Params, count: int, params: Params, step: int | None = None) -> tuple[Params, int]:
        k = _count(count, step)
        # Evaluation may run more steps than were meta-trained: keep using the last learned rate.
        return {n: -rates[_key(n)][min(k, steps - 1)] * g for n, g in grads.items()}, k + 1

    return InnerOptimizer(lambda params: 0, update, rates, name="per_layer_per_step_lr")


def with_l2(opt: InnerOptimizer, strength: float) -> InnerOptimizer:
    """Add `strength * (params - start)` to the gradient: proximal pull toward the starting point."""
    def init(params: Params) -> object:
        return ({n: p for n, p in params.items()}, opt.init(params))

    def update(grads: Params, state: object, params: Params, step: int | None = None) -> tuple[Params, object]:
        start, inner = state
        grads = {n: g + strength * (params[n] - start[n]) for n, g in grads.items()}
        updates, inner = opt.update(grads, inner, params, step)
        return updates, (start, inner)

    return InnerOptimizer(init, update, opt.meta_params, name=f"{opt.name}+l2", adapts=opt.adapts)


def adam(lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> InnerOptimizer:
    """Adam (Kingma & Ba 2015) as an inner optimizer, with bias correction; state (m, v) per parameter."""
    b1, b2 = betas

    def init(params: Params) -> object:
        return (0, {n: torch.zeros_like(p) for n, p in params.items()},
                {n: torch.zeros_like(p) for n, p in params.items()})

    def update(grads: Params, state: object, params: Params, step: int | None = None) -> tuple[Params, object]:
        count, m, v = state
        k = _count(count, step)
        m = {n: b1 * m[n] + (1 - b1) * g for n, g in grads.items()}
        v = {n: b2 * v[n] + (1 - b2) * g * g for n, g in grads.items()}
        c1, c2 = 1 - b1 ** (k + 1), 1 - b2 ** (k + 1)
        # eps inside the square root keeps the update differentiable at a zero gradient (sqrt'(0) = inf).
        return {n: -lr * (m[n] / c1) / torch.sqrt(v[n] / c2 + eps * eps) for n in grads}, (k + 1, m, v)

    return InnerOptimizer(init, update, nn.ParameterDict(), name="adam")


def _lstm_cell(x: Tensor, h: Tensor, c: Tensor, w_ih: Tensor, w_hh: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """One LSTM cell on a batch of coordinates: x `[N, in]`, h and c `[N, hidden]`."""
    i, f, g, o = (x @ w_ih.T + h @ w_hh.T + b).chunk(4, dim=-1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def preprocess_gradient(g: Tensor, p: float = 10.0) -> Tensor:
    """Andrychowicz et al. (2016, appendix A): `(log|g| / p, sign g)` if `|g| >= e^-p`, else `(-1, e^p g)`.

    Maps gradients of any magnitude to inputs of order one: g `[N]` -> features `[N, 2]`.
    """
    small = math.exp(-p)
    big = g.abs() >= small
    log_mag = torch.where(big, torch.log(g.abs().clamp_min(small)) / p, -torch.ones_like(g))
    sign = torch.where(big, torch.sign(g), g / small)
    return torch.stack([log_mag, sign], dim=-1)


def learned_lstm(
    init_lr: float, hidden: int = 20, layers: int = 2, p: float = 10.0, output_scale: float = 0.1,
    seed: int = 0, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
) -> InnerOptimizer:
    """A coordinate-wise LSTM optimizer (Andrychowicz et al. 2016) whose weights are `meta_params`.

    Every scalar parameter is one row of a batch that shares the LSTM's weights; its input is the
    preprocessed gradient, its hidden state carries the gradient history. The update of coordinate j is

        update_j = -init_lr * exp(a . h_j + a0) * g_j  -  output_scale * (w . h_j + w0)

    the paper's additive output (second term) plus a learned per-coordinate gain on the gradient (a
    learned preconditioner, as in Wichrowska et al. 2017). The output heads start at zero, so the
    untrained optimizer is exactly SGD at `init_lr`: meta-training starts from MAML's inner loop.
    State: `(h, c)`, each `[layers, N, hidden]` for the N coordinates of all adapted parameters.
    """
    if not init_lr > 0:
        raise ValueError(f"init_lr must be positive, got {init_lr!r}")
    if int(hidden) != hidden or hidden < 1 or int(layers) != layers or layers < 1:
        raise ValueError(f"hidden and layers must be positive integers, got hidden={hidden!r}, layers={layers!r}")
    gen = torch.Generator().manual_seed(seed)
    bound = 1.0 / math.sqrt(hidden)  # torch.nn.LSTM's default initialisation

    def uniform(*shape: int) -> nn.Parameter:
        w = (torch.rand(*shape, generator=gen, dtype=torch.float64) * 2 - 1) * bound
        return nn.Parameter(w.to(dtype=dtype, device=device))

    weights = nn.ParameterDict()
    for layer in range(layers):
        weights[f"w_ih{layer}"] = uniform(4 * hidden, 2 if layer == 0 else hidden)
        weights[f"w_hh{layer}"] = uniform(4 * hidden, hidden)
        weights[f"b{layer}"] = uniform(4 * hidden)
    for head in ("gain", "out"):
        weights[f"w_{head}"] = nn.Parameter(torch.zeros(hidden, dtype=dtype, device=device))
        weights[f"b_{head}"] = nn.Parameter(torch.zeros((), dtype=dtype, device=device))

    def init(params: Params) -> object:
        n = sum(p.numel() for p in params.values())
        ref = next(iter(params.values()))
        zeros = torch.zeros(layers, n, hidden, dtype=ref.dtype, device=ref.device)
        return zeros, zeros.clone()

    def update(grads: Params, state: object, params: Params, step: int | None = None) -> tuple[Params, object]:
        h_all, c_all = state
        g = torch.cat([t.reshape(-1) for t in grads.values()])  # [N]: all coordinates in one LSTM batch
        x = preprocess_gradient(g, p)
        hs, cs = [], []
        for layer in range(layers):
            h, c = _lstm_cell(x, h_all[layer], c_all[layer], weights[f"w_ih{layer}"], weights[f"w_hh{layer}"],
                              weights[f"b{layer}"])
            hs.append(h)
            cs.append(c)
            x = h
        gain = torch.exp(x @ weights["w_gain"] + weights["b_gain"])
        flat = -init_lr * gain * g - output_scale * (x @ weights["w_out"] + weights["b_out"])
        updates, start = {}, 0
        for n, t in grads.items():
            updates[n] = flat[start:start + t.numel()].reshape(t.shape)
            start += t.numel()
        return updates, (torch.stack(hs), torch.stack(cs))

    return InnerOptimizer(init, update, weights, name="learned_lstm")
