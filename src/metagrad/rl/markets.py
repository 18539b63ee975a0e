"""Price series for the trading tasks, and the metrics of a strategy's returns.

Prices are `[days + 1]` tensors (float64, positive). Simulated families, each asset drawing its own
parameters from a seeded generator:
- `gbm`: geometric Brownian motion, annual drift ~ U(-0.3, 0.3), annual volatility ~ U(0.15, 0.45);
- `ou`: mean-reverting log price (Ornstein-Uhlenbeck, discretised): `x_{t+1} = x_t + kappa (m - x_t) +
  sigma eps`, kappa ~ U(0.1, 0.3) per day, daily sigma ~ U(0.01, 0.02);
- `regime`: regime switching: a two-state Markov chain (bull / bear) flips with probability 1/50 a day;
  the daily drift is +mu or -mu with mu ~ U(0.002, 0.004), daily sigma ~ U(0.01, 0.02) (trending).
Real daily closes that ship inside PyPI wheels (no network): S&P 500 and NASDAQ 1999-2018 from `arch`'s
example data (adjusted close), MSFT from 1986 from `pmdarima` (close). `real_series` returns those whose
package is installed and says which are missing.

Metrics of a strategy's per-period simple returns `R [..., days]` (wealth `W_t = prod_{s<=t} (1 + R_s)`,
starting at 1): `pnl` = W_T - 1; `sharpe` = mean(R) / std(R) * sqrt(periods_per_year) (sample std,
zero risk-free rate, 0 when R is constant, e.g. a flat strategy); `max_drawdown` = max_t (1 - W_t /
max_{s<=t} W_s), with the starting wealth 1 counted in the running maximum.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

PROCESSES = ("gbm", "ou", "regime")
TRADING_DAYS = 252


def _u(n: int, lo: float, hi: float, gen: torch.Generator | None) -> Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen, dtype=torch.float64)


def simulate(process: str, n: int, days: int, generator: torch.Generator | None = None,
             start: float = 100.0) -> Tensor:
    """`n` price paths `[n, days + 1]` of the simulated `process` ('gbm', 'ou', 'regime'; see the module doc)."""
    if process not in PROCESSES:
        raise ValueError(f"process must be one of {PROCESSES}, got {process!r}")
    eps = torch.randn(n, days, generator=generator, dtype=torch.float64)
    if process == "gbm":
        mu, sigma = _u(n, -0.3, 0.3, generator) / TRADING_DAYS, _u(n, 0.15, 0.45, generator) / math.sqrt(TRADING_DAYS)
        log_ret = (mu - sigma ** 2 / 2).unsqueeze(1) + sigma.unsqueeze(1) * eps
    elif process == "ou":
        kappa, sigma = _u(n, 0.05, 0.2, generator), _u(n, 0.01, 0.02, generator)
        x, steps = torch.zeros(n, dtype=torch.float64), []
        for t in range(days):
            new = x - kappa * x + sigma * eps[:, t]
            steps.append(new - x)
            x = new
        log_ret = torch.stack(steps, 1)
    else:
        mu, sigma = _u(n, 0.002, 0.005, generator), _u(n, 0.01, 0.02, generator)
        flips = torch.rand(n, days, generator=generator, dtype=torch.float64) < 1 / 100
        first = torch.where(torch.rand(n, generator=generator) < 0.5, 1.0, -1.0).to(torch.float64)
        state = first.unsqueeze(1) * (1 - 2 * (flips.cumsum(1) % 2)).to(torch.float64)
        log_ret = mu.unsqueeze(1) * state + sigma.unsqueeze(1) * eps
    zero = torch.zeros(n, 1, dtype=torch.float64)
    return start * torch.exp(torch.cat([zero, log_ret.cumsum(1)], 1))


def real_series() -> tuple[dict[str, Tensor], list[str]]:
    """The real daily price series whose package is installed (`{name: prices [days + 1]}`), and the names of
    the missing ones with the package each needs."""
    found, missing = {}, []
    try:
        import arch.data.nasdaq
        import arch.data.sp500
        found["S&P 500"] = torch.tensor(arch.data.sp500.load()["Adj Close"].to_numpy(), dtype=torch.float64)
        found["NASDAQ"] = torch.tensor(arch.data.nasdaq.load()["Adj Close"].to_numpy(), dtype=torch.float64)
    except ImportError:
        missing += ["S&P 500 (pip install arch)", "NASDAQ (pip install arch)"]
    try:
        import pmdarima.datasets
        found["MSFT"] = torch.tensor(pmdarima.datasets.load_msft()["Close"].to_numpy(), dtype=torch.float64)
    except ImportError:
        missing.append("MSFT (pip install pmdarima)")
    for name, p in found.items():
        if not (torch.isfinite(p).all() and (p > 0).all()):
            raise ValueError(f"the {name} series has non-finite or non-positive prices")
    return found, missing


def wealth(returns: Tensor) -> Tensor:
    """Wealth after each period, starting from 1: `prod_{s<=t} (1 + R_s)`, `[..., days]`."""
    return torch.cumprod(1 + returns.double(), -1)


def pnl(returns: Tensor) -> Tensor:
    """Profit and loss over the whole period as a fraction of the starting wealth: `[...]`."""
    return wealth(returns)[..., -1] - 1


def sharpe(returns: Tensor, periods_per_year: int = TRADING_DAYS) -> Tensor:
    """Annualised Sharpe ratio: mean / sample std of the per-period returns times sqrt(periods_per_year);
    zero risk-free rate; 0 where the returns are constant (std 0)."""
    r = returns.double()
    sd = r.std(-1, unbiased=True)
    ratio = r.mean(-1) / torch.where(sd > 0, sd, torch.ones_like(sd)) * math.sqrt(periods_per_year)
    return torch.where(sd > 1e-15, ratio, torch.zeros_like(ratio))


def max_drawdown(returns: Tensor) -> Tensor:
    """Largest fall of wealth from its running peak (the starting wealth 1 included), as a fraction: `[...]`."""
    w = wealth(returns)
    peak = torch.cummax(torch.cat([torch.ones_like(w[..., :1]), w], -1), -1).values[..., 1:]
    return (1 - w / peak).amax(-1)
