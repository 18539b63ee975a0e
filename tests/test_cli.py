"""The `metagrad` command: each subcommand writes the files and lines it promises; bad input is one line."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import one_line_error

from metagrad.cli import main
from metagrad.runs import read_checkpoint

TINY_TRAIN = ["train", "--iterations", "20", "--meta-batch", "4", "--inner-lr", "0.02", "--inner-steps", "1",
              "--order", "2", "--eval-tasks", "40", "--log-every", "5", "--no-progress"]
TINY_SINUSOID = ["--set", "iterations=10", "--set", "eval_tasks=20", "--set", "eval_steps=2",
                 "--set", "pretrain_lrs=0.01,0.02", "--set", "val_every=5"]


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)


def test_list_names_experiments_algorithms_and_families(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    sections = out.split("algorithms (")
    assert "sinusoid-paper" in sections[0] and "  sinusoid " in sections[0]
    assert "  maml " in sections[1].split("task families")[0]
    assert "  sinusoid " in sections[1].split("task families")[1]


def test_bad_names_and_keys_are_one_line_errors(capsys):
    one_line_error(capsys, ["run", "nope"], "unknown experiment 'nope'", "sinusoid")
    one_line_error(capsys, ["run", "sinusoid", "--set", "nope=1"], "unknown config key(s) ['nope']", "inner_lr")
    one_line_error(capsys, ["run", "sinusoid", "--set", "iterations=ten"], "'iterations' expects int, got 'ten'")
    one_line_error(capsys, ["train", "--algorithm", "nope"], "unknown algorithm 'nope'; known:", "maml")
    one_line_error(capsys, ["train", "--tasks", "nope"], "unknown task family 'nope'")
    one_line_error(capsys, ["train", "--set", "inner_rate=1"], "unknown config key(s) ['inner_rate']")
    one_line_error(capsys, ["eval", "missing/checkpoint.safetensors"], "missing/checkpoint.safetensors does not exist")
    one_line_error(capsys, ["report", "missing"], "run folder missing does not exist")
    one_line_error(capsys, ["download", "mnist"], "unknown dataset 'mnist'; known: omniglot")


def test_train_writes_the_run_folder_and_eval_reproduces_its_number(capsys):
    assert main([*TINY_TRAIN, "--val-every", "10", "--out", "r"]) == 0
    out = capsys.readouterr().out
    assert "| maml | sinusoid | 20 | done |" in out
    for name in ("config.json", "metrics.jsonl", "results.json", "checkpoint.safetensors", "training.png"):
        assert (Path("r") / name).is_file(), name
    config = json.loads(Path("r/config.json").read_text())
    assert config["inner_lr"] == 0.02 and config["iterations"] == 20 and config["algorithm"] == "maml"
    lines = [json.loads(x) for x in Path("r/metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [5, 10, 15, 20] and "gap" in lines[1]
    results = json.loads(Path("r/results.json").read_text())
    assert results["eval"]["n_tasks"] == 40
    assert results["command"] == "metagrad " + " ".join([*TINY_TRAIN, "--val-every", "10", "--out", "r"])
    assert main(["eval", "r/checkpoint.safetensors", "--n-tasks", "40"]) == 0
    evaluated = json.loads(Path("r/eval.json").read_text())
    assert evaluated["curve"] == results["eval"]["curve"]  # same held-out tasks, same numbers
    assert main([*TINY_TRAIN, "--out", "r"]) == 2  # the folder holds a run: no silent overwrite
    assert "--resume" in capsys.readouterr().err


def test_train_resume_from_cli_equals_one_long_run(capsys):
    assert main([*TINY_TRAIN, "--out", "long"]) == 0
    short = [a if a != "20" else "8" for a in TINY_TRAIN]
    assert main([*short, "--out", "split"]) == 0
    assert main(["train", "--out", "split", "--resume", "--iterations", "20", "--no-progress"]) == 0
    a = read_checkpoint("long/checkpoint.safetensors")["algorithm"]
    b = read_checkpoint("split/checkpoint.safetensors")["algorithm"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert main(["train", "--out", "split", "--resume", "--inner-lr", "0.5", "--no-progress"]) == 2
    assert "different config" in capsys.readouterr().err


def test_train_set_keys_take_json_for_optional_values_and_argument_tables(capsys):
    assert main([*TINY_TRAIN, "--out", "r", "--set", "eval_steps=3", "--set", "budget_minutes=null",
                 "--set", 'algorithm_args={"lslr": true}']) == 0
    config = json.loads(Path("r/config.json").read_text())
    assert (config["eval_steps"], config["budget_minutes"], config["algorithm_args"]) == (3, None, {"lslr": True})
    state = read_checkpoint("r/checkpoint.safetensors")["algorithm"]
    assert state["inner_meta_params.0__weight"].shape == (1,)  # MAML++'s per-layer per-step rates were trained
    assert json.loads(Path("r/results.json").read_text())["eval"]["steps"] == 3
    one_line_error(capsys, ["train", "--set", "algorithm_args=lslr"], "'algorithm_args' expects a JSON object")


def test_train_lr_schedule_flags(capsys):
    from metagrad.train import outer_lr_at

    assert main([*TINY_TRAIN, "--out", "r", "--lr-schedule", "cosine", "--min-outer-lr", "1e-5"]) == 0
    config = json.loads(Path("r/config.json").read_text())
    assert (config["lr_schedule"], config["min_outer_lr"]) == ("cosine", 1e-5)
    lines = [json.loads(x) for x in Path("r/metrics.jsonl").read_text().splitlines()]
    last = sum(outer_lr_at(i, 20, 1e-3, "cosine", 1e-5) for i in range(15, 20)) / 5
    assert lines[-1]["outer_lr"] == pytest.approx(last, rel=1e-12) and last < 1e-4
    one_line_error(capsys, [*TINY_TRAIN, "--out", "s", "--lr-schedule", "step"], "lr_schedule must be one of")
    assert not Path("s").exists()  # refused before the run folder is made


@pytest.mark.parametrize("suffix", [".json", ".toml"])
def test_train_config_file(suffix, capsys):
    if suffix == ".toml":
        pytest.importorskip("tomllib")
        Path("c.toml").write_text('iterations = 6\nmeta_batch = 3\neval_tasks = 10\n[task_args]\nshots = 4\n')
    else:
        Path("c.json").write_text(json.dumps({"iterations": 6, "meta_batch": 3, "eval_tasks": 10,
                                              "task_args": {"shots": 4}}))
    assert main(["train", "--config", f"c{suffix}", "--meta-batch", "2", "--out", "r", "--no-progress"]) == 0
    config = json.loads(Path("r/config.json").read_text())
    assert (config["iterations"], config["meta_batch"], config["task_args"]) == (6, 2, {"shots": 4})
    Path("bad.json").write_text(json.dumps({"iteration": 6}))
    one_line_error(capsys, ["train", "--config", "bad.json"], "unknown config key(s) ['iteration']")


def test_run_sinusoid_and_report(capsys):
    assert main(["run", "sinusoid", *TINY_SINUSOID]) == 0
    out = capsys.readouterr().out
    assert "| MAML | 10 | 1 |" in out and "| pretrained | 10 | 1 |" in out
    run = Path("runs/sinusoid")
    for name in ("config.json", "results.json", "adaptation_curve.png", "fitted_curves.png",
                 "maml/checkpoint.safetensors", "maml/metrics.jsonl", "maml/config.json",
                 "pretrain/checkpoint.safetensors"):
        assert (run / name).is_file(), name
    results = json.loads((run / "results.json").read_text())
    assert results["experiment"] == "sinusoid" and len(results["curves"]["maml"]["curve"]) == 3
    assert main(["train", *TINY_TRAIN[1:], "--out", "runs/t"]) == 0
    assert main(["report", "runs/sinusoid", "runs/t", "--out", "docs/experiments.md"]) == 0
    page = Path("docs/experiments.md").read_text()
    assert "## sinusoid (`runs/sinusoid`)" in page and "## train-maml-sinusoid (`runs/t`)" in page
    assert "| algorithm | K | steps | query MSE (ours, 95% CI) | MAML paper | Meta-SGD paper |" in page
    mse = results["table"][0]["query MSE (ours, 95% CI)"]
    assert f"| MAML | 10 | 1 | {mse} |" in page  # the run's number, not a retyped one
    for png in ("runs-sinusoid-adaptation_curve.png", "runs-sinusoid-fitted_curves.png", "runs-t-training.png"):
        assert f"(img/{png})" in page and Path("docs/img", png).is_file()


def test_sigterm_to_the_command_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "metagrad.cli", *TINY_TRAIN, "--iterations", "1000000", "--log-every", "1",
         "--out", "r"], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "r" / "metrics.jsonl"
    deadline = time.time() + 60
    while not (metrics.exists() and metrics.read_text().count("\n") >= 3) and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "checkpoint saved" in err and "--resume" in err and "Traceback" not in err
    ckpt = read_checkpoint(tmp_path / "r" / "checkpoint.safetensors")
    assert ckpt["iteration"] >= 3
    assert ckpt["iteration"] == json.loads(metrics.read_text().splitlines()[-1])["step"]


@pytest.mark.slow
def test_readme_example_runs(capsys):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = readme.split("## 30-second example")[1].split("```python\n")[1].split("```")[0]
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    result = namespace["result"]
    # 2,000 iterations of MAML: ten steps from its start fit a new sinusoid far better than the start itself.
    assert result.n_tasks == 1000 and len(result.curve) == 11
    assert result.curve[10] + result.curve_ci95[10] < 0.5 * (result.curve[0] - result.curve_ci95[0])
    assert "95% CI, 1000 tasks" in capsys.readouterr().out


RESUMABLE = ["--set", "iterations=400", "--set", "val_every=100", "--set", "eval_tasks=20", "--set", "eval_steps=2",
             "--set", "pretrain_lrs=0.01,0.02"]


@pytest.mark.slow  # ~18 s on the shared 2-core machine: two runs and a process start
def test_run_interrupted_by_ctrl_c_then_resumed_equals_an_uninterrupted_run(tmp_path, capsys):
    assert main(["run", "sinusoid", *RESUMABLE, "--out", "full"]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "metagrad", "run", "sinusoid", *RESUMABLE, "--out", "cut"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "cut" / "maml" / "metrics.jsonl"
    deadline = time.time() + 60
    while not (metrics.exists() and metrics.read_text().strip()) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)  # Ctrl-C
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "--resume" in err and "Traceback" not in err, err
    assert not Path("cut/results.json").exists()
    stopped_at = read_checkpoint("cut/maml/checkpoint.safetensors")["iteration"]
    assert 50 <= stopped_at < 400
    assert main(["run", "sinusoid", "--out", "cut", "--resume"]) == 0  # its saved config: tuples and all
    for child in ("maml", "pretrain"):
        a, b = read_checkpoint(f"full/{child}/checkpoint.safetensors"), read_checkpoint(
            f"cut/{child}/checkpoint.safetensors")
        assert a["iteration"] == b["iteration"] == 400
        assert all(torch.equal(a["algorithm"][k], b["algorithm"][k]) for k in a["algorithm"])
        assert all(torch.equal(x, b["optimizer"]["state"][i][k]) for i, s in a["optimizer"]["state"].items()
                   for k, x in s.items())
        assert Path(f"full/{child}/metrics.jsonl").read_text().count("\n") == Path(
            f"cut/{child}/metrics.jsonl").read_text().count("\n")
    full, cut = (json.loads(Path(f"{d}/results.json").read_text()) for d in ("full", "cut"))
    assert full["curves"] == cut["curves"]
    assert [{k: v for k, v in r.items() if k != "train seconds"} for r in full["table"]] == \
        [{k: v for k, v in r.items() if k != "train seconds"} for r in cut["table"]]


def test_resume_without_a_checkpoint_is_refused(capsys):
    one_line_error(capsys, ["run", "sinusoid", "--out", "nothing", "--resume"], "nothing does not exist",
                   "without --resume")
    Path("empty").mkdir()
    one_line_error(capsys, ["train", "--out", "empty", "--resume"], "empty holds no checkpoint")
    assert not Path("nothing").exists() and not any(Path("empty").iterdir())


@pytest.mark.slow
@pytest.mark.data
def test_omniglot_run_interrupted_then_resumed_equals_an_uninterrupted_run(tmp_path, capsys):
    from conftest import OMNIGLOT

    if not (OMNIGLOT / "images_background.zip").is_file():
        pytest.skip(f"Omniglot data not found in {OMNIGLOT}")
    # path=loop: `auto` picks a conv net's path by timing, which two fresh processes may pick differently.
    tiny = ["--set", "iterations=30", "--set", "meta_batch=2", "--set", "hidden=8", "--set", "eval_tasks=10",
            "--set", "curve_steps=1", "--set", "val_every=0", "--set", "log_every=5", "--set", "path=loop",
            "--set", f"data={OMNIGLOT}"]
    assert main(["run", "omniglot-5w1s", *tiny, "--out", "full"]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "metagrad", "run", "omniglot-5w1s", *tiny, "--out", "cut"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "cut" / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and metrics.read_text().strip()) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert 5 <= read_checkpoint("cut/checkpoint.safetensors")["iteration"] < 30
    assert main(["run", "omniglot-5w1s", "--out", "cut", "--resume"]) == 0
    a, b = read_checkpoint("full/checkpoint.safetensors"), read_checkpoint("cut/checkpoint.safetensors")
    assert a["iteration"] == b["iteration"] == 30
    assert all(torch.equal(a["algorithm"][k], b["algorithm"][k]) for k in a["algorithm"])
    full, cut = (json.loads(Path(f"{d}/results.json").read_text()) for d in ("full", "cut"))
    assert full["evaluation"] == cut["evaluation"]
