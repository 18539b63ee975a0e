"""Models used by the benchmarks and experiments: plain `nn.Module`s, adapted functionally by the core."""

from metagrad.models.conv4 import Conv4, PerStepBatchNorm, TaskBatchNorm
from metagrad.models.generator import CouplingFlow
from metagrad.models.gnn import GCN
from metagrad.models.mlp import MLP
from metagrad.models.physical import JMAK, PayloadJoint

__all__ = ["GCN", "JMAK", "MLP", "Conv4", "CouplingFlow", "PayloadJoint", "PerStepBatchNorm", "TaskBatchNorm"]
