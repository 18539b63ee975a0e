"""Every task family `metagrad list` offers trains with every registered algorithm (a few tiny iterations)."""

import json
from pathlib import Path

import pytest
import torch
from conftest import OMNIGLOT

from metagrad.cli import main
from metagrad.evaluation import evaluate
from metagrad.tasks import load_families
from metagrad.train import algorithms, build, meta_train

# Tiny sizes where a family's defaults are large; every other family runs with its defaults.
TINY = {"omniglot": {"ways": 2, "shots": 1, "query_shots": 1, "root": str(OMNIGLOT)}}


def family_params() -> list:
    return list(_family_params())


def _family_params():
    for name in sorted(load_families()):
        if name == "omniglot":
            have = (OMNIGLOT / "images_background.zip").is_file() and (OMNIGLOT / "images_evaluation.zip").is_file()
            # The first use decodes 32,000 images into the cache: minutes, so with the slow tests.
            yield pytest.param(name, marks=[pytest.mark.slow, pytest.mark.data, pytest.mark.skipif(
                not have, reason=f"Omniglot data not found in {OMNIGLOT}")])
        else:
            yield name


def test_the_grid_covers_every_listed_family_and_algorithm():
    assert {p if isinstance(p, str) else p.values[0] for p in family_params()} == set(load_families())
    assert {"graph-sbm", "linear-gaussian", "quadratic"} <= set(load_families())
    assert len(algorithms()) >= 10


@pytest.mark.parametrize("family", family_params())
def test_every_algorithm_trains_and_evaluates_on_the_family(family, one_thread):
    spec_base = {"tasks": family, "task_args": TINY.get(family, {})}
    for name in sorted(algorithms()):
        alg, tasks = build({**spec_base, "algorithm": name}, seed=0)
        example = tasks.sample(1, torch.Generator().manual_seed(0))
        result = meta_train(alg, tasks, 2, meta_batch=2, progress=False)
        assert result.iteration == 2, (family, name)
        assert all(torch.isfinite(p).all() for p in alg.parameters()), (family, name)
        if example.support_x.is_floating_point():  # the model computes in the data's precision
            assert next(alg.parameters()).dtype == example.support_x.dtype, (family, name)
        r = evaluate(alg, tasks, n_tasks=2, steps=1, generator=torch.Generator().manual_seed(1))
        assert len(r.curve) == 2, (family, name)


@pytest.mark.parametrize("family", ["graph-sbm", "linear-gaussian", "quadratic"])
def test_metagrad_train_on_the_families_that_crashed(family, tmp_path, monkeypatch, one_thread, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--tasks", family, "--iterations", "3", "--meta-batch", "2", "--eval-tasks", "4",
                 "--log-every", "1", "--no-progress", "--out", "r"]) == 0
    results = json.loads(Path("r/results.json").read_text())
    assert results["table"][0]["tasks"] == family and results["table"][0]["iterations"] == 3
    assert main(["eval", "r", "--n-tasks", "4"]) == 0  # rebuilt from the checkpoint's spec, same precision
