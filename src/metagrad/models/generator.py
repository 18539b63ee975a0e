"""A small generative model for inverse design: a normalising flow of affine couplings (Dinh et al.,
"Density estimation using Real NVP", ICLR 2017).

Designs come from x = G(z), z ~ N(0, I): each coupling rescales and shifts one coordinate by amounts
computed from the others. A flow rather than a VAE because its log-likelihood is exact: the loss
adapted in MAML's inner loop involves no sampling noise, so its exact second-order meta-gradient can be
checked against finite differences, and sampling a candidate is one pass of G.

`forward(x)` returns log p(x) `[n]` of designs x `[n, dim]` (training: NLL = -mean log p);
`forward(z, reverse=True)` returns designs G(z) `[n, dim]` (generation). Both are plain module calls, so
`torch.func.functional_call(flow, params, (z,), {"reverse": True})` samples from adapted parameters.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class CouplingFlow(nn.Module):
    """`layers` affine couplings over `dim` coordinates, then an elementwise affine map (loc, log_scale)."""

    def __init__(self, dim: int = 2, hidden: int = 32, layers: int = 4) -> None:
        super().__init__()
        if dim < 2 or layers < 1 or hidden < 1:
            raise ValueError(f"need dim >= 2, layers >= 1, hidden >= 1; got dim={dim}, layers={layers}, "
                             f"hidden={hidden}")
        self.dim = dim
        # Layer i transforms the coordinates of mask i (alternating halves) from the others.
        masks = [(torch.arange(dim) % 2 == i % 2).float() for i in range(layers)]
        self.register_buffer("masks", torch.stack(masks))
        self.nets = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                          nn.Linear(hidden, 2 * dim))
            for _ in range(layers)
        )
        for net in self.nets:
            # Start every coupling at the identity.
            nn.init.zeros_(net[-1].weight)
            nn.init.zeros_(net[-1].bias)
        self.loc = nn.Parameter(torch.zeros(dim))
        self.log_scale = nn.Parameter(torch.zeros(dim))

    def _shift_scale(self, i: int, x: Tensor) -> tuple[Tensor, Tensor]:
        m = self.masks[i]
        s, t = self.nets[i](x * (1 - m)).chunk(2, dim=-1)
        # tanh bounds the log-scale: no overflow of exp during an inner step with a large rate.
        return torch.tanh(s) * m, t * m

    def forward(self, x: Tensor, reverse: bool = False) -> Tensor:
        """log p(x) `[n]` of designs `[n, dim]`; with `reverse=True`, designs G(z) `[n, dim]` of noise z."""
        if reverse:
            h = x
            for i in range(len(self.nets)):
                s, t = self._shift_scale(i, h)
                h = h * torch.exp(s) + t
            return h * torch.exp(self.log_scale) + self.loc
        h = (x - self.loc) * torch.exp(-self.log_scale)
        log_det = -self.log_scale.sum().expand(x.shape[0])
        for i in reversed(range(len(self.nets))):
            s, t = self._shift_scale(i, h)
            h = (h - t) * torch.exp(-s)
            log_det = log_det - s.sum(-1)
        log_base = -0.5 * (h**2).sum(-1) - 0.5 * self.dim * math.log(2 * math.pi)
        return log_base + log_det
