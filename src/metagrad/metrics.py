"""Group-fairness metrics for binary decisions (Hardt, Price & Srebro 2016; Dwork et al. 2012).

All take tensors of shape `[..., n]` (n individuals, any leading batch dims such as `[tasks]`) with
values in {0, 1}: `pred` the decision, `y` the true label, `group` the protected attribute; they reduce
the last dimension. A rate conditioned on an empty cell (say no positive in group 1) is undefined, and
the hard metrics raise a clear error instead of returning a number that means nothing.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _binary(name: str, t: Tensor) -> Tensor:
    t = torch.as_tensor(t)
    if t.dim() < 1:
        raise ValueError(f"{name} must have shape [..., n], got a scalar")
    if not ((t == 0) | (t == 1)).all():
        raise ValueError(f"{name} must hold only 0/1 (or False/True) values")
    return t.double()


def _check_shapes(**tensors: Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"arguments must have the same shape [..., n], got {shapes}")


def _rate(pred: Tensor, mask: Tensor, what: str) -> Tensor:
    count = mask.sum(-1)
    if (count == 0).any():
        raise ValueError(f"{what} is undefined: no individual in that cell (for at least one batch entry)")
    return (pred * mask).sum(-1) / count


def accuracy(pred: Tensor, y: Tensor) -> Tensor:
    """Fraction of correct decisions `[...]`."""
    pred, y = _binary("pred", pred), _binary("y", y)
    _check_shapes(pred=pred, y=y)
    return (pred == y).double().mean(-1)


def demographic_parity_difference(pred: Tensor, group: Tensor) -> Tensor:
    """|P(pred=1 | group=0) - P(pred=1 | group=1)| `[...]`."""
    pred, group = _binary("pred", pred), _binary("group", group)
    _check_shapes(pred=pred, group=group)
    return (_rate(pred, 1 - group, "P(pred=1 | group=0)") - _rate(pred, group, "P(pred=1 | group=1)")).abs()


def group_rates(pred: Tensor, y: Tensor, group: Tensor) -> dict[str, Tensor]:
    """True- and false-positive rates of each group: keys tpr0, tpr1, fpr0, fpr1, each `[...]`."""
    pred, y, group = _binary("pred", pred), _binary("y", y), _binary("group", group)
    _check_shapes(pred=pred, y=y, group=group)
    out = {}
    for g in (0, 1):
        in_g = group if g else 1 - group
        out[f"tpr{g}"] = _rate(pred, in_g * y, f"true-positive rate of group {g} (positives in group {g})")
        out[f"fpr{g}"] = _rate(pred, in_g * (1 - y), f"false-positive rate of group {g} (negatives in group {g})")
    return out


def equalized_odds_gap(pred: Tensor, y: Tensor, group: Tensor) -> Tensor:
    """max(|TPR_0 - TPR_1|, |FPR_0 - FPR_1|) `[...]`: 0 when the decision satisfies equalised odds."""
    r = group_rates(pred, y, group)
    return torch.maximum((r["tpr0"] - r["tpr1"]).abs(), (r["fpr0"] - r["fpr1"]).abs())


def soft_equalized_odds_gap(prob: Tensor, y: Tensor, group: Tensor) -> Tensor:
    """Differentiable surrogate for training: |sTPR_0 - sTPR_1| + |sFPR_0 - sFPR_1| with the predicted
    probability in place of the decision. A term whose cell is empty in either group counts 0 (a small
    training sample may lack, say, positives of one group)."""
    _check_shapes(prob=prob, y=y, group=group)
    total = torch.zeros(prob.shape[:-1], dtype=prob.dtype, device=prob.device)
    for label in (1.0, 0.0):
        cell = (y == label).to(prob.dtype)
        rates, ok = [], []
        for g in (0.0, 1.0):
            mask = cell * (group == g).to(prob.dtype)
            count = mask.sum(-1)
            rates.append((prob * mask).sum(-1) / count.clamp_min(1))
            ok.append(count > 0)
        total = total + torch.where(ok[0] & ok[1], (rates[0] - rates[1]).abs(), torch.zeros_like(total))
    return total
