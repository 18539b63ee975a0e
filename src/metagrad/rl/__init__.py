"""Meta-reinforcement learning: environments as task families, functional policies, batched rollouts,
returns, GAE and the linear baseline, policy-gradient task losses, and MAML-RL with exact meta-gradients;
`metagrad.rl.markets`: simulated and real price series for the `Trading` tasks, P&L, Sharpe, drawdown.

Nothing here imports gymnasium until a `GymEnv` is built (`pip install 'metagrad[rl]'`).
"""

from metagrad.rl.envs import Bandit, GymEnv, Nav2D, Trading, register_gymnasium, trading_features
from metagrad.rl.losses import PolicyGradientLoss, magic_box
from metagrad.rl.maml_rl import MAMLRL, post_update_loss
from metagrad.rl.policies import (
    Box,
    CategoricalMLPPolicy,
    Discrete,
    GaussianMLPPolicy,
    SoftmaxPolicy,
    check_output,
    log_prob,
    mode,
    sample,
)
from metagrad.rl.returns import discounted_returns, gae, linear_baseline, normalize
from metagrad.rl.rollout import add_advantages, rollout

__all__ = ["MAMLRL", "Bandit", "Box", "CategoricalMLPPolicy", "Discrete", "GaussianMLPPolicy", "GymEnv", "Nav2D",
           "PolicyGradientLoss", "SoftmaxPolicy", "add_advantages", "check_output", "discounted_returns", "gae",
           "linear_baseline", "log_prob", "magic_box", "mode", "normalize", "post_update_loss", "register_gymnasium",
           "rollout", "sample", "Trading", "trading_features"]
