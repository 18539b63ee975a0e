"""Models used by the benchmarks: plain `nn.Module`s, adapted functionally by the core."""

from metagrad.models.conv4 import Conv4, TaskBatchNorm
from metagrad.models.mlp import MLP

__all__ = ["Conv4", "MLP", "TaskBatchNorm"]
