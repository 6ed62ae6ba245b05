"""pyroflows: normalizing flows for Pyro.

Flow families are Pyro ``TransformModule`` stacks, registered by name::

    import pyroflows
    flow = pyroflows.build("realnvp", dim=3)
"""

from pyroflows import supports, transforms
from pyroflows.distributions import FlowDistribution
from pyroflows.guides import AutoFlow
from pyroflows.registry import build, list_flows, register_flow
from pyroflows.transforms import Flow, FlowStack

__version__ = "0.1.0"

__all__ = [
    "AutoFlow",
    "Flow",
    "FlowDistribution",
    "FlowStack",
    "build",
    "list_flows",
    "register_flow",
    "supports",
    "transforms",
]
