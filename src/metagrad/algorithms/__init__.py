"""Meta-learning algorithms: one short file each, all on `metagrad.core`."""

from metagrad.algorithms.base import Algorithm
from metagrad.algorithms.maml import MAML

__all__ = ["Algorithm", "MAML"]
