"""Fully connected networks, e.g. the 1-40-40-1 ReLU regressor of the MAML sinusoid experiment."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn


def MLP(sizes: Sequence[int] = (1, 40, 40, 1), activation: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    """A ReLU MLP with the given layer sizes (input, hidden..., output)."""
    if len(sizes) < 2 or any(int(s) < 1 for s in sizes):
        raise ValueError(f"sizes must list at least an input and an output size, all positive; got {sizes}")
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)
