"""metagrad: fast, model-agnostic meta-learning on torch.func."""

from metagrad import algorithms, inner, models, tasks
from metagrad.core import Adapter, TaskBatch, Tasks, functional, inner_loop, map_tasks, supervised
from metagrad.evaluation import evaluate

__version__ = "0.1.0"
__all__ = ["Adapter", "TaskBatch", "Tasks", "algorithms", "evaluate", "functional", "inner", "inner_loop", "map_tasks",
           "models", "supervised", "tasks"]
