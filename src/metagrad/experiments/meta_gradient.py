"""meta-gradient: the exact (second-order) meta-gradient through k inner steps, checked, and first order.

MAML's meta-gradient of the query loss after k inner steps theta_k = theta_{k-1} - alpha grad L_s(theta_{k-1}) is

    d L_q(theta_k) / d theta = prod_{j<k} (I - alpha H_s(theta_j))^T  grad L_q(theta_k)      (order=2)

and first-order MAML drops the Jacobian product: grad L_q(theta_k) (order=1). The dropped factor is
I - alpha H, so first order is accurate exactly when alpha times the curvature (times k) is small.
On a quadratic bowl (Hessian A, B = I - alpha A) both are in closed form,
    exact: (B^k)^T A B^k (theta - c),    first order: A B^k (theta - c),
so along an eigen-direction of curvature lambda they differ by the factor (1 - alpha lambda)^k:
equal for alpha lambda -> 0, smaller as it grows, and of the wrong sign for an overshooting step
(alpha lambda > 1) with odd k. Where the training converges differs too: first order's fixed point
(sum A_i B_i^k)^-1 sum A_i B_i^k c_i weighs tasks by lambda (1 - alpha lambda)^k instead of
lambda (1 - alpha lambda)^(2k) (see quadratic-maml).

The experiment checks metagrad's order-2 meta-gradient against the closed form and central finite
differences (float64) on quadratic tasks, and against finite differences on the sinusoid MLP, and
measures how far first order is from it as alpha * curvature grows (curvature of the MLP: the top
eigenvalue of the support-loss Hessian, by power iteration).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from metagrad import core
from metagrad.algorithms import MAML
from metagrad.experiments import experiment
from metagrad.models import MLP
from metagrad.runs import Run
from metagrad.tasks import Sinusoid
from metagrad.tasks.quadratic import Quadratic, adapt_quadratic, quadratic_loss


@dataclass
class Config:
    dim: int = 4
    n_tasks: int = 8
    inner_lr: float = 0.1
    curvatures: tuple[float, ...] = (0.01, 0.1, 0.3, 0.6, 1.0, 1.5)  # alpha * largest eigenvalue
    inner_steps: tuple[int, ...] = (1, 2, 5)
    mlp_inner_lrs: tuple[float, ...] = (0.001, 0.01, 0.03, 0.1)
    mlp_tasks: int = 4
    fd_coords: int = 24   # MLP parameters checked by finite differences
    fd_eps: float = 1e-6
    seed: int = 0


def meta_grads(model: nn.Module, batch, inner_lr: float, steps: int) -> tuple[Tensor, Tensor]:
    """metagrad's MAML meta-gradient of the mean query loss, order 2 and order 1, flattened `[n_params]`."""
    out = []
    for order in (2, 1):
        maml = MAML(model, inner_lr=inner_lr, inner_steps=steps, order=order)
        model.zero_grad(set_to_none=True)
        maml.meta_loss(batch).backward()
        out.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    model.zero_grad(set_to_none=True)
    return out[0], out[1]


def finite_difference(model: nn.Module, batch, inner_lr: float, steps: int, coords: Tensor, eps: float) -> Tensor:
    """Central differences of the meta-loss along the flattened parameter coordinates `coords`."""
    maml = MAML(model, inner_lr=inner_lr, inner_steps=steps, order=2)
    flat = [p.detach().view(-1) for p in model.parameters()]
    offsets = torch.tensor([0] + [f.numel() for f in flat]).cumsum(0)
    out = []
    with torch.no_grad():
        for i in coords.tolist():
            j = int(torch.searchsorted(offsets, i, right=True)) - 1
            t, k = flat[j], i - int(offsets[j])
            old = t[k].item()
            t[k] = old + eps
            plus = float(maml.meta_loss(batch))
            t[k] = old - eps
            minus = float(maml.meta_loss(batch))
            t[k] = old
            out.append((plus - minus) / (2 * eps))
    return torch.tensor(out, dtype=torch.float64)


def cosine(a: Tensor, b: Tensor) -> float:
    """Cosine similarity of two flat vectors."""
    return float(a @ b / (a.norm() * b.norm()).clamp_min(1e-300))


def rel(a: Tensor, b: Tensor) -> float:
    """||a - b|| / ||b||."""
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def quadratic_rows(cfg: Config, g: torch.Generator) -> list[dict]:
    """Order 2 vs closed form vs finite differences, and first order vs exact, on quadratic bowls."""
    rows = []
    for s in cfg.curvatures:
        hi = s / cfg.inner_lr
        fam = Quadratic(cfg.dim, 0.0, 1.0, (hi / 4, hi))
        c, a = fam.sample_params(cfg.n_tasks, g)
        theta = torch.randn(cfg.dim, generator=g, dtype=torch.float64)
        for k in cfg.inner_steps:
            model = nn.Linear(cfg.dim, 1, bias=False).double()
            with torch.no_grad():
                model.weight.copy_(theta)
            exact, first = meta_grads(model, fam.batch(c, a), cfg.inner_lr, k)
            fd = finite_difference(model, fam.batch(c, a), cfg.inner_lr, k, torch.arange(cfg.dim), cfg.fd_eps)
            b = torch.linalg.matrix_power(torch.eye(cfg.dim, dtype=a.dtype) - cfg.inner_lr * a, k)
            diff = (theta - c).unsqueeze(-1)
            closed = (b.mT @ a @ b @ diff).mean(0).squeeze(-1)
            closed_first = (a @ b @ diff).mean(0).squeeze(-1)
            # Where each training converges: order 2 at the MAML optimum; order 1 at its fixed point,
            # reached only if the first-order "Hessian" sum A_i B_i^k is positive definite.
            m2, m1 = (b.mT @ a @ b).sum(0), (a @ b).sum(0)
            opt2 = torch.linalg.solve(m2, (b.mT @ a @ b @ c.unsqueeze(-1)).sum(0)).squeeze(-1)
            opt1 = torch.linalg.solve(m1, (a @ b @ c.unsqueeze(-1)).sum(0)).squeeze(-1)
            stable = bool(torch.linalg.eigvalsh(m1).min() > 0)

            def post(th: Tensor, c: Tensor = c, a: Tensor = a, k: int = k) -> float:
                return float(quadratic_loss(adapt_quadratic(th, c, a, cfg.inner_lr, k), c, a).mean())

            rows.append({"tasks": "quadratic", "alpha_lambda_max": s, "inner_steps": k,
                         "order2_vs_closed_form": rel(exact, closed), "order2_vs_fd": rel(exact, fd),
                         "order1_vs_closed_form": rel(first, closed_first),
                         "cos_order1_order2": cosine(first, exact), "rel_err_order1": rel(first, exact),
                         "order1_fixed_point_excess": (post(opt1) / post(opt2) - 1) if stable else float("inf")})
    return rows


def top_hessian_eig(model: nn.Module, batch, iterations: int = 30) -> float:
    """Largest-magnitude eigenvalue of the support-loss Hessian at the start (power iteration, mean over tasks)."""
    params = [p.detach().requires_grad_(True) for p in model.parameters()]
    names = [n for n, _ in model.named_parameters()]
    f = core.functional(model)
    loss = torch.stack([nn.functional.mse_loss(f(dict(zip(names, params)), batch.support_x[i]), batch.support_y[i])
                        for i in range(len(batch))]).mean()
    grads = torch.autograd.grad(loss, params, create_graph=True)
    gen = torch.Generator().manual_seed(1)
    v = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
    lam = 0.0
    for _ in range(iterations):
        norm = torch.sqrt(sum((t ** 2).sum() for t in v))
        v = [t / norm for t in v]
        hv = torch.autograd.grad(grads, params, v, retain_graph=True)
        lam = float(sum((h * t).sum() for h, t in zip(hv, v)))
        v = list(hv)
    return abs(lam)


def mlp_rows(cfg: Config, g: torch.Generator) -> list[dict]:
    """Order 2 vs finite differences and first order vs order 2 on the sinusoid MLP (float64)."""
    torch.manual_seed(cfg.seed)  # nn.Linear's initialisation
    model = MLP((1, 40, 40, 1)).double()
    batch = Sinusoid(shots=10, query_shots=10, dtype=torch.float64).sample(cfg.mlp_tasks, g)
    lam = top_hessian_eig(model, batch)
    n = sum(p.numel() for p in model.parameters())
    coords = torch.randperm(n, generator=g)[:cfg.fd_coords]
    rows = []
    for lr in cfg.mlp_inner_lrs:
        for k in cfg.inner_steps:
            exact, first = meta_grads(model, batch, lr, k)
            fd = finite_difference(model, batch, lr, k, coords, cfg.fd_eps)
            rows.append({"tasks": "sinusoid MLP", "inner_lr": lr, "alpha_lambda_max": lr * lam, "inner_steps": k,
                         "order2_vs_fd": rel(exact[coords], fd),
                         "cos_order1_order2": cosine(first, exact), "rel_err_order1": rel(first, exact)})
    return rows


@experiment("meta-gradient", "Second-order meta-gradient vs finite differences and vs first order", Config)
def run_meta_gradient(cfg: Config, run: Run) -> dict:
    """Tables of gradient errors; plot of first order's agreement with the exact meta-gradient vs alpha*lambda."""
    import matplotlib.pyplot as plt

    g = torch.Generator().manual_seed(cfg.seed)
    quad, mlp = quadratic_rows(cfg, g), mlp_rows(cfg, g)
    fig, ax = plt.subplots(1, 3, figsize=(18, 4.8))
    for part, rows in ((0, quad), (2, mlp)):
        for k in cfg.inner_steps:
            pts = sorted((r["alpha_lambda_max"], r["cos_order1_order2"]) for r in rows if r["inner_steps"] == k)
            ax[part].semilogx([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"inner_steps={k}")
        ax[part].axhline(0, color="gray", lw=0.8)
        ax[part].axvline(1, ls="--", color="gray", lw=0.8)
        ax[part].set(xlabel="inner_lr x largest support-Hessian eigenvalue", ylabel="cos(order 1, order 2)",
                     ylim=(-1.05, 1.05))
        ax[part].legend()
    for k in cfg.inner_steps:
        pts = sorted((r["alpha_lambda_max"], r["order1_fixed_point_excess"]) for r in quad
                     if r["inner_steps"] == k and r["order1_fixed_point_excess"] < float("inf"))
        ax[1].loglog([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"inner_steps={k}")
    ax[1].axvline(1, ls="--", color="gray", lw=0.8)
    ax[1].set(xlabel="inner_lr x largest eigenvalue", ylabel="post-adaptation loss: order 1 / order 2 - 1",
              title="quadratic: where first-order training converges\n(missing point: its fixed point is unstable)")
    ax[1].legend()
    ax[0].set_title(f"quadratic bowls (dim {cfg.dim}, condition 4): gradient direction")
    ax[2].set_title("sinusoid MLP 1-40-40-1 (float64): gradient direction")
    run.save_figure(fig, "meta_gradient")

    def fmt(r: dict) -> dict:
        return {k: (float(f"{v:.3g}") if isinstance(v, float) else v) for k, v in r.items()}

    return {"table": [fmt(r) for r in quad + mlp]}
