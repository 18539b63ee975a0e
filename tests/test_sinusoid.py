"""The sinusoid experiment: its table puts the computed numbers beside the published ones, and the claim holds."""

import pytest

from metagrad.experiments import get
from metagrad.runs import Run

pytestmark = pytest.mark.usefixtures("one_thread")


def run(tmp_path, **overrides):
    exp = get("sinusoid")
    cfg = exp.make_config({k: str(v) for k, v in overrides.items()})
    return exp.fn(cfg, Run(tmp_path / "run", {}))


def test_table_has_our_numbers_beside_the_published_ones(tmp_path):
    results = run(tmp_path, shots=5, iterations=6, eval_tasks=30, pretrain_lrs="0.01,0.05", val_every=3)
    rows = {(r["algorithm"], r["steps"]): r for r in results["table"]}
    assert set(rows) == {(a, s) for a in ("MAML", "pretrained") for s in (1, 5, 10)}
    published = {("MAML", 1): (0.67, 1.13), ("MAML", 5): (0.38, ""), ("MAML", 10): (0.35, ""),
                 ("pretrained", 1): (2.41, ""), ("pretrained", 5): (2.23, ""), ("pretrained", 10): (2.19, "")}
    for key, (maml_paper, metasgd_paper) in published.items():
        assert (rows[key]["MAML paper"], rows[key]["Meta-SGD paper"]) == (maml_paper, metasgd_paper)
    for (alg, steps), row in rows.items():
        curve = results["curves"]["maml" if alg == "MAML" else "pretrain"]
        assert row["query MSE (ours, 95% CI)"] == f"{curve['curve'][steps]:.3f} ± {curve['curve_ci95'][steps]:.3f}"
        assert curve["n_tasks"] == 30 and row["iterations"] == 6
    assert results["finetune_lr_pretrain"] in (0.01, 0.05)
    # Both start from the same seeded initialisation and are evaluated on the same test tasks.
    m0, p0 = results["curves"]["maml"]["curve"][0], results["curves"]["pretrain"]["curve"][0]
    assert m0 != p0  # six outer steps of different objectives moved them apart
    assert (tmp_path / "run" / "adaptation_curve.png").is_file() and (tmp_path / "run" / "fitted_curves.png").is_file()


@pytest.mark.slow
def test_maml_after_one_step_beats_pretrained_after_ten(tmp_path):
    """The MAML paper's sinusoid claim, on a short training (1,500 iterations instead of 70,000)."""
    results = run(tmp_path, iterations=1500, eval_tasks=400, val_every=0)
    maml1, maml1_ci = results["claim"]["maml_1_step"]
    pre10, pre10_ci = results["claim"]["pretrain_10_steps"]
    assert maml1 + maml1_ci < pre10 - pre10_ci, results["claim"]  # 95% CIs separated
    assert pre10 / maml1 > 1.5, results["claim"]
    assert results["claim"]["holds"] is True
