"""The rl-nav2d experiment on a short config: its table, and the claim that holds there.

Short config (about 30-45 s on 2 loaded cores): horizon 20, MLP 32-32, initial std 0.3, 60 meta-iterations
of 10 tasks, Adam at 0.01, LVC estimator, 40 held-out goals. Measured with seeds 0, 1, 2: after one
policy-gradient step MAML beats the pretrained policy by 1.5-2.0 return (paired 95% CI +-0.7-0.9) and the
random start by about 5; after 2-3 steps the pretrained policy catches up (differences within the CI), so
only MAML > random start is asserted there.
"""

import pytest

from metagrad.experiments import get
from metagrad.runs import Run

pytestmark = pytest.mark.usefixtures("one_thread")

SHORT = {"iterations": 60, "horizon": 20, "hidden": "32,32", "meta_batch": 10, "outer_lr": 0.01, "eval_tasks": 40,
         "init_std": 0.3, "seed": 0}


def test_maml_after_one_step_beats_pretrained_and_random_start(tmp_path):
    exp = get("rl-nav2d")
    results = exp.fn(exp.make_config({k: str(v) for k, v in SHORT.items()}), Run(tmp_path / "run", {}))
    rows = {r["start"]: r for r in results["table"]}
    assert set(rows) == {"MAML", "pretrained", "random start", "oracle (knows the goal)"}
    assert all(f"return after {k} steps (95% CI)" in rows["MAML"] for k in range(4))
    claim = results["claim"]["after_steps"]
    pre, pre_ci = claim[1]["MAML minus pretrained"]
    rnd, rnd_ci = claim[1]["MAML minus random start"]
    assert pre - pre_ci > 0.5 and rnd - rnd_ci > 3.0, claim[1]        # paired 95% CIs well above zero
    assert results["claim"]["holds_after_1_step"] is True
    for k in (2, 3):
        m, c = claim[k]["MAML minus random start"]
        assert m - c > 2.0, claim[k]
    # MAML's adaptation works: one step improves its return by far more than the CI
    (m0, c0), (m1, c1) = results["curves"]["MAML"][0], results["curves"]["MAML"][1]
    assert m1 - c1 > m0 + c0
    # the oracle (optimal controller) bounds every start
    oracle = results["oracle"][0]
    assert all(m < oracle for curve in results["curves"].values() for m, _ in curve)
    assert (tmp_path / "run" / "adaptation_curve.png").is_file()
