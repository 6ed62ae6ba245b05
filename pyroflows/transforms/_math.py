"""Small scalar maps shared by several layers."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

MARGIN = 1e-3


def above_minus_one(x: Tensor) -> Tensor:
    r"""The smooth increasing map :math:`m(x) = (1 - \epsilon)\,\mathrm{elu}(x)` onto
    :math:`(-1 + \epsilon, \infty)`, with :math:`m(0) = 0` and :math:`\epsilon = 10^{-3}`.

    It keeps invertibility constraints such as :math:`w^\top \hat u > -1` strict even where
    :math:`\mathrm{elu}` rounds to :math:`-1`.

    Example:
        >>> import torch
        >>> above_minus_one(torch.tensor([-1000.0, 0.0]))
        tensor([-0.9990,  0.0000])
    """
    return (1 - MARGIN) * F.elu(x)
