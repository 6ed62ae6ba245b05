"""Glow for vectors: blocks of actnorm, an invertible linear map and an affine coupling."""

from __future__ import annotations

from collections.abc import Sequence

from pyroflows._checks import check_positive_int
from pyroflows.transforms.actnorm import ActNorm
from pyroflows.transforms.base import FlowStack
from pyroflows.transforms.coupling import Coupling, coupling_masks
from pyroflows.transforms.elementwise import Affine
from pyroflows.transforms.linear import LULinear
from pyroflows.transforms.registry import register_flow


@register_flow("glow")
def glow(
    dim: int,
    *,
    layers: int = 4,
    hidden: Sequence[int] = (64, 64),
    activation: str = "relu",
    clamp: float = 3.0,
    context: int = 0,
) -> FlowStack:
    """Glow: ``layers`` blocks of :class:`ActNorm`, :class:`LULinear` and an affine coupling.

    In the density direction each block normalises, mixes the dimensions linearly, then
    applies the coupling (Kingma & Dhariwal 2018, fig. 2, with vectors in place of channels).

    References:
        Glow: Generative Flow with Invertible 1x1 Convolutions (Kingma & Dhariwal, 2018)
        https://arxiv.org/abs/1807.03039

    Example:
        >>> import pyroflows
        >>> len(pyroflows.build("glow", 4, layers=2))
        6
    """
    check_positive_int("layers", layers)
    blocks = []
    for mask in coupling_masks(dim, layers):
        coupling = Coupling(mask, Affine(clamp), hidden, activation, context)
        blocks += [coupling, LULinear(dim), ActNorm(dim)]
    return FlowStack(blocks)
