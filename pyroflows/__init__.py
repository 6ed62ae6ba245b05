"""pyroflows: normalizing flows for Pyro.

Flow families are Pyro ``TransformModule`` stacks, registered by name::

    import pyroflows
    flow = pyroflows.build("realnvp", dim=3)
"""

from pyroflows import diagnostics, supports, targets, transforms
from pyroflows.density import DensityEstimator
from pyroflows.distributions import FlowDistribution
from pyroflows.guides import AutoFlow
from pyroflows.registry import build, list_flows, register_flow
from pyroflows.transforms import Flow, FlowStack
from pyroflows.vi import fit_reverse_kl

__version__ = "0.1.0"

__all__ = [
    "AutoFlow",
    "DensityEstimator",
    "Flow",
    "FlowDistribution",
    "FlowStack",
    "build",
    "diagnostics",
    "fit_reverse_kl",
    "list_flows",
    "register_flow",
    "supports",
    "targets",
    "transforms",
]
