"""Reverse KL: flow guides for Pyro models, fits of unnormalised densities, diagnostics.

``targets`` holds the test energies of the benchmarks; it is not imported here.
"""

from pyroflows.inference import diagnostics, supports
from pyroflows.inference.elbo import StratifiedELBO
from pyroflows.inference.guides import AutoFlow
from pyroflows.inference.optim import decaying_adam
from pyroflows.inference.tempering import temper
from pyroflows.inference.vi import fit_reverse_kl, posterior_flow

__all__ = [
    "AutoFlow",
    "StratifiedELBO",
    "decaying_adam",
    "diagnostics",
    "fit_reverse_kl",
    "posterior_flow",
    "supports",
    "temper",
]
