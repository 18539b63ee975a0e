"""Client data that needs no download; each client is a one-task `TaskBatch` (its local support/query split).

    sinusoid_clients     one sinusoid task per client (metagrad.tasks.Sinusoid), optionally of different sizes
    synthetic_clients    LEAF's synthetic(alpha, beta) (Li et al. 2020, FedProx, Section 5.1), written out
    dirichlet_split      a non-IID split of labelled data over clients by per-class Dirichlet proportions
    digits_clients       scikit-learn's bundled digits, split by `dirichlet_split` (needs scikit-learn)
    medicine_clients     hospitals of the personalised-medicine family (a linear mixed-effects model one level up)
    omniglot_clients     Omniglot alphabets (background: training clients, evaluation: new clients), episodic
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from metagrad.core import TaskBatch
from metagrad.tasks import Sinusoid


def _positive(**kwargs: int) -> None:
    for name, v in kwargs.items():
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")


def split_client(x: Tensor, y: Tensor, support_fraction: float, generator: torch.Generator) -> TaskBatch:
    """One client's examples `x [n, ...]`, `y [n]` shuffled and split into support and query, as a one-task batch."""
    if not 0 < support_fraction < 1:
        raise ValueError(f"support_fraction must be in (0, 1), got {support_fraction!r}")
    n = len(x)
    if n < 2:
        raise ValueError(f"a client needs at least 2 examples (one support, one query), got {n}")
    order = torch.randperm(n, generator=generator)
    k = min(max(1, round(support_fraction * n)), n - 1)
    s, q = order[:k], order[k:]
    return TaskBatch(x[s][None], y[s][None], x[q][None], y[q][None])


def sinusoid_clients(n_clients: int, shots: int | Sequence[int] = 10, query_shots: int | Sequence[int] = 10,
                     generator: torch.Generator | None = None,
                     dtype: torch.dtype = torch.float32) -> dict[str, TaskBatch]:
    """`n_clients` sinusoid clients `client-<i>`, each one task (its own amplitude and phase); `shots` and
    `query_shots` may be one number or one per client (clients of different sizes)."""
    _positive(n_clients=n_clients)
    shots = [shots] * n_clients if isinstance(shots, int) else list(shots)
    query_shots = [query_shots] * n_clients if isinstance(query_shots, int) else list(query_shots)
    if len(shots) != n_clients or len(query_shots) != n_clients:
        raise ValueError(f"shots and query_shots need one value per client ({n_clients}), got {len(shots)} and "
                         f"{len(query_shots)}")
    out = {}
    for i, (s, q) in enumerate(zip(shots, query_shots)):
        out[f"client-{i}"] = Sinusoid(shots=s, query_shots=q, dtype=dtype).sample(1, generator)
    return out


@dataclass(frozen=True)
class SyntheticClient:
    """One device of synthetic(alpha, beta): its data and the draws that made it (for checking the statistics)."""

    x: Tensor  # [n, 60]
    y: Tensor  # [n] labels in 0..9
    W: Tensor  # [10, 60]
    b: Tensor  # [10]
    u: float  # the mean of W's and b's entries
    B: float  # the mean of v's entries
    v: Tensor  # [60], the mean of x


def synthetic_covariance(dimension: int = 60) -> Tensor:
    """The diagonal of Sigma: Sigma_jj = j^(-1.2), j = 1..dimension."""
    return torch.arange(1, dimension + 1, dtype=torch.float64) ** -1.2


def synthetic_sizes(n_clients: int, generator: torch.Generator) -> list[int]:
    """Samples per device as in the FedProx data generator: floor(lognormal(4, 2)) + 50 (a power law)."""
    z = torch.randn(n_clients, generator=generator, dtype=torch.float64)
    return [int(math.exp(4 + 2 * float(zi))) + 50 for zi in z]


def synthetic_devices(alpha: float, beta: float, n_clients: int = 30, sizes: Sequence[int] | None = None,
                      generator: torch.Generator | None = None, iid: bool = False, dimension: int = 60,
                      classes: int = 10) -> list[SyntheticClient]:
    """LEAF's synthetic(alpha, beta) (Li et al. 2020, "Federated Optimization in Heterogeneous Networks", 5.1).

    Device k: y = argmax(softmax(W_k x + b_k)), x in R^60, W_k in R^(10x60), b_k in R^10, with
    W_k ~ N(u_k, 1), b_k ~ N(u_k, 1), u_k ~ N(0, alpha); x_k ~ N(v_k, Sigma), Sigma diagonal with
    Sigma_jj = j^(-1.2), each entry of v_k ~ N(B_k, 1), B_k ~ N(0, beta). alpha and beta are standard
    deviations, as in the paper's generator code (numpy's `normal(0, alpha)`); they are the same as
    variances at the paper's settings 0 and 1. `iid=True`: one W, b for all devices and x ~ N(0, Sigma)
    (the paper's synthetic IID). Sizes: `sizes`, or the generator's floor(lognormal(4, 2)) + 50.
    """
    if alpha < 0 or beta < 0:
        raise ValueError(f"alpha and beta must be non-negative, got {alpha!r}, {beta!r}")
    _positive(n_clients=n_clients, dimension=dimension, classes=classes)
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    sizes = list(sizes) if sizes is not None else synthetic_sizes(n_clients, g)
    if len(sizes) != n_clients:
        raise ValueError(f"sizes needs one value per client ({n_clients}), got {len(sizes)}")
    std = synthetic_covariance(dimension).sqrt()
    f64 = torch.float64

    def normal(mean: float | Tensor, *shape: int) -> Tensor:
        return mean + torch.randn(*shape, generator=g, dtype=f64)

    u = (alpha * torch.randn(n_clients, generator=g, dtype=f64)).tolist()
    B = (beta * torch.randn(n_clients, generator=g, dtype=f64)).tolist()
    if iid:
        W_all, b_all = normal(0.0, classes, dimension), normal(0.0, classes)
    devices = []
    for k, n in enumerate(sizes):
        _positive(size=n)
        if iid:
            W, b, v, uk, Bk = W_all, b_all, torch.zeros(dimension, dtype=f64), 0.0, 0.0
        else:
            uk, Bk = u[k], B[k]
            W, b, v = normal(uk, classes, dimension), normal(uk, classes), normal(Bk, dimension)
        x = v + std * torch.randn(n, dimension, generator=g, dtype=f64)
        y = torch.argmax(torch.softmax(x @ W.T + b, dim=-1), dim=-1)
        devices.append(SyntheticClient(x, y, W, b, uk, Bk, v))
    return devices


def synthetic_clients(alpha: float, beta: float, n_clients: int = 30, support_fraction: float = 0.5,
                      generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32,
                      **kwargs) -> dict[str, TaskBatch]:
    """synthetic(alpha, beta) devices as clients `device-<k>`, each split into support and query."""
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    devices = synthetic_devices(alpha, beta, n_clients, generator=g, **kwargs)
    return {f"device-{k}": split_client(d.x.to(dtype), d.y, support_fraction, g) for k, d in enumerate(devices)}


def dirichlet_split(labels: Tensor, n_clients: int, concentration: float,
                    generator: torch.Generator | None = None, min_size: int = 2) -> list[Tensor]:
    """Indices of each client's examples: for every class, its examples are dealt to the clients in
    proportions drawn from Dirichlet(concentration * 1) (Hsu et al. 2019); small concentration, non-IID.
    Drawn again (up to 100 times) until every client has at least `min_size` examples."""
    _positive(n_clients=n_clients)
    if not concentration > 0:
        raise ValueError(f"concentration must be positive, got {concentration!r}")
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    labels = torch.as_tensor(labels)
    if len(labels) < n_clients * min_size:
        raise ValueError(f"{len(labels)} examples cannot give {n_clients} clients {min_size} each")
    alphas = torch.full((n_clients,), float(concentration), dtype=torch.float64)
    for _ in range(100):
        parts: list[list[Tensor]] = [[] for _ in range(n_clients)]
        for c in torch.unique(labels):
            idx = torch.nonzero(labels == c).flatten()
            idx = idx[torch.randperm(len(idx), generator=g)]
            # Dirichlet from gammas drawn with our generator (torch.distributions takes no generator).
            gam = _gamma(alphas, g)
            p = gam / gam.sum()
            cuts = (torch.cumsum(p, 0)[:-1] * len(idx)).round().long().tolist()
            for k, part in enumerate(torch.tensor_split(idx, cuts)):
                parts[k].append(part)
        out = [torch.sort(torch.cat(p)).values for p in parts]
        if min(len(p) for p in out) >= min_size:
            return out
    raise ValueError(f"no Dirichlet({concentration}) split in 100 draws gave every one of {n_clients} clients "
                     f"{min_size} examples; raise concentration or lower n_clients")


def _gamma(concentration: Tensor, g: torch.Generator) -> Tensor:
    """Gamma(concentration, 1) draws with an explicit generator (Marsaglia & Tsang 2000; boosted below 1)."""
    out = []
    for a in concentration.tolist():
        boost = a < 1
        d = (a + 1 if boost else a) - 1 / 3
        c = 1 / math.sqrt(9 * d)
        while True:
            z = float(torch.randn((), generator=g, dtype=torch.float64))
            v = (1 + c * z) ** 3
            if v <= 0:
                continue
            u = float(torch.rand((), generator=g, dtype=torch.float64))
            if math.log(max(u, 1e-300)) < 0.5 * z * z + d - d * v + d * math.log(v):
                break
        x = d * v
        if boost:
            x *= float(torch.rand((), generator=g, dtype=torch.float64)) ** (1 / a)
        out.append(x)
    return torch.tensor(out, dtype=torch.float64)


def digits_clients(n_clients: int = 10, concentration: float = 0.5, support_fraction: float = 0.5,
                   generator: torch.Generator | None = None,
                   dtype: torch.dtype = torch.float32) -> dict[str, TaskBatch]:
    """scikit-learn's bundled digits (1,797 images 8x8, no download) split non-IID over clients by
    `dirichlet_split`; x `[n, 64]` scaled to [0, 1], y the digit. Needs scikit-learn."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("digits_clients needs scikit-learn: pip install scikit-learn") from err
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    digits = load_digits()
    x = torch.as_tensor(digits.data, dtype=dtype) / 16.0
    y = torch.as_tensor(digits.target, dtype=torch.long)
    parts = dirichlet_split(y, n_clients, concentration, g)
    return {f"client-{k}": split_client(x[idx], y[idx], support_fraction, g) for k, idx in enumerate(parts)}


def medicine_clients(n_hospitals: int = 20, patients: int = 5, measurements: int = 4, hospital_sd: float = 0.5,
                     support_fraction: float = 0.5, generator: torch.Generator | None = None,
                     **family: Any) -> dict[str, TaskBatch]:
    """Hospitals `hospital-<h>` as clients: the personalised-medicine task family (a linear mixed-effects model)
    one level up. Hospital h's coefficients are the population's plus N(0, hospital_sd^2) per coefficient; its
    `patients` patients scatter around them by the family's `patient_sd`, each with `measurements` noisy
    measurements; the hospital's pooled measurements `[patients * measurements, covariates] -> [.., 1]` are
    split into support and query. `family`: PersonalisedMedicine's own fields (population_coef, noise_sd, ...)."""
    from metagrad.tasks.personalised_medicine import PersonalisedMedicine

    _positive(n_hospitals=n_hospitals, patients=patients, measurements=measurements)
    if not hospital_sd >= 0:
        raise ValueError(f"hospital_sd must be non-negative, got {hospital_sd!r}")
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    med = PersonalisedMedicine(**family)
    hospitals = PersonalisedMedicine(**{**family, "patient_sd": hospital_sd})
    out = {}
    for h, (coef, intercept) in enumerate(zip(*hospitals.sample_params(n_hospitals, g))):
        around = PersonalisedMedicine(**{**family, "population_coef": tuple(coef.tolist()),
                                         "population_intercept": float(intercept)})
        x, y = med.measurements(*around.sample_params(patients, g), measurements, g)  # [patients, measurements, ..]
        out[f"hospital-{h}"] = split_client(x.reshape(-1, med.covariates), y.reshape(-1, 1), support_fraction, g)
    return out


def omniglot_clients(split: str = "background", ways: int = 5, shots: int = 1, query_shots: int = 1,
                     rotations: bool = False, root: str | None = None) -> dict[str, Any]:
    """Omniglot alphabets as clients (Lake et al. 2015): `split="background"` gives the 30 background alphabets
    (for training), `"evaluation"` the 20 evaluation alphabets (new clients). Each client is an `Omniglot` task
    family restricted to its alphabet's characters: `client.sample(1, generator)` is a `ways`-way `shots`-shot
    episode of that alphabet (the client's local data for one round). Reads the data where `metagrad.tasks.
    omniglot` looks (`root`, `$METAGRAD_DATA`, ...); no download."""
    import copy

    from metagrad.tasks.omniglot import Omniglot, load

    if split not in ("background", "evaluation"):
        raise ValueError(f"split must be 'background' or 'evaluation', got {split!r}")
    whole = Omniglot(ways, shots, query_shots, split="train" if split == "background" else "test", protocol="lake",
                     rotations=rotations, root=root, val_characters=0)
    names = load(root)["alphabets"]
    alphabets: dict[str, list[int]] = {}
    for row, c in enumerate(whole.characters.tolist()):
        alphabets.setdefault(names[c], []).append(row)
    out = {}
    for name, rows in alphabets.items():
        client = copy.copy(whole)  # shares the decoded images; only the character set differs
        client.characters, client.images = whole.characters[rows], whole.images[rows]
        client.n_classes = len(rows) * (4 if rotations else 1)
        if ways > client.n_classes:
            raise ValueError(f"ways={ways} exceeds the {client.n_classes} classes of alphabet {name!r}")
        out[name] = client
    return out
