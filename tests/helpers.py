"""Shared test tools: finite-difference gradients in float64."""

from __future__ import annotations

from collections.abc import Callable

import torch


def finite_difference(
    fn: Callable[[], torch.Tensor], tensors: list[torch.Tensor], eps: float = 1e-6
) -> list[torch.Tensor]:
    """Central differences of the scalar `fn()` with respect to every entry of `tensors` (in place)."""
    out = []
    with torch.no_grad():
        for t in tensors:
            g = torch.zeros_like(t)
            flat, gflat = t.view(-1), g.view(-1)
            for i in range(flat.numel()):
                old = flat[i].item()
                flat[i] = old + eps
                plus = fn().item()
                flat[i] = old - eps
                minus = fn().item()
                flat[i] = old
                gflat[i] = (plus - minus) / (2 * eps)
            out.append(g)
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error ||a - b|| / max(||b||, tiny)."""
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def one_line_error(capsys, argv: list[str], *fragments: str) -> None:
    """`metagrad argv` fails with exit 2 and one line on stderr that holds every fragment, no traceback."""
    from metagrad.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("metagrad: error: ") and "Traceback" not in err, err
    for f in fragments:
        assert f in err, err
