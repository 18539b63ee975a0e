"""Meta-learning algorithms: one short file each, all on `metagrad.core`.

`ALGORITHMS[name](model, inner_lr=..., inner_steps=..., ...)` builds one by the name the CLI uses.
"""

from __future__ import annotations

import inspect

from torch import nn

from metagrad.algorithms.anil import ANIL
from metagrad.algorithms.base import Algorithm
from metagrad.algorithms.baselines import OptimumAverage, Pretrain
from metagrad.algorithms.imaml import IMAML
from metagrad.algorithms.l2o import L2O
from metagrad.algorithms.maml import MAML
from metagrad.algorithms.metasgd import MetaSGD
from metagrad.algorithms.reptile import Reptile


def fomaml(model: nn.Module, **kwargs) -> MAML:
    """First-order MAML: MAML with `order=1`."""
    if kwargs.setdefault("order", 1) != 1:
        raise ValueError(f"fomaml is MAML with order=1; got order={kwargs['order']!r} (use 'maml' for order 2)")
    return MAML(model, **kwargs)


# Multi-step loss for the first 5,000 iterations (10 epochs of 500, the MAML++ code's configs); first order
# for the first 25,000 (the paper's 50 epochs of 500).
MAML_PLUS_PLUS = {"lslr": True, "multi_step_loss_iters": 5000, "order_anneal_iters": 25000}


def maml_plus_plus(model: nn.Module, **kwargs) -> MAML:
    """MAML++ (Antoniou et al. 2019): MAML with the options in `MAML_PLUS_PLUS` on unless overridden."""
    return MAML(model, **{**MAML_PLUS_PLUS, **kwargs})


def _signature(factory, **defaults) -> None:
    # MAML's signature with the factory's defaults, so that `inspect.signature` (the CLI's argument check) sees
    # the real argument names instead of **kwargs.
    sig = inspect.signature(MAML)
    factory.__signature__ = sig.replace(parameters=[p.replace(default=defaults.get(p.name, p.default))
                                                    for p in sig.parameters.values()])


_signature(fomaml, order=1)
_signature(maml_plus_plus, **MAML_PLUS_PLUS)


class _Registry(dict):
    def __missing__(self, name: str):
        raise KeyError(f"unknown algorithm {name!r}; known: {', '.join(sorted(self))}")


ALGORITHMS: dict[str, type[Algorithm] | object] = _Registry({
    "maml": MAML,
    "fomaml": fomaml,
    "maml++": maml_plus_plus,
    "reptile": Reptile,
    "anil": ANIL,
    "metasgd": MetaSGD,
    "imaml": IMAML,
    "pretrain": Pretrain,
    "optimum-average": OptimumAverage,
    "l2o": L2O,
})

__all__ = ["ALGORITHMS", "ANIL", "IMAML", "L2O", "MAML", "Algorithm", "MetaSGD", "OptimumAverage", "Pretrain",
           "Reptile", "fomaml", "maml_plus_plus"]
