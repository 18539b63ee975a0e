"""The federated experiments (federated-cost, federated-personalisation) and the client families they add
(hospitals of the personalised-medicine family, Omniglot alphabets)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import OMNIGLOT

from metagrad import federated as fed
from metagrad.evaluation import mean_ci95
from metagrad.experiments import get
from metagrad.federated import data as fdata
from metagrad.runs import Run

pytestmark = pytest.mark.usefixtures("one_thread")


def test_medicine_clients_are_hospitals_of_the_mixed_effects_model():
    clients = fdata.medicine_clients(4, patients=3, measurements=4, generator=torch.Generator().manual_seed(0))
    assert list(clients) == [f"hospital-{h}" for h in range(4)]
    for c in clients.values():
        assert c.support_x.shape == (1, 6, 4) and c.query_x.shape == (1, 6, 4) and c.query_y.shape == (1, 6, 1)
    # No spread between hospitals or patients and no noise: every hospital follows the population's law exactly.
    exact = fdata.medicine_clients(3, hospital_sd=0.0, patient_sd=0.0, noise_sd=0.0,
                                   generator=torch.Generator().manual_seed(1))
    beta, beta0 = torch.tensor([0.8, -0.5, 0.3, 0.6]), 1.0
    for c in exact.values():
        torch.testing.assert_close(c.support_y[0], c.support_x[0] @ beta[:, None] + beta0)
    # Hospitals differ by hospital_sd: least squares on many measurements of one hospital recovers its own
    # coefficients, which scatter around the population's with about that sd.
    many = fdata.medicine_clients(40, patients=50, measurements=10, hospital_sd=0.5, patient_sd=0.0, noise_sd=0.0,
                                  generator=torch.Generator().manual_seed(2))
    coefs = []
    for c in many.values():
        x = torch.cat([c.support_x[0], torch.ones(len(c.support_x[0]), 1)], 1)
        coefs.append(torch.linalg.lstsq(x, c.support_y[0]).solution.flatten())
    spread = torch.stack(coefs).std(0)
    assert bool(((spread > 0.3) & (spread < 0.75)).all()), spread  # sd 0.5 estimated from 40 hospitals
    with pytest.raises(ValueError, match="hospital_sd"):
        fdata.medicine_clients(2, hospital_sd=-1.0)


@pytest.mark.data
def test_omniglot_alphabets_are_clients():
    if not (OMNIGLOT / "images_background.zip").is_file():
        pytest.skip(f"Omniglot data not found in {OMNIGLOT}")
    train = fdata.omniglot_clients("background", ways=5, shots=1, query_shots=2, root=str(OMNIGLOT))
    new = fdata.omniglot_clients("evaluation", ways=5, shots=1, query_shots=2, root=str(OMNIGLOT))
    assert (len(train), len(new)) == (30, 20) and not set(train) & set(new)
    assert sum(len(c.characters) for c in train.values()) == 964
    assert sum(len(c.characters) for c in new.values()) == 659
    client = train["Latin"]
    assert len(client.characters) == 26
    batch = client.sample(1, torch.Generator().manual_seed(0))
    assert batch.support_x.shape == (1, 5, 1, 28, 28) and batch.query_x.shape == (1, 10, 1, 28, 28)
    # an episode of the Latin client holds Latin characters only: every support image is one of its drawings
    drawings = client.images.flatten(0, 1).float() / 255  # [characters * 20, 28, 28]
    for img in batch.support_x[0, :, 0]:
        assert bool(((drawings - img).abs().flatten(1).max(1).values == 0).any())


def _short(exp_name: str, tmp_path, **overrides):
    exp = get(exp_name)
    cfg = exp.make_config({k: str(v) for k, v in overrides.items()})
    return exp.fn(cfg, Run(tmp_path / exp_name, {}))


def test_federated_cost_bytes_equal_flops_differ_as_counted(tmp_path):
    pytest.importorskip("flwr")
    results = _short("federated-cost", tmp_path, inner_steps="1,3", strategies="fedmaml,fedmaml-fo,metasgd",
                     clients=2, repeats=1)
    # MLP 1-40-40-1 on 10 support and 10 query points: forward F = 2*10*(40 + 1600 + 40) = 33,600 FLOPs, first
    # layer f1 = 800; order 1: k (3F - f1) + 3F - f1; order 2: k (9F - 5 f1) + 3F - f1 (the module's count).
    F, f1 = 33600, 800
    by = {(m["strategy"], m["inner_steps"]): m for m in results["measurements"]}
    for k in (1, 3):
        assert by[("fedmaml-fo", k)]["flops"] == [k * (3 * F - f1) + 3 * F - f1] * 2
        assert by[("fedmaml", k)]["flops"] == [k * (9 * F - 5 * f1) + 3 * F - f1] * 2
        claim = results["claim"][f"k={k}"]
        assert claim["bytes_up_equal"]
        assert claim["order1_flops_over_analytic"] == claim["order2_flops_over_analytic"] == 1.0
        assert claim["flops_ratio"] == pytest.approx((k * (9 * F - 5 * f1) + 3 * F - f1)
                                                     / (k * (3 * F - f1) + 3 * F - f1))
        assert claim["flops_ratio"] > 1.9
        # one model-sized float32 vector up: 1,761 parameters, the ArrayRecord's framing under 10%
        assert claim["model_bytes"] == 1761 * 4 <= claim["bytes_up"] < 1.1 * 1761 * 4 + 1024
        assert claim["memory_ratio"] > 1.0
        # Meta-SGD uploads its learned rates too: twice the model
        assert by[("metasgd", k)]["up_arrays"][0] > 1.9 * by[("fedmaml", k)]["up_arrays"][0]
    assert results["claim"]["k=3"]["flops_ratio"] > results["claim"]["k=1"]["flops_ratio"]  # toward 3 with k
    assert (tmp_path / "federated-cost" / "federated_cost.png").is_file()


def test_wire_bytes_are_flowers_serialized_messages():
    pytest.importorskip("flwr")
    from metagrad.experiments.federated_common import wire_bytes
    from metagrad.federated.flower import to_record

    theta = {"w": torch.zeros(1000), "b": torch.zeros(10)}
    update = fed.ClientUpdate({"w": torch.ones(1000), "b": torch.ones(10)}, 20, {"meta_loss": 0.5})
    wire = wire_bytes(theta, update)
    assert 4040 < wire["up_arrays"] < 4040 + 512
    assert wire["up"] > wire["up_arrays"] and wire["down"] > wire["up_arrays"]
    assert to_record(update.update).count_bytes() <= wire["up_arrays"]


def test_federated_personalisation_short(tmp_path):
    pytest.importorskip("flwr")
    pytest.importorskip("sklearn")
    results = _short("federated-personalisation", tmp_path, strategies="fedavg,fedavg+ft,fedreptile,fedmaml",
                     clients=12, new_clients=8, clients_per_round=6, rounds=12, eval_every=3, local_only_steps=20)
    curves = results["curves"]
    assert curves["fedmaml"]["rounds"] == [0, 3, 6, 9, 12]
    # FedReptile with local_steps steps on all local data and server SGD at lr 1 is FedAvg+FT exactly
    assert curves["fedreptile"]["mean"] == pytest.approx(curves["fedavg+ft"]["mean"], abs=1e-6)
    # bytes per round: the same model-sized vectors for FedAvg and FedMAML (their metrics differ by a few bytes)
    assert abs(curves["fedmaml"]["bytes_per_round"] - curves["fedavg"]["bytes_per_round"]) < 0.01 * \
        curves["fedavg"]["bytes_per_round"]
    # federated training helps new clients: after 12 rounds, FedMAML and FedAvg+FT with k=5 local steps beat
    # the same 5 steps from the initial model (local-only) on every new client taken together: the paired
    # difference's 95% CI is above zero
    alone = torch.tensor(results["local_only"]["local-only (5 steps)"]["per_client"])
    for name in ("fedmaml", "fedavg+ft"):
        diff, ci = mean_ci95(torch.tensor(results["per_client_final"][name]) - alone)
        assert diff - ci > 0.05, (name, diff, ci)
        assert curves[name]["mean"][-1] > curves[name]["mean"][0] + 0.1
    assert len(results["targets"]) == 3 and results["fedmeta_comparison"]
    assert json.loads(json.dumps(results, default=str))
    assert (tmp_path / "federated-personalisation" / "federated_personalisation.png").is_file()
