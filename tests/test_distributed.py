"""torchrun jobs on this machine (gloo on 127.0.0.1): the sharded meta-gradient equals the single-process
one, training stays equal, only rank 0 writes, a killed rank ends the job, and --resume continues it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from distributed_job import ITERATIONS, NAMES, results
from helpers import rel_err

from metagrad.runs import find_checkpoint, read_checkpoint

pytestmark = pytest.mark.slow
JOB = Path(__file__).with_name("distributed_job.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *args]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, torch.Tensor]:
    torch.set_num_threads(1)
    return results(tmp_path_factory.mktemp("single"))


def check_against_reference(out: Path, reference: dict[str, torch.Tensor]) -> None:
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for name in NAMES:
        for r in ranks:
            assert rel_err(r[f"{name}/grad"], reference[f"{name}/grad"]) < 1e-12, name
            assert rel_err(r[f"{name}/params"], reference[f"{name}/params"]) < 1e-12, name
        # The ranks took the same optimizer steps on the same all-reduced gradient: bit-identical.
        assert torch.equal(ranks[0][f"{name}/params"], ranks[1][f"{name}/params"])
        # Rank 0 alone wrote the run folder: one metrics line per window, one checkpoint at the end.
        folder = out / name
        lines = (folder / "metrics.jsonl").read_text().splitlines()
        assert len(lines) == ITERATIONS // 5
        assert read_checkpoint(find_checkpoint(folder))["iteration"] == ITERATIONS
    assert sorted(p.name for p in out.iterdir()) == sorted([*NAMES, "rank0.pt", "rank1.pt"])


def test_two_ranks_give_the_single_process_meta_gradient_and_training(tmp_path, reference):
    """MAML order 2 on the BatchNorm Conv4, Reptile and Meta-SGD, float64, 5 tasks over 2 ranks."""
    proc = subprocess.run(torchrun("--standalone", "--nproc_per_node=2", str(JOB), str(tmp_path)),
                          env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_against_reference(tmp_path, reference)


def test_two_machines_one_rank_each_rendezvous_on_loopback(tmp_path, reference):
    """`--nnodes=2`: two launchers, as on two machines, meeting at a rendezvous endpoint on 127.0.0.1."""
    port = free_port()
    nodes = [subprocess.Popen(torchrun("--nnodes=2", "--nproc_per_node=1", f"--node_rank={n}",
                                       "--master_addr=127.0.0.1", f"--master_port={port}", str(JOB), str(tmp_path)),
                              env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for n in range(2)]
    for n in nodes:
        _, err = n.communicate(timeout=600)
        assert n.returncode == 0, err[-3000:]
    check_against_reference(tmp_path, reference)


def train_cmd(out: Path, iterations: int, *extra: str) -> list[str]:
    return torchrun("--standalone", "--nproc_per_node=2", "-m", "metagrad", "train", "--tasks", "sinusoid",
                    "--meta-batch", "6", "--iterations", str(iterations), "--checkpoint-every", "50",
                    "--log-every", "50", "--eval-tasks", "20", "--no-progress", "--out", str(out), *extra)


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def rank_pid(agent: int, rank: int) -> int:
    for pid in children(agent):
        try:
            env = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:
            return pid
    raise LookupError(f"no rank {rank} under {agent}")


def test_a_killed_rank_ends_the_job_and_resume_continues_it_bit_identically(tmp_path):
    iterations = 2000
    killed = tmp_path / "killed"
    job = subprocess.Popen(train_cmd(killed, iterations), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline:  # wait for a checkpoint mid-run
            ckpt = find_checkpoint(killed) if killed.exists() else None
            if ckpt is not None and 0 < read_checkpoint(ckpt)["iteration"] < iterations // 2:
                break
            assert job.poll() is None, job.communicate()[1][-3000:]
            time.sleep(0.2)
        else:
            pytest.fail("no checkpoint within 300 s")
        os.kill(rank_pid(job.pid, 1), signal.SIGKILL)
        t0 = time.time()
        _, err = job.communicate(timeout=120)
        ended = time.time() - t0
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode != 0
    assert ended < 60  # no hang: the launcher ends the job once a rank is gone
    assert "rank" in err.lower() and ("failed" in err.lower() or "signal" in err.lower()), err[-3000:]
    stopped_at = read_checkpoint(find_checkpoint(killed))["iteration"]
    assert 0 < stopped_at < iterations
    resumed = subprocess.run(train_cmd(killed, iterations, "--resume"), env=ENV, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    straight = tmp_path / "straight"
    done = subprocess.run(train_cmd(straight, iterations), env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    a = read_checkpoint(find_checkpoint(killed))
    b = read_checkpoint(find_checkpoint(straight))
    assert a["iteration"] == b["iteration"] == iterations
    for k in b["algorithm"]:
        assert torch.equal(a["algorithm"][k], b["algorithm"][k]), k


def test_a_rank_leaves_its_group_at_exit(monkeypatch):
    # One-process gloo group in place of a torchrun job: init_from_env registers leave() to run at exit,
    # and leave() destroys the group (a rank that exits with it up can abort in gloo's teardown).
    import atexit

    import torch.distributed as dist

    from metagrad import distributed

    registered = []
    monkeypatch.setattr(atexit, "register", registered.append)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert distributed.init_from_env("cpu") is False and registered == []  # not a job: nothing joined
    monkeypatch.setattr(dist, "init_process_group",
                        lambda backend, timeout: dist.distributed_c10d.init_process_group(
                            backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout))
    monkeypatch.setenv("WORLD_SIZE", "2")  # what init_from_env reads; the group itself has one rank here
    try:
        assert distributed.init_from_env("cpu") is True and dist.is_initialized()
        assert registered == [distributed.leave]
        registered[0]()
        assert not dist.is_initialized()
        distributed.leave()  # again: nothing to leave
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
