"""Task families: each samples `TaskBatch`es of tensors `[tasks, shots, ...]` from a generator."""

from metagrad.tasks.base import FAMILIES, TaskDistribution, family, get_family, load_families
from metagrad.tasks.continual import ClassIncremental
from metagrad.tasks.fairness import Fairness
from metagrad.tasks.graph_sbm import GraphSBM
from metagrad.tasks.inverse_design import InverseDesign
from metagrad.tasks.jmak import JMAKKinetics
from metagrad.tasks.materials_property import MaterialsProperty
from metagrad.tasks.omniglot import Omniglot
from metagrad.tasks.personalised_medicine import PersonalisedMedicine
from metagrad.tasks.quadratic import LinearGaussian, Quadratic
from metagrad.tasks.sinusoid import Sinusoid
from metagrad.tasks.suffix_rules import SuffixRules
from metagrad.tasks.system_id import SystemID

__all__ = [
    "FAMILIES", "ClassIncremental", "Fairness", "GraphSBM", "InverseDesign", "JMAKKinetics", "LinearGaussian",
    "MaterialsProperty", "Omniglot", "PersonalisedMedicine", "Quadratic", "Sinusoid", "SuffixRules", "SystemID",
    "TaskDistribution", "family", "get_family", "load_families",
]
