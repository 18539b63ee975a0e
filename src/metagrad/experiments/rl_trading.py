"""Trading as meta-RL: each asset a task, first-order MAML adapting a long/flat/short policy to a new asset's
recent window, tested walk-forward on the days after it.

Claim (with its regime): on simulated assets of the mean-reverting (Ornstein-Uhlenbeck) and trending
(regime-switching) families, held out from training, the MAML policy adapted by policy-gradient steps on
the asset's last `window` days earns more on the next `window` days than the pooled policy (one policy
trained on all training assets and dates, not adapted): the best position given the same features is
opposite in the two families, so a policy must find out from the asset's recent rewards which it trades.
Nothing is claimed on the real series (S&P 500, NASDAQ, MSFT): the table reports what happened there.

Setup (`metagrad.rl.Trading`, `metagrad.rl.markets`): on day t the policy sees 8 features of the log
returns up to day t (the last 5 returns and the 20-day momentum, scaled by the 20-day volatility, the
distance to the 20-day mean price, the 20-day against the 60-day volatility) and its position; it picks
short / flat / long (a categorical policy, linear in the features by default: `hidden=()`; an MLP is
`hidden=32,32`); the reward is position * next day's return - cost * |position change|. Training
tasks: simulated training assets (every family of `processes`, all their days) and the real series
before `real_train_fraction` of their days (when `arch` / `pmdarima` are installed; without them the
experiment runs on simulated assets alone and says so). MAML (`MAMLRL`, order 1) adapts
on a window of `window` days and is scored on the next `window` days (the env's `query_settings`).
Test: for every held-out simulated asset and every real series after its training dates, windows of
`window` days; each strategy may use the `window` days before the test window and trades the test
window greedily (its most likely action each day):

    MAML, k steps     theta_MAML + k policy-gradient steps (K trajectories each) on the window before
    pooled            one policy trained by the same code without inner step on the same tasks
    pooled, k steps   the pooled policy fine-tuned like MAML
    from scratch      a freshly initialised policy trained `scratch_steps` steps on the window before
    buy and hold      long from the first test day (one entry cost)

Metrics per (asset, window), then mean and 95% CI over them: P&L (% of the starting wealth over the test
window), the annualised Sharpe ratio (mean / sample std of the daily strategy returns times sqrt(252), zero
risk-free rate, 0 for a strategy that stays flat) and the maximum drawdown (% from the running peak).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from metagrad.evaluation import mean_ci95
from metagrad.experiments import experiment
from metagrad.rl import MAMLRL, CategoricalMLPPolicy, Trading, markets, rollout
from metagrad.runs import Run


@dataclass
class TradingConfig:
    processes: str = "gbm,ou,regime"   # simulated families (metagrad.rl.markets.PROCESSES)
    train_assets: int = 40          # simulated training assets per family
    test_assets: int = 20           # held-out simulated assets per family
    days: int = 500                 # days per simulated asset
    real: bool = True               # add arch's S&P 500 / NASDAQ and pmdarima's MSFT where installed
    real_train_fraction: float = 0.6
    real_windows: int = 20          # test windows per real series (after its training dates)
    test_windows: int = 3           # test windows per held-out simulated asset
    window: int = 60                # days of the adaptation window, and of the test window after it
    cost: float = 5e-4              # transaction cost per unit of position change (5 basis points)
    # A linear policy (logits = W obs + b) by default: a policy-gradient step then moves the weights of the
    # momentum / mean-reversion features directly; an MLP 32-32 adapted too little in one or two steps (measured).
    hidden: tuple[int, ...] = ()
    episodes: int = 10              # K: trajectories per policy-gradient step
    inner_lr: float = 4.0
    inner_steps: int = 1            # at meta-training
    eval_steps: int = 2             # at test: the table shows 1..eval_steps
    gamma: float = 0.9
    iterations: int = 300
    meta_batch: int = 20
    outer_lr: float = 3e-3
    scratch_steps: int = 20
    scratch_lr: float = 0.5
    seed: int = 0


def assets(cfg: TradingConfig) -> tuple[list[torch.Tensor], list[dict], list[str]]:
    """Every series (simulated training, simulated held-out, real), a description of each, the missing ones."""
    processes = [p.strip() for p in cfg.processes.split(",") if p.strip()]
    gen = torch.Generator().manual_seed(cfg.seed + 100)
    series, info = [], []
    for split, n in (("train", cfg.train_assets), ("test", cfg.test_assets)):
        for proc in processes:
            for p in markets.simulate(proc, n, cfg.days, gen):
                series.append(p)
                info.append({"group": proc, "split": split, "train_end": cfg.days if split == "train" else 0})
    missing: list[str] = []
    if cfg.real:
        real, missing = markets.real_series()
        for name, p in real.items():
            series.append(p)
            info.append({"group": "real", "name": name, "split": "real",
                         "train_end": int(cfg.real_train_fraction * (p.shape[0] - 1))})
    return series, info, missing


def held_out_windows(cfg: TradingConfig, info: list[dict], days: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
    """Test windows `[n, 2]` (asset, first test day) and each one's group: held-out simulated assets (any day
    after one window), real series after their training dates."""
    rows, groups = [], []
    for a, d in enumerate(info):
        if d["split"] == "train":
            continue
        count = cfg.test_windows if d["split"] == "test" else cfg.real_windows
        first = max(Trading.lookback, d["train_end"]) + cfg.window
        last = int(days[a]) - cfg.window
        for t0 in torch.linspace(first, last, count).long().unique().tolist():
            rows.append([a, t0])
            groups.append(d["group"])
    return torch.tensor(rows), groups


def make(cfg: TradingConfig, env: Trading, inner_steps: int) -> MAMLRL:
    """A freshly initialised algorithm (the same seeded network for every start)."""
    torch.manual_seed(cfg.seed)
    policy = CategoricalMLPPolicy(env.obs_dim, 3, tuple(cfg.hidden))
    return MAMLRL(policy, env, episodes=cfg.episodes, inner_lr=cfg.inner_lr, inner_steps=inner_steps, order=1,
                  gamma=cfg.gamma, path="vmap", seed=cfg.seed)


def train(alg: MAMLRL, env: Trading, cfg: TradingConfig, run: Run, name: str) -> float:
    """Adam on the (first-order) meta-policy-gradient for `iterations` meta-batches; returns the seconds taken."""
    opt = torch.optim.Adam(alg.meta_parameters().values(), lr=cfg.outer_lr)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    start = time.perf_counter()
    for it in range(cfg.iterations):
        run.log(it, {"start": name, **alg.train_step(env.sample_tasks(cfg.meta_batch, gen), opt, it)})
    return time.perf_counter() - start


def backtest(alg: MAMLRL, params: dict, env: Trading, settings: torch.Tensor, days: int) -> torch.Tensor:
    """The daily returns `[tasks, days]` of the greedy policy (params stacked per task) from each setting."""
    traj = rollout(alg.f, params, env, settings, 1, alg.space, stacked=True, horizon=days, deterministic=True)
    return traj["rewards"][:, 0]


def buy_and_hold(env: Trading, settings: torch.Tensor, days: int) -> torch.Tensor:
    """The daily returns `[tasks, days]` of staying long from the first day (the env charges the entry)."""
    batch = env.batch(settings, 1)
    batch.reset()
    return torch.stack([batch.step(torch.full((settings.shape[0], 1), 2))[1][:, 0] for _ in range(days)], 1)


def run_trading(cfg: TradingConfig, run: Run) -> dict:
    series, info, missing = assets(cfg)
    train_ids = [a for a, d in enumerate(info) if d["split"] in ("train", "real")]
    env = Trading(series, horizon=cfg.window, cost=cfg.cost, train_assets=train_ids,
                  train_end=[d["train_end"] or int(p.shape[0] - 1) for d, p in zip(info, series)])
    maml, pooled = make(cfg, env, cfg.inner_steps), make(cfg, env, 0)
    seconds = {"MAML": train(maml, env, cfg, run, "MAML"), "pooled": train(pooled, env, cfg, run, "pooled")}
    settings, groups = held_out_windows(cfg, info, env.days)
    support = settings - torch.tensor([0, cfg.window])  # the window before each test window
    n, W, seed = settings.shape[0], cfg.window, cfg.seed + 20_000

    def stacked(alg: MAMLRL) -> dict:
        return {k: v.detach().unsqueeze(0).expand(n, *v.shape) for k, v in alg.params().items()}

    daily = {}
    for k in range(1, cfg.eval_steps + 1):
        daily[f"MAML, {k} step{'s' * (k > 1)}"] = backtest(
            maml, maml.adapt_by_sampling(support, k, seed=seed)[0], env, settings, W)
    daily["pooled"] = backtest(pooled, stacked(pooled), env, settings, W)
    daily[f"pooled, {cfg.eval_steps} steps"] = backtest(
        pooled, pooled.adapt_by_sampling(support, cfg.eval_steps, seed=seed)[0], env, settings, W)
    scratch = make(cfg, env, 1)  # the seeded initialisation, never meta-trained
    daily["from scratch"] = backtest(scratch, scratch.adapt_by_sampling(
        support, cfg.scratch_steps, seed=seed, inner_lr=cfg.scratch_lr)[0], env, settings, W)
    daily["buy and hold"] = buy_and_hold(env, settings, W)

    metrics = {name: {"P&L %": 100 * markets.pnl(r), "Sharpe": markets.sharpe(r),
                      "max drawdown %": 100 * markets.max_drawdown(r)} for name, r in daily.items()}
    group_names = sorted(set(groups), key=lambda g: (g == "real", g))
    masks = {g: torch.tensor([x == g for x in groups]) for g in group_names}
    trending = [g for g in ("ou", "regime") if g in masks]
    if trending:
        masks["ou + regime"] = torch.stack([masks[g] for g in trending]).any(0)
    rows = []
    for g, m in masks.items():
        for name, ms in metrics.items():
            rows.append({"assets": g, "strategy": name, "windows": int(m.sum()),
                         **{f"{key} (95% CI)": "{:.2f} ± {:.2f}".format(*mean_ci95(v[m])) for key, v in ms.items()}})
    best = f"MAML, {cfg.eval_steps} steps" if cfg.eval_steps > 1 else "MAML, 1 step"
    claim: dict = {"assets": "ou + regime (held-out simulated)", "strategy": best}
    if trending:
        m = masks["ou + regime"]
        for other in ("pooled", "buy and hold", "from scratch"):
            for key in ("P&L %", "Sharpe"):
                claim[f"{key}: MAML minus {other}"] = list(mean_ci95(metrics[best][key][m] - metrics[other][key][m]))
        d, c = claim["P&L %: MAML minus pooled"]
        claim["holds"] = d - c > 0
    plot(run, metrics, masks, daily, cfg)
    real_names = [d["name"] for d in info if d["split"] == "real"]
    return {"table": rows, "claim": claim, "train_seconds": seconds, "real_series": real_names,
            "missing_real_series": missing,
            "note": (f"{cfg.iterations} Adam iterations of {cfg.meta_batch} tasks per trained policy (first-order "
                     f"MAML, inner rate {cfg.inner_lr}, K={cfg.episodes}); windows of {W} days; cost "
                     f"{cfg.cost * 1e4:.0f} bp per unit of position change; Sharpe annualised as "
                     "mean/std of daily returns x sqrt(252), zero risk-free rate, per window; 95% CIs over "
                     "(asset, window) pairs. "
                     + (f"Real series used: {', '.join(real_names)}. " if real_names else "No real series used. ")
                     + (f"Missing (simulated assets only for them): {', '.join(missing)}." if missing else ""))}


def plot(run: Run, metrics: dict, masks: dict, daily: dict, cfg: TradingConfig) -> None:
    import matplotlib.pyplot as plt

    keys = ("P&L %", "Sharpe", "max drawdown %")
    names = list(metrics)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    width = 0.8 / len(names)
    for ax, key in zip(axes, keys):
        for i, name in enumerate(names):
            stats = [mean_ci95(metrics[name][key][m]) for m in masks.values()]
            ax.bar([g + i * width for g in range(len(masks))], [s[0] for s in stats], width,
                   yerr=[s[1] for s in stats], capsize=2, label=name)
        ax.set_xticks([g + 0.4 - width / 2 for g in range(len(masks))], list(masks), fontsize=7)
        ax.set(title=f"{key} (95% CI)")
        ax.axhline(0, color="k", lw=0.5)
    axes[0].legend(fontsize=6)
    fig.suptitle(f"walk-forward test windows of {cfg.window} days", fontsize=9)
    run.save_figure(fig, "metrics")
    fig, axes = plt.subplots(1, len(masks), figsize=(3.2 * len(masks), 3), squeeze=False)
    for ax, (g, m) in zip(axes[0], masks.items()):
        for name, r in daily.items():
            ax.plot(markets.wealth(r[m]).mean(0), label=name, lw=1)
        ax.set(title=g, xlabel="test day", ylabel="mean wealth")
    axes[0][0].legend(fontsize=6)
    run.save_figure(fig, "wealth")


experiment("rl-trading", "trading as meta-RL: first-order MAML adapting a long/flat/short policy to a new asset's "
           "recent window vs pooled, from scratch and buy-and-hold (P&L, Sharpe, drawdown)", TradingConfig)(run_trading)
