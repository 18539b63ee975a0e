"""Task families: each samples `TaskBatch`es of tensors `[tasks, shots, ...]` from a generator."""

from metagrad.tasks.base import FAMILIES, TaskDistribution, family, get_family, load_families
from metagrad.tasks.sinusoid import Sinusoid

__all__ = ["FAMILIES", "TaskDistribution", "Sinusoid", "family", "get_family", "load_families"]
