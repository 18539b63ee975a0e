"""The first hour of a new user (issue 13): eval says what it does, report never overwrites what it did not
make, train's flags explain themselves, one budget unit, clear errors, no half-made folders, the pin."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from metagrad.cli import main, parser
from metagrad.report import markdown_table
from metagrad.runs import read_checkpoint

REPO = Path(__file__).resolve().parents[1]
TINY_TRAIN = ["train", "--iterations", "6", "--meta-batch", "2", "--eval-tasks", "10", "--log-every", "3",
              "--no-progress"]
TINY_SINUSOID = ["--set", "iterations=10", "--set", "eval_tasks=20", "--set", "eval_steps=2",
                 "--set", "pretrain_lrs=0.01,0.02", "--set", "val_every=5"]


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)


def one_line_error(capsys, argv, *fragments, code=2):
    assert main(argv) == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("metagrad: error: ") and "Traceback" not in err, err
    for f in fragments:
        assert f in err, err


# -- eval (item 6) -------------------------------------------------------------------------------------
def test_eval_reproduces_the_experiments_own_table_by_default(capsys):
    assert main(["run", "sinusoid", *TINY_SINUSOID]) == 0
    results = json.loads(Path("runs/sinusoid/results.json").read_text())
    for name in ("maml", "pretrain"):
        capsys.readouterr()
        assert main(["eval", f"runs/sinusoid/{name}", "--no-progress"]) == 0
        err = capsys.readouterr().err
        assert f"algorithm '{name}' on task family 'sinusoid'" in err and "20 tasks, 2 inner steps" in err, err
        evaluated = json.loads(Path(f"runs/sinusoid/{name}/eval.json").read_text())
        # The same tasks, query-set size (eval_query_shots=100) and fine-tuning rate as the run's table.
        assert evaluated["curve"] == results["curves"][name]["curve"], name
        assert evaluated["algorithm"] == name and evaluated["tasks"] == "sinusoid"
        assert evaluated["settings"]["task_args"] == {"query_shots": 100} and evaluated["settings"]["n_tasks"] == 20
    row = next(r for r in results["table"] if r["algorithm"] == "MAML" and r["steps"] == 1)
    maml = json.loads(Path("runs/sinusoid/maml/eval.json").read_text())
    assert row["query MSE (ours, 95% CI)"].startswith(f"{maml['curve'][1]:.3f}")  # the table's own number
    one_line_error(capsys, ["eval", "runs/sinusoid"], "holds no checkpoint", "runs/sinusoid/maml",
                   "runs/sinusoid/pretrain")


def test_eval_refuses_a_checkpoint_foreign_to_its_folder_and_a_bogus_split(capsys):
    assert main([*TINY_TRAIN, "--out", "sin"]) == 0
    assert main([*TINY_TRAIN, "--tasks", "linear-gaussian", "--out", "lin"]) == 0
    Path("sin/checkpoint.safetensors").write_bytes(Path("lin/checkpoint.safetensors").read_bytes())
    one_line_error(capsys, ["eval", "sin"], "does not belong to its run folder", "'linear-gaussian'", "'sinusoid'")
    with pytest.raises(SystemExit) as e:
        main(["eval", "lin", "--split", "bogus"])
    assert e.value.code == 2
    assert "invalid choice: 'bogus'" in capsys.readouterr().err and "'train', 'val', 'test'"


# -- report (item 3) -----------------------------------------------------------------------------------
def test_report_never_overwrites_what_it_did_not_make(capsys):
    assert main([*TINY_TRAIN, "--out", "runs/a"]) == 0
    assert main([*TINY_TRAIN, "--out", "runs/b", "--seed", "1"]) == 0
    Path("docs").mkdir()
    Path("docs/experiments.md").write_text("# My notes\n\nhand-written\n")
    one_line_error(capsys, ["report", "runs/a"], "was not made by metagrad report", "refusing")
    assert Path("docs/experiments.md").read_text() == "# My notes\n\nhand-written\n"
    assert main(["report", "runs/a", "runs/b", "--out", "page.md"]) == 0
    page = Path("page.md").read_text()
    Path("page.md").write_text(page + "## my own section\n\nkeep me\n")
    b_result = json.loads(Path("runs/b/results.json").read_text())
    assert main([*TINY_TRAIN, "--out", "runs/a", "--overwrite", "--iterations", "9"]) == 0
    assert main(["report", "runs/a", "--out", "page.md"]) == 0
    again = Path("page.md").read_text()
    assert again.count("(`runs/a`)") == 1 and again.count("(`runs/b`)") == 1  # replaced, not duplicated
    assert "| maml | sinusoid | 9 |" in again and "| maml | sinusoid | 6 |" in again  # a new, b kept
    assert "## my own section\n\nkeep me" in again and b_result["finished"] in again
    # A plot that would replace an image no replaced section showed is refused, the image kept.
    Path("img/runs-c-training.png").write_bytes(b"someone else's picture")
    Path("runs/b").rename("runs/c")
    one_line_error(capsys, ["report", "runs/c", "--out", "page.md"], "img/runs-c-training.png", "refusing")
    assert Path("img/runs-c-training.png").read_bytes() == b"someone else's picture"


def test_report_escapes_pipes_in_column_names_and_help_shows_the_default(capsys):
    table = markdown_table([{"|start - population|": 0.5, "x": "a|b"}])
    header, rule, row = table.split("\n")
    assert header == "| \\|start - population\\| | x |" and rule.count("---") == 2
    assert len(re.findall(r"(?<!\\)\|", header)) == len(re.findall(r"(?<!\\)\|", row)) == 3
    with pytest.raises(SystemExit):
        main(["report", "--help"])
    assert "(default: docs/experiments.md)" in capsys.readouterr().out


def test_shipped_docs_tables_render_and_their_commands_exist():
    text = (REPO / "docs" / "experiments.md").read_text()
    for block in re.split(r"\n(?!\|)", text):
        rows = [r for r in block.split("\n") if r.startswith("|")]
        cells = {len(re.findall(r"(?<!\\)\|", r)) for r in rows}
        assert len(cells) <= 1, rows[:2]  # every row of a table has the header's number of columns
    commands = re.findall(r"Command `metagrad ([^`]*)`", text)
    assert len(commands) >= 20
    p = parser()
    for command in commands:
        args = p.parse_args(command.split())  # exits (a failure here) if the command does not exist
        assert args.command in ("run", "train"), command


# -- train's flags, budgets, conflicts, devices, downloads, folders (item 8) ---------------------------
def test_version_and_python_dash_m(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("metagrad 0.")
    out = subprocess.run([sys.executable, "-m", "metagrad", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("metagrad 0.")


def test_train_help_has_help_defaults_choices_and_one_budget_unit(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "tasks per meta-iteration (default: 25)" in out and "--lr-schedule {constant,cosine}" in out
    assert "--order {1,2}" in out and "maml++" in out and "graph-sbm" in out  # the registries' names
    assert "in MINUTES" in out and "--budget-minutes" in out
    for line in re.findall(r"\n  (--[a-z-]+)", parser()._subparsers._group_actions[0].choices["train"].format_help()):
        assert line  # every flag is listed with its help (argparse prints help on the same or next line)
    train = parser()._subparsers._group_actions[0].choices["train"]
    assert all(a.help for a in train._actions)


def test_old_time_budget_seconds_become_budget_minutes(capsys):
    assert main([*TINY_TRAIN, "--out", "r", "--time-budget", "120"]) == 0
    assert "budget_minutes=2" in capsys.readouterr().err
    config = json.loads(Path("r/config.json").read_text())
    assert config["budget_minutes"] == 2 and "time_budget" not in config
    one_line_error(capsys, [*TINY_TRAIN, "--out", "s", "--budget-minutes", "1", "--set", "budget_minutes=2"],
                   "--budget-minutes 1.0 and --set budget_minutes=2 disagree")


def test_seed_flag_and_set_seed_must_agree(capsys):
    one_line_error(capsys, ["run", "sinusoid", "--seed", "1", "--set", "seed=2"], "--seed 1 and --set seed=2 disagree")
    one_line_error(capsys, [*TINY_TRAIN, "--seed", "1", "--set", "seed=2"], "disagree")
    assert not Path("runs").exists()


def test_device_without_cuda_and_offline_download_are_one_line_errors(capsys, monkeypatch):
    import torch

    if not torch.cuda.is_available():
        one_line_error(capsys, [*TINY_TRAIN, "--device", "cuda", "--out", "r"], "no CUDA device", "--device cpu",
                       code=1)
        one_line_error(capsys, ["run", "omniglot-5w1s", "--device", "cuda"], "no CUDA device", code=1)
        assert not Path("r").exists() and not Path("runs").exists()
    one_line_error(capsys, [*TINY_TRAIN, "--device", "gpu0"], "is not a torch device")

    import urllib.error
    import urllib.request

    def offline(*a, **k):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    one_line_error(capsys, ["download", "omniglot", "--dest", "data"], "downloading", "failed", "by hand", code=1)


def test_a_failed_validation_leaves_no_run_folder(capsys):
    one_line_error(capsys, ["run", "sinusoid", "--set", "iterations=-1", "--set", "eval_tasks=5"], "iterations")
    assert not Path("runs/sinusoid").exists()
    one_line_error(capsys, [*TINY_TRAIN, "--meta-batch", "0", "--out", "r"], "meta_batch must be a positive")
    assert not Path("r").exists()


def test_short_runs_write_metrics_and_budget_runs_show_time(capsys):
    assert main(["train", "--iterations", "3", "--meta-batch", "2", "--eval-tasks", "10", "--no-progress",
                 "--out", "r"]) == 0  # fewer iterations than log_every (50)
    lines = [json.loads(x) for x in Path("r/metrics.jsonl").read_text().splitlines()]
    assert [(m["step"], m["partial_window"]) for m in lines] == [(3, 3)] and "meta_loss" in lines[0]
    assert main(["train", "--out", "r", "--resume", "--iterations", "5", "--no-progress"]) == 0
    lines = [json.loads(x) for x in Path("r/metrics.jsonl").read_text().splitlines()]
    assert [(m["step"], m["partial_window"]) for m in lines] == [(5, 5)]  # the window continued, re-logged
    assert read_checkpoint("r/checkpoint.safetensors")["iteration"] == 5
    capsys.readouterr()
    assert main(["train", "--iterations", "60000", "--budget-minutes", "0.002", "--meta-batch", "2",
                 "--eval-tasks", "10", "--out", "b"]) == 0
    err = capsys.readouterr().err
    assert "(time budget)" in err and "/60000 [" not in err and " s [" in err  # seconds of the budget
    assert "evaluate" in err  # evaluation shows progress too


def test_run_show_config_lists_the_experiments_keys(capsys):
    assert main(["run", "sinusoid", "--show-config"]) == 0
    out = capsys.readouterr().out
    assert "eval_query_shots" in out and "algorithms" in out and "('maml', 'pretrain')" in out
    assert not Path("runs").exists()
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    assert "--show-config" in capsys.readouterr().out


# -- packaging (items 8, 9, 10) ------------------------------------------------------------------------
def test_torch_range_declared_exact_pin_installed_and_make_targets_exist():
    pyproject = (REPO / "pyproject.toml").read_text()
    deps = pyproject.split("dependencies = [")[1].split("]")[0]
    torch_req = re.search(r'"torch([^"]*)"', deps).group(1)
    assert ">=" in torch_req and "<3" in torch_req and "==" not in torch_req
    assert "safetensors" in deps
    makefile = (REPO / "Makefile").read_text()
    assert "TORCH_PIN := torch==2.13.0" in makefile and "--quiet" not in makefile
    assert "make test" in (REPO / ".ci" / "run").read_text()
    dry = subprocess.run(["make", "-n", "-B", "venv"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert dry.count('"torch==2.13.0"') == 2 and "echo" in dry  # each step says what it does
    docs = "\n".join(p.read_text() for p in [REPO / "README.md", *REPO.glob("benchmarks/*.md"),
                                               *REPO.glob("benchmarks/*.py"), REPO / "pyproject.toml"])
    for target in sorted(set(re.findall(r"`make ([a-z][a-z-]*)", docs)) | {"bench-deps"}):
        subprocess.run(["make", "-n", target], cwd=REPO, capture_output=True, check=True)


def test_readme_states_what_its_commands_cost():
    readme = (REPO / "README.md").read_text()
    setup = readme.split("## Set up and check")[1].split("\n## ")[0]
    assert "make demo" in setup and "make test" in setup
    assert "measured on a loaded machine" in setup.lower() or "measured on an idle machine" in setup.lower()
    assert "checkpoint.safetensors" in readme and "eval runs/train-maml-sinusoid/checkpoint.pt" not in readme
