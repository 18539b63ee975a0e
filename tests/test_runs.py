"""Run folders and checkpoints: checkpoints are data (never code), damaged ones are clear errors."""

import json
from pathlib import Path

import pytest
import torch
from helpers import one_line_error

from metagrad.cli import main
from metagrad.runs import CheckpointError, Run, normalise, read_checkpoint, save_checkpoint

TINY_TRAIN = ["train", "--iterations", "6", "--meta-batch", "2", "--eval-tasks", "10", "--log-every", "3",
              "--no-progress"]


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)


class Payload:
    """Unpickling this creates the file `marker`: the proof that loading ran code of the file's choosing."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def crafted(folder: str, name: str = "checkpoint.pt") -> Path:
    """A torch.save file shaped like an old checkpoint, whose unpickling would write `folder/PWNED`."""
    Path(folder).mkdir()
    marker = str(Path(folder, "PWNED").resolve())
    torch.save({"iteration": 1, "algorithm": {"w": torch.zeros(1)}, "identity": Payload(marker),
                "spec": {"algorithm": "maml", "tasks": "sinusoid"}}, Path(folder, name))
    return Path(folder, "PWNED")


@pytest.mark.parametrize("name", ["checkpoint.pt", "checkpoint.safetensors"])
def test_a_crafted_checkpoint_runs_no_code_in_eval_or_resume(capsys, name):
    marker = crafted("evil", name)
    one_line_error(capsys, ["eval", f"evil/{name}"], "could run code", "never loads")
    assert not marker.exists()
    one_line_error(capsys, ["eval", "evil"], "could run code")
    assert not marker.exists()
    one_line_error(capsys, [*TINY_TRAIN, "--out", "evil", "--resume"], "could run code")
    assert not marker.exists()
    with pytest.raises(CheckpointError):
        read_checkpoint(Path("evil", name))
    assert not marker.exists()


def test_checkpoint_round_trip_keeps_tensors_and_plain_values(tmp_path):
    state = {"iteration": 7, "algorithm": {"a.w": torch.randn(3, 2), "a.b": torch.arange(4)},
             "identity": {"class": "MAML", "shapes": {"a.w": [3, 2]}},
             "optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(2)}},
                           "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "foreach": None, "params": [0]}]},
             "generator": torch.Generator().manual_seed(5).get_state(), "window": {"meta_loss": 1.5, "_n": 2.0},
             "paths": {"chosen": {(2, 25, (10, 1), (10, 1), "torch.float32"): "vmap"}},
             "weird": {"$tensor": "t0"}, "spec": None, "seconds": float("inf")}
    save_checkpoint(tmp_path / "c.safetensors", state)
    back = read_checkpoint(tmp_path / "c.safetensors")
    assert set(back) == set(state)
    assert torch.equal(back["algorithm"]["a.w"], state["algorithm"]["a.w"])
    assert back["algorithm"]["a.b"].dtype == torch.int64
    assert torch.equal(back["generator"], state["generator"]) and back["generator"].dtype == torch.uint8
    assert back["optimizer"]["state"][0]["step"].item() == 3.0  # int keys stay ints (Adam's state)
    assert back["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)
    assert back["paths"] == state["paths"]  # tuple keys of the path timings
    assert back["weird"] == {"$tensor": "t0"} and back["seconds"] == float("inf")
    assert not (tmp_path / "c.safetensors").read_bytes().startswith(b"PK")  # not a pickle/zip


def test_an_old_checkpoint_pt_still_evaluates_and_resumes(capsys):
    assert main([*TINY_TRAIN, "--out", "r"]) == 0
    state = read_checkpoint("r/checkpoint.safetensors")
    for folder in ("old", "old2"):
        Path(folder).mkdir()
        torch.save(state, f"{folder}/checkpoint.pt")  # as metagrad 0.1.0 wrote it
        Path(folder, "config.json").write_text(Path("r/config.json").read_text())
    assert main(["eval", "old/checkpoint.pt", "--n-tasks", "10"]) == 0
    assert main(["eval", "r", "--n-tasks", "10"]) == 0
    assert json.loads(Path("old/eval.json").read_text())["curve"] == json.loads(Path("r/eval.json").read_text())[
        "curve"]
    assert main(["train", "--out", "old2", "--resume", "--iterations", "9", "--no-progress"]) == 0
    assert read_checkpoint("old2/checkpoint.safetensors")["iteration"] == 9
    assert not Path("old2/checkpoint.pt").exists()  # superseded by the new file


@pytest.mark.parametrize("kind", ["empty", "truncated", "text", "truncated-old", "other-safetensors"])
def test_damaged_checkpoints_are_one_line_errors(capsys, kind):
    assert main([*TINY_TRAIN, "--out", "r"]) == 0
    good = Path("r/checkpoint.safetensors").read_bytes()
    name = "checkpoint.pt" if kind == "truncated-old" else "checkpoint.safetensors"
    Path("d").mkdir()
    path = Path("d", name)
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif kind == "text":
        path.write_text("hello, I am not a checkpoint\n" * 10)
    elif kind == "truncated-old":
        torch.save(read_checkpoint("r/checkpoint.safetensors"), "full.pt")
        path.write_bytes(Path("full.pt").read_bytes()[:3000])
    else:
        from safetensors.torch import save_file

        save_file({"x": torch.zeros(2)}, str(path))
    Path("d/config.json").write_text(Path("r/config.json").read_text())
    one_line_error(capsys, ["eval", str(path)], "is damaged or not a metagrad checkpoint", "--overwrite")
    one_line_error(capsys, ["train", "--out", "d", "--resume", "--no-progress"], "is damaged")


def test_resume_compares_configs_as_json_values(tmp_path):
    Run(tmp_path / "r", {"algorithms": ("maml", "pretrain"), "iterations": 5})
    run = Run(tmp_path / "r", {"algorithms": ("maml", "pretrain"), "iterations": 9}, resume=True)
    assert run.config["iterations"] == 9
    with pytest.raises(ValueError, match="different config"):
        Run(tmp_path / "r", {"algorithms": ("maml",)}, resume=True)
    assert normalise({"a": (1, (2, 3))}) == {"a": [1, [2, 3]]}
