"""The training loop: bit-identical resume, interrupt checkpoints, model checks, clear errors."""

import signal

import pytest
import torch

from metagrad.core import TaskBatch
from metagrad.runs import Run, read_checkpoint
from metagrad.tasks import Sinusoid
from metagrad.train import TrainingInterrupted, build, evaluate_checkpoint, load_checkpoint, meta_train

SPEC = {"algorithm": "maml", "algorithm_args": {"inner_lr": 0.05, "inner_steps": 2, "order": 2},
        "model": "mlp", "model_args": {"sizes": [1, 16, 16, 1]},
        "tasks": "sinusoid", "task_args": {"shots": 5, "query_shots": 5}}
KW = dict(meta_batch=4, outer_lr=1e-2, seed=3, log_every=5, val_every=10, val_n_tasks=8, checkpoint_every=7,
          spec=SPEC, progress=False)


pytestmark = pytest.mark.usefixtures("one_thread")


class Hook:
    """A task distribution that calls `fn()` when sampling batch number `at` (0-based)."""

    def __init__(self, tasks, at: int, fn) -> None:
        self.tasks, self.at, self.fn, self.count = tasks, at, fn, 0

    def sample(self, n, generator=None):
        batch = self.tasks.sample(n, generator)
        if self.count == self.at:
            batch = self.fn(batch) or batch
        self.count += 1
        return batch


def train(path, iterations, resume=False, tasks_wrapper=None, **kw):
    alg, tasks = build(SPEC, seed=1)
    run = Run(path, {"iterations": iterations}, resume=resume)
    tasks = tasks_wrapper(tasks) if tasks_wrapper else tasks
    result = meta_train(alg, tasks, iterations, run=run, val_tasks=Sinusoid(5, 5), **{**KW, **kw})
    return alg, run, result


def metric_lines(run):
    return [{k: v for k, v in m.items() if k != "time"} for m in run.metrics()]


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path):
    full, full_run, _ = train(tmp_path / "full", 30)
    _, _, first = train(tmp_path / "split", 12)  # stops mid log-window (log_every 5) and between checkpoints
    resumed, resumed_run, result = train(tmp_path / "split", 30, resume=True)
    assert result.iteration == 30 and int(resumed.iteration) == 30
    assert result.seconds > first.seconds  # training time counts both sessions
    assert_same_state(full, resumed)
    assert metric_lines(full_run) == metric_lines(resumed_run)
    # The optimizer's state too: the next steps would also agree.
    a, b = full_run.load_checkpoint()["optimizer"]["state"], resumed_run.load_checkpoint()["optimizer"]["state"]
    assert all(torch.equal(a[i]["exp_avg_sq"], b[i]["exp_avg_sq"]) for i in a)


def test_sigterm_saves_a_valid_checkpoint_and_resume_matches(tmp_path):
    full, full_run, _ = train(tmp_path / "full", 30)

    def interrupt(tasks):
        return Hook(tasks, 17, lambda batch: signal.raise_signal(signal.SIGTERM))  # 0: fixed val set

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrainingInterrupted, match="iteration 17 of 30"):
        train(tmp_path / "int", 30, tasks_wrapper=interrupt)
    assert signal.getsignal(signal.SIGTERM) is before  # handler restored
    ckpt = read_checkpoint(tmp_path / "int" / "checkpoint.safetensors")
    assert ckpt["iteration"] == 17
    fresh, _ = build(SPEC, seed=1)
    load_checkpoint(fresh, ckpt)
    assert int(fresh.iteration) == 17
    resumed, resumed_run, _ = train(tmp_path / "int", 30, resume=True)
    assert_same_state(full, resumed)
    assert metric_lines(full_run) == metric_lines(resumed_run)


def test_validation_logs_the_meta_train_vs_meta_test_gap(tmp_path):
    _, run, _ = train(tmp_path / "r", 20)
    val = [m for m in run.metrics() if "gap" in m]
    assert [m["step"] for m in val] == [10, 20]
    for m in val:
        assert m["gap"] == pytest.approx(m["meta_test_loss"] - m["meta_train_loss"], abs=1e-12)
        assert m["meta_test_ci95"] > 0


def test_time_budget_stops_cleanly_with_a_checkpoint(tmp_path):
    _, run, result = train(tmp_path / "r", 1000, time_budget=0.0)
    assert result.stopped == "time_budget" and result.iteration == 1
    assert run.load_checkpoint()["iteration"] == 1


def test_checkpoint_of_another_model_is_a_clear_error(tmp_path):
    train(tmp_path / "r", 3)
    other, _ = build({**SPEC, "model_args": {"sizes": [1, 20, 1]}})
    with pytest.raises(ValueError, match=r"another model.*model\.0\.weight has shape \[16, 1\] in the checkpoint, "
                                         r"\[20, 1\] in this model"):
        load_checkpoint(other, tmp_path / "r" / "checkpoint.safetensors")
    with pytest.raises(ValueError, match=r"tensors only in the checkpoint: \['model\.4\.bias', 'model\.4\.weight'\]"):
        load_checkpoint(other, tmp_path / "r" / "checkpoint.safetensors")


def test_non_finite_loss_is_a_clear_error(tmp_path):
    def poison(tasks):
        return Hook(tasks, 3, lambda b: TaskBatch(b.support_x, b.support_y, b.query_x, b.query_y * float("nan")))

    with pytest.raises(FloatingPointError, match="meta-loss at iteration 2 is not finite"):
        train(tmp_path / "r", 10, tasks_wrapper=poison)


def test_unknown_names_and_arguments_are_clear_errors():
    with pytest.raises(KeyError, match="unknown algorithm 'nope'; known: .*maml"):
        build({**SPEC, "algorithm": "nope"})
    with pytest.raises(KeyError, match="unknown task family 'nope'"):
        build({**SPEC, "tasks": "nope"})
    with pytest.raises(KeyError, match=r"algorithm 'maml' has no argument\(s\) \['inner_rate'\]"):
        build({**SPEC, "algorithm_args": {"inner_rate": 0.1}})
    with pytest.raises(KeyError, match=r"task family 'sinusoid' has no argument\(s\) \['ways'\]"):
        build({**SPEC, "task_args": {"ways": 5}})
    alg, tasks = build(SPEC)
    with pytest.raises(ValueError, match="meta_batch must be a positive integer, got 0"):
        meta_train(alg, tasks, 1, meta_batch=0, progress=False)


def test_same_seed_same_numbers_and_eval_reproduces(tmp_path):
    a, run_a, _ = train(tmp_path / "a", 8)
    b, _, _ = train(tmp_path / "b", 8)
    assert_same_state(a, b)
    c, _, _ = train(tmp_path / "c", 8, seed=4)
    assert not torch.equal(a.state_dict()["model.0.weight"], c.state_dict()["model.0.weight"])
    _, r1 = evaluate_checkpoint(tmp_path / "a", n_tasks=50, steps=3)
    _, r2 = evaluate_checkpoint(tmp_path / "a" / "checkpoint.safetensors", n_tasks=50, steps=3)
    assert r1.curve == r2.curve and len(r1.curve) == 4 and r1.n_tasks == 50


def test_cosine_outer_lr_follows_torch_cosine_annealing():
    from metagrad.train import outer_lr_at

    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=40, eta_min=1e-5)
    for i in range(41):
        assert outer_lr_at(i, 40, 1e-3, "cosine", 1e-5) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12)
        opt.step()
        sched.step()
    assert outer_lr_at(20, 40, 1e-3, "cosine", 1e-5) == pytest.approx((1e-3 + 1e-5) / 2, rel=1e-12)
    assert outer_lr_at(7, 40, 1e-3) == 1e-3


def test_cosine_schedule_is_applied_logged_and_resumes_bit_identically(tmp_path):
    from metagrad.train import outer_lr_at

    kw = dict(lr_schedule="cosine", min_outer_lr=1e-4)
    full, full_run, _ = train(tmp_path / "full", 30, **kw)
    logged = {m["step"]: m["outer_lr"] for m in full_run.metrics() if "outer_lr" in m}
    # Each line is the mean rate over its window of log_every=5 iterations (0-based i = step-5 .. step-1).
    for step, lr in logged.items():
        expected = sum(outer_lr_at(i, 30, 1e-2, "cosine", 1e-4) for i in range(step - 5, step)) / 5
        assert lr == pytest.approx(expected, rel=1e-12)
    assert sorted(logged) == [5, 10, 15, 20, 25, 30]

    def interrupt(tasks):
        return Hook(tasks, 14, lambda batch: signal.raise_signal(signal.SIGTERM))

    with pytest.raises(TrainingInterrupted, match="iteration 14 of 30"):
        train(tmp_path / "int", 30, tasks_wrapper=interrupt, **kw)
    resumed, resumed_run, _ = train(tmp_path / "int", 30, resume=True, **kw)
    assert_same_state(full, resumed)
    assert metric_lines(full_run) == metric_lines(resumed_run)
    constant, _, _ = train(tmp_path / "constant", 30)  # the schedule changed the trajectory
    assert not torch.equal(constant.state_dict()["model.0.weight"], full.state_dict()["model.0.weight"])


def test_bad_lr_schedule_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="lr_schedule must be one of"):
        train(tmp_path / "a", 3, lr_schedule="step")
    with pytest.raises(ValueError, match="min_outer_lr must be in"):
        train(tmp_path / "b", 3, lr_schedule="cosine", min_outer_lr=1.0)
