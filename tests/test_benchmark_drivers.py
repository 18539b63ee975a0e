"""The benchmark drivers' own arithmetic: schedules fitted to a budget's iterations, the bf16 profile's workloads."""

import argparse
import dataclasses
import importlib.util
import json
from pathlib import Path

from metagrad.cli import parse_sets
from metagrad.experiments import get
from metagrad.experiments.omniglot import fitted_schedule
from metagrad.runs import Run

REPO = Path(__file__).resolve().parents[1]


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ablation_schedules_every_row_over_the_iterations_that_fit_its_budget(tmp_path, capsys):
    ab = load("maml_pp_ablation")
    cfg = get(ab.EXPERIMENT).make_config()
    assert (cfg.iterations, cfg.multi_step_loss_iters) == (125000, 10000)  # the MAML++ code's 20-way schedule
    assert fitted_schedule(cfg, 5000, 10) == {"iterations": 5000, "multi_step_loss_iters": 400, "val_every": 500}
    assert ab.rows(5000)["+DA"] == {"order_anneal_iters": 1666}

    calls = []

    def fake_run_row(name, changes, base, out):  # the probe: 10 iterations in 25 s; each row: what it was given
        calls.append((name, {**base, **changes}))
        if name == "probe":
            return {"train_seconds": 25.0, "iterations": 10}
        return {"accuracy": 0.9, "ci95": 0.01, "iterations": base["iterations"], "train_seconds": 3600.0}

    ab.run_row = fake_run_row
    ab.main(["--minutes", "60", "--out", str(tmp_path), "--rows=+DA,-CA", "--set", "curve_steps=5"])
    (probe_name, probe), *runs = calls
    assert probe_name == "probe" and probe["iterations"] == ab.PROBE and probe["budget_minutes"] == 0
    assert [name for name, _ in runs] == ["full", "+DA", "-CA"]
    for _, config in runs:  # 60 min at 2.5 s per iteration: 1,440 iterations, the MSL 10,000/125,000 of them
        assert (config["iterations"], config["multi_step_loss_iters"], config["val_every"]) == (1440, 115, 144)
        assert (config["budget_minutes"], config["curve_steps"]) == (60, "5")
    assert runs[1][1]["order_anneal_iters"] == 480 and runs[2][1]["lr_schedule"] == "constant"
    # the ensemble is tested on the full configuration only
    assert "ensemble" not in runs[0][1] and runs[1][1]["ensemble"] == runs[2][1]["ensemble"] == 0
    table = (tmp_path / "ablation.md").read_text()
    assert "scheduled over 1440 iterations (multi-step loss for the first 115)" in table

    calls.clear()  # --set wins over the fitted schedule, and a schedule length set so needs no probe
    ab.main(["--minutes", "60", "--out", str(tmp_path), "--rows=-MSL", "--set", "iterations=300",
             "--set", "val_every=100"])
    assert [name for name, _ in calls] == ["full", "-MSL"]
    full = calls[0][1]
    assert (full["iterations"], full["multi_step_loss_iters"], full["val_every"]) == ("300", 24, "100")
    assert calls[1][1]["multi_step_loss_iters"] == 0


def test_ablation_reads_rows_finished_with_the_same_config_and_trains_the_rest(tmp_path):
    ab = load("maml_pp_ablation")
    trained = []

    def fake_run_row(name, changes, base, out):  # writes the folder as `metagrad run` does: config.json, results
        trained.append(name)
        cfg = get(ab.EXPERIMENT).make_config(parse_sets(ab.sets_of({**base, **changes})))
        Run(ab.row_folder(name, out), dataclasses.asdict(cfg), overwrite=True)
        acc = {"full": 0.90, "-LSLR": 0.85, "-MSL": 0.88}[name]
        result = {"accuracy": acc, "ci95": 0.01, "iterations": base["iterations"], "train_seconds": 60.0}
        (ab.row_folder(name, out) / "results.json").write_text(json.dumps(result))
        return result

    ab.run_row = fake_run_row
    args = ["--out", str(tmp_path), "--iterations", "200"]
    ab.main(args + ["--rows=full"])  # one invocation trains full, another (on the other core) a row
    ab.main(args + ["--rows=-LSLR", "--no-full"])
    assert trained == ["full", "-LSLR"]
    rows = json.loads((tmp_path / "ablation.json").read_text())["rows"]
    assert [(r["row"], round(r["vs full (points)"], 6)) for r in rows] == [("full", 0.0), ("-LSLR", -5.0)]

    trained.clear()  # finished rows are read, not trained again; a new row is trained
    ab.main(args + ["--rows=-LSLR,-MSL"])
    assert trained == ["-MSL"]
    assert [r["row"] for r in json.loads((tmp_path / "ablation.json").read_text())["rows"]] == ["full", "-LSLR",
                                                                                                  "-MSL"]
    ab.main(args + ["--table"])  # trains nothing
    assert trained == ["-MSL"]
    ab.main(args + ["--rows=-LSLR", "--rerun"])
    assert trained == ["-MSL", "full", "-LSLR"]

    trained.clear()  # another schedule, seed or any config key is another experiment: nothing of it is read
    ab.main(["--out", str(tmp_path), "--iterations", "300", "--rows=-MSL"])
    ab.main(args + ["--rows=-MSL", "--set", "seed=1"])
    assert trained == ["full", "-MSL", "full", "-MSL"]
    assert ab.finished("full", {}, {"iterations": 200}, tmp_path / "nowhere") is None
    # a row that differs only in what is tested after training (the ensemble) is the same row
    base = {"iterations": 200, "seed": 1, "budget_minutes": 60.0, "device": "cpu", "path": "loop"}
    base.update(fitted_schedule(get(ab.EXPERIMENT).make_config(), 200, ab.VALIDATIONS))
    assert ab.finished("-MSL", {"multi_step_loss_iters": 0, "ensemble": 5}, base, tmp_path) is not None
    assert ab.finished("-MSL", {"multi_step_loss_iters": 1}, base, tmp_path) is None


def test_budget_recipe_fits_the_maml_plus_plus_schedule_to_its_budget(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))  # the driver imports its sibling speed.py
    ob = load("omniglot_budget")
    probed = []

    def fake_probe(cfg, args):  # 700 iterations fit the budget
        probed.append(cfg)
        return 700

    monkeypatch.setattr(ob, "probe_iterations", fake_probe)

    def config(recipe, *sets, **kw):
        args = argparse.Namespace(recipe=recipe, set=[tuple(s.split("=", 1)) for s in sets], path="loop", data="",
                                  device="cpu", seed=0, minutes=60.0, schedule_iterations=kw.get("length", 0),
                                  curve_steps=kw.get("curve_steps", 10), eval_tasks=600, inner_lr=kw.get("inner_lr"),
                                  val_characters=kw.get("val_characters", 100))
        return ob.recipe_config("20w1s", args)

    cfg, horizon = config("maml++")  # the MSL keeps its 10,000/125,000 share, 10 validations for the ensemble
    assert len(probed) == 1 and horizon == 700
    assert (cfg.iterations, cfg.multi_step_loss_iters, cfg.val_every, cfg.lr_schedule) == (700, 56, 70, "cosine")
    cfg, _ = config("maml++", "multi_step_loss_iters=0", "val_every=100", length=350)  # --set wins, no probe
    assert len(probed) == 1 and (cfg.iterations, cfg.multi_step_loss_iters, cfg.val_every) == (350, 0, 100)
    cfg, _ = config("maml++", "algorithm=maml", "order_anneal_iters=40000", "multi_step_loss_iters=20000", length=1000)
    assert (cfg.multi_step_loss_iters, cfg.order_anneal_iters) == (20000, 40000)
    cfg, horizon = config("paper", "order_anneal_iters=500")  # constant rate, warm-up as set: nothing to fit
    assert len(probed) == 1 and horizon == 0 and (cfg.order_anneal_iters, cfg.iterations) == (500, 60000)
    # The driver's --inner-lr and --curve-steps are the config's values, and --set is more specific still.
    assert (cfg.inner_lr, cfg.curve_steps, cfg.eval_tasks) == (0.1, 10, 600)  # the paper's 20-way rate
    cfg, _ = config("paper", inner_lr=0.4, curve_steps=7)
    assert (cfg.inner_lr, cfg.curve_steps) == (0.4, 7)
    cfg, _ = config("paper", "inner_lr=0.2", "curve_steps=3", inner_lr=0.4, curve_steps=7)
    assert (cfg.inner_lr, cfg.curve_steps) == (0.2, 3)
    cfg, _ = config("paper", "algorithm=maml++", length=600)  # a None stands for MAML++'s defaults, scaled
    assert (cfg.multi_step_loss_iters, cfg.order_anneal_iters) == (50, 250)
    # --val-characters reaches the config (0: all 1,200 characters train); --set wins again.
    assert cfg.val_characters == 100 and config("paper", val_characters=0)[0].val_characters == 0
    assert config("paper", "val_characters=50", val_characters=0)[0].val_characters == 50


def test_bf16_profile_builds_the_workloads_shapes_and_sorts_kernels_by_kind(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))  # the driver imports its sibling speed.py
    bp = load("bf16_profile")
    model, batch, inner_lr, steps = bp.problem("paper-20w1s")  # the MAML paper's 20-way: 1 query per class
    assert batch.support_x.shape == (16, 20, 1, 28, 28) and batch.query_x.shape == (16, 20, 1, 28, 28)
    assert (inner_lr, steps, model(batch.query_x[0]).shape) == (0.1, 5, (20, 20))
    assert [bp.kind(op) for op in ("aten::convolution_backward", "aten::mkldnn_convolution", "aten::copy_",
                                   "aten::native_batch_norm_backward", "aten::threshold_backward",
                                   "aten::max_pool2d_with_indices", "aten::mul")] == \
        ["convolution", "convolution", "dtype casts", "batch norm", "ReLU", "max-pool", "other"]


def test_learn2learn_anil_peer_computes_anils_meta_gradient(monkeypatch):
    """The budget benchmark's learn2learn ANIL peer (where learn2learn is installed: .venv-bench) computes the
    meta-gradient metagrad's ANIL computes, in float64: the two sides of the table run the same algorithm."""
    import pytest
    import torch
    from torch import nn

    from metagrad import TaskBatch
    from metagrad.algorithms import ANIL
    from metagrad.models import Conv4

    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    ob = load("omniglot_budget")
    why = ob.available("learn2learn-anil")
    if why:
        pytest.skip(f"learn2learn is not installed here ({why}): run with .venv-bench/bin/python")
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(5).expand(4, -1)
    batch = TaskBatch(torch.randn(4, 5, 1, 28, 28, generator=gen, dtype=torch.float64), labels,
                      torch.randn(4, 5, 1, 28, 28, generator=gen, dtype=torch.float64), labels)
    torch.manual_seed(0)
    model = Conv4(ways=5, hidden=8).double()
    ob.learn2learn_anil_step(model, nn.functional.cross_entropy, 0.3, 3, 2)(batch)
    theirs = torch.cat([p.grad.flatten() for p in model.parameters()])
    ours = ANIL(model, inner_lr=0.3, inner_steps=3, loss_fn=nn.functional.cross_entropy, path="loop")
    mine = torch.cat([g.flatten() for g in ours.meta_gradient(batch).values()])
    assert theirs.norm() > 0 and model.features[0].weight.grad.norm() > 0  # the body learns too
    assert ((mine - theirs).norm() / theirs.norm()).item() < 1e-12


def test_budget_evaluation_reports_eval_steps_and_keeps_the_longer_curve(monkeypatch):
    """An evaluation point's accuracy is the one after `eval_steps` inner steps (as evaluating with eval_steps
    alone on the same episodes gives it), while its curve runs on to --curve-steps."""
    import torch
    from torch import nn

    from metagrad import TaskBatch, evaluate
    from metagrad.algorithms import MAML
    from metagrad.models import Conv4

    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    ob = load("omniglot_budget")
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(5).repeat(2).expand(6, -1)  # [tasks, shots * ways]
    images = torch.randn(6, 10, 1, 28, 28, generator=gen)
    batch = TaskBatch(images, labels, images, labels)  # query = support: adaptation must raise the accuracy
    torch.manual_seed(0)
    alg = MAML(Conv4(ways=5, hidden=8), inner_lr=0.5, inner_steps=1, loss_fn=nn.functional.cross_entropy,
               path="loop")
    point, curve = ob.evaluated(alg, batch, 2, 4, 6, None, 12.5, 100, "test")
    alone = evaluate(alg, batch, 6, 2)
    assert point == (12.5, 100, alone.mean, alone.ci95)
    assert (curve["iterations"], curve["eval_steps"]) == (100, 2)
    assert len(curve["accuracy"]) == len(curve["ci95"]) == 5  # steps 0..4
    assert curve["accuracy"][:3] == alone.curve
    assert curve["accuracy"][4] > curve["accuracy"][0] + 0.3


def test_budget_peers_path_trains_and_evaluates_every_implementation_at_the_chosen_inner_rate(monkeypatch):
    """--inner-lr reaches every implementation's step and the evaluator; without it, the paper's rate of the task."""
    import torch

    from metagrad import TaskBatch

    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    ob = load("omniglot_budget")

    class Episodes:  # Omniglot's interface, random 5-way 1-shot episodes: no data needed
        def __init__(self, ways: int, shots: int, query_shots: int, val_characters: int, root, device: str,
                     split: str = "train"):
            self.ways = ways
            held_out.append(val_characters)

        def sample(self, n: int, gen: torch.Generator) -> TaskBatch:
            x, y = torch.randn(n, self.ways, 1, 28, 28, generator=gen), torch.arange(self.ways).expand(n, -1)
            return TaskBatch(x, y, x, y)

    trained, evaluated, held_out = [], [], []

    def step(model, loss_fn, inner_lr, steps, order, *path):
        trained.append(inner_lr)
        return lambda batch: model.head.weight.sum().backward()

    def evaluation(algorithm, test, eval_steps, curve_steps, eval_tasks, episodes, seconds, iterations, label):
        evaluated.append(algorithm.inner_lr)
        return (seconds, iterations, 0.5, 0.1), {}

    monkeypatch.setattr(ob, "Omniglot", Episodes)
    monkeypatch.setattr(ob, "ours_step", step)
    monkeypatch.setitem(ob.STEPS, "higher", step)
    monkeypatch.setattr(ob, "evaluated", evaluation)
    for cell, inner_lr, expected in (("5w1s", None, 0.4), ("20w1s", None, 0.1), ("20w1s", 0.4, 0.4)):
        args = argparse.Namespace(inner_lr=inner_lr, data="", device="cpu", seed=0, path="loop", outer_lr=1e-3,
                                  minutes=1e-9, evals=1, curve_steps=1, eval_tasks=1, recipe="", val_characters=100)
        rows = [ob.train_and_evaluate(impl, cell, args) for impl in ("metagrad", "higher")]
        assert trained[-2:] == evaluated[-2:] == [expected, expected]
        assert [r["impl"] for r in rows] == (["metagrad", "higher"] if inner_lr is None else
                                             ["metagrad (inner_lr=0.4)", "higher (inner_lr=0.4)"])
    # --val-characters 0: every implementation's task families train on all 1,200 characters, and the label says so.
    args.inner_lr, args.val_characters = None, 0
    held_out.clear()
    rows = [ob.train_and_evaluate(impl, "5w1s", args) for impl in ("metagrad", "higher")]
    assert held_out == [0, 0, 0, 0]  # train and test families of each
    assert [r["impl"] for r in rows] == ["metagrad (val_characters=0)", "higher (val_characters=0)"]


def test_budget_no_ours_runs_the_peers_alone_at_their_outer_rate(monkeypatch):
    """--no-ours trains the named peers only (at --outer-lr), and refuses to run nothing."""
    import pytest

    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    ob = load("omniglot_budget")
    ran = []
    monkeypatch.setattr(ob, "available", lambda peer: "")
    monkeypatch.setattr(ob, "train_and_evaluate", lambda impl, cell, args: ran.append((impl, cell, args.outer_lr)))
    monkeypatch.setattr(ob, "print_table", lambda rows, args: None)
    common = ["--tasks", "5w1s", "--minutes", "1", "--outer-lr", "2e-3"]
    ob.main(["--no-ours", "--peers", "learn2learn,higher", *common])
    assert ran == [("learn2learn", "5w1s", 2e-3), ("higher", "5w1s", 2e-3)]
    ob.main(["--peers", "learn2learn", *common])
    assert ran[2:] == [("metagrad", "5w1s", 2e-3), ("learn2learn", "5w1s", 2e-3)]
    with pytest.raises(SystemExit):
        ob.main(["--no-ours", "--peers", "", *common])
    assert len(ran) == 4
