"""Task families: each samples `TaskBatch`es of tensors `[tasks, shots, ...]` from a generator."""

from metagrad.tasks.base import TaskDistribution
from metagrad.tasks.sinusoid import Sinusoid

__all__ = ["TaskDistribution", "Sinusoid"]
