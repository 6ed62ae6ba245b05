"""pyroflows: normalizing flows for Pyro.

Flow families are Pyro ``TransformModule`` stacks, registered by name::

    import pyroflows
    flow = pyroflows.build("realnvp", dim=3)
"""

from pyroflows import transforms
from pyroflows.density import DensityEstimator
from pyroflows.distributions import FlowDistribution
from pyroflows.inference import (
    AutoFlow,
    StratifiedELBO,
    decaying_adam,
    diagnostics,
    fit_reverse_kl,
    supports,
    temper,
)
from pyroflows.transforms import Flow, FlowStack
from pyroflows.transforms.registry import build, list_flows, register_flow

__version__ = "0.1.0"

__all__ = [
    "AutoFlow",
    "DensityEstimator",
    "Flow",
    "FlowDistribution",
    "FlowStack",
    "StratifiedELBO",
    "build",
    "decaying_adam",
    "diagnostics",
    "fit_reverse_kl",
    "list_flows",
    "register_flow",
    "supports",
    "temper",
    "transforms",
]
