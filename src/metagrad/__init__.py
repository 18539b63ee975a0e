"""metagrad: fast, model-agnostic meta-learning on torch.func."""

from metagrad import algorithms, inner, models, tasks
from metagrad.core import TaskBatch, functional, inner_loop
from metagrad.evaluation import evaluate

__version__ = "0.1.0"
__all__ = ["TaskBatch", "algorithms", "evaluate", "functional", "inner", "inner_loop", "models", "tasks"]
