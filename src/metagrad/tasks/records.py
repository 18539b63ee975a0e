"""The loader hook of the application families: a user's own records as a `TaskBatch`.

Records are arrays `x [tasks, n, *example]`, `y [tasks, n, *target]` (numpy or torch), one row of
dim 0 per task (a patient, a robot, a material system, ...), its `n` records in the order they were
taken. The first `shots` records of each task become its support set and the rest its query set,
so a model adapted on the first measurements is scored on the later ones.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from metagrad.core import TaskBatch


def as_tensor(name: str, value: object, dtype: torch.dtype) -> Tensor:
    """`value` (array-like) as a tensor of `dtype`, or a clear error naming the argument."""
    if isinstance(value, Tensor):
        t = value
    else:
        try:
            t = torch.as_tensor(np.asarray(value))
        except (TypeError, ValueError) as e:
            raise TypeError(f"{name} must be an array of numbers, got {type(value).__name__}: {e}") from None
    if t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"{name} must hold real numbers, got dtype {t.dtype}")
    if dtype.is_floating_point and not torch.isfinite(t.double()).all():
        raise ValueError(f"{name} holds NaN or inf values")
    return t.to(dtype)


def record_columns(shots: int, **columns: object) -> dict[str, Tensor]:
    """Per-record columns as tensors, each `[tasks, n]` like the first, finite, with `shots` in [1, n - 1]."""
    out: dict[str, Tensor] = {}
    for name, value in columns.items():
        t = value if isinstance(value, Tensor) else as_tensor(name, value, torch.get_default_dtype())
        first, like = next(iter(out.items()), (name, t))
        if t.dim() != 2 or t.shape != like.shape:
            raise ValueError(f"{name} must have shape [tasks, n] like {first} {tuple(like.shape)}, "
                             f"got {tuple(t.shape)}")
        if t.dtype == torch.bool or t.is_complex() or not torch.isfinite(t.double()).all():
            raise ValueError(f"{name} must hold finite real numbers")
        out[name] = t
    n = like.shape[1]
    if not isinstance(shots, int) or isinstance(shots, bool) or not 1 <= shots < n:
        raise ValueError(f"shots must be an integer in [1, n - 1] = [1, {n - 1}] so that every task keeps a query "
                         f"record, got {shots!r}")
    return out


def split_records(
    x: object, y: object, shots: int, example_shape: Sequence[int], target_shape: Sequence[int] = (1,),
    x_dtype: torch.dtype = torch.float32, y_dtype: torch.dtype = torch.float32, names: tuple[str, str] = ("x", "y"),
) -> TaskBatch:
    """Records `x [tasks, n, *example_shape]`, `y [tasks, n, *target_shape]` (or `[tasks, n]` for a
    one-number target) split into support (first `shots`) and query (the rest); `names` name the arguments
    in errors."""
    xn, yn = names
    x = as_tensor(xn, x, x_dtype)
    y = as_tensor(yn, y, y_dtype)
    example_shape, target_shape = tuple(example_shape), tuple(target_shape)
    if tuple(x.shape[2:]) != example_shape or x.dim() != 2 + len(example_shape):
        raise ValueError(f"{xn} must have shape [tasks, records, {', '.join(map(str, example_shape))}], "
                         f"got {tuple(x.shape)}")
    if target_shape == (1,) and y.dim() == 2:
        y = y.unsqueeze(-1)
    if tuple(y.shape[2:]) != target_shape or y.dim() != 2 + len(target_shape):
        raise ValueError(f"{yn} must have shape [tasks, records{''.join(', ' + str(s) for s in target_shape)}]"
                         f"{' or [tasks, records]' if target_shape == (1,) else ''}, got {tuple(y.shape)}")
    if x.shape[:2] != y.shape[:2]:
        raise ValueError(f"{xn} and {yn} disagree on [tasks, records]: {tuple(x.shape[:2])} vs {tuple(y.shape[:2])}")
    n = x.shape[1]
    if not isinstance(shots, int) or isinstance(shots, bool) or not 1 <= shots < n:
        raise ValueError(f"shots must be an integer in [1, records - 1] = [1, {n - 1}] so that every task "
                         f"keeps a query record, got {shots!r}")
    return TaskBatch(x[:, :shots], y[:, :shots], x[:, shots:], y[:, shots:])
