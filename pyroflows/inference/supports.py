r"""Bijections onto supports that torch and Pyro leave without one.

:func:`torch.distributions.biject_to` has no bijection onto ``lower_cholesky``
(lower-triangular matrices with a positive diagonal), so Pyro's autoguides refuse such
sites. Importing pyroflows registers :class:`VecToLowerCholesky` for it, unless a bijection
is registered already; nothing registered before is replaced.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.distributions import Transform, biject_to, constraints


class VecToLowerCholesky(Transform):
    r"""Maps :math:`v \in \mathbb{R}^{d(d+1)/2}` onto lower-triangular :math:`L` with
    :math:`L_{ii} > 0`: the entries of :math:`v` fill the lower triangle row by row, and the
    diagonal ones pass through :math:`\exp`. The log-det is the sum of those diagonal
    entries of :math:`v`.

    Example:
        >>> import torch
        >>> t = VecToLowerCholesky()
        >>> L = t(torch.zeros(3))
        >>> L
        tensor([[1., 0.],
                [0., 1.]])
        >>> t.inv(L)
        tensor([0., 0., 0.])
    """

    domain = constraints.real_vector
    codomain = constraints.lower_cholesky
    bijective = True

    def __eq__(self, other: object) -> bool:
        return isinstance(other, VecToLowerCholesky)

    @staticmethod
    def _side(entries: int) -> int:
        side = (math.isqrt(8 * entries + 1) - 1) // 2
        if side * (side + 1) // 2 != entries:
            raise ValueError(f"{entries} entries do not fill a lower triangle")
        return side

    def _call(self, x: Tensor) -> Tensor:
        side = self._side(x.shape[-1])
        rows, cols = torch.tril_indices(side, side, device=x.device)
        x = torch.where(rows == cols, x.exp(), x)
        matrix = x.new_zeros(*x.shape[:-1], side, side)
        matrix[..., rows, cols] = x
        return matrix

    def _inverse(self, y: Tensor) -> Tensor:
        side = y.shape[-1]
        rows, cols = torch.tril_indices(side, side, device=y.device)
        entries = y[..., rows, cols]
        return torch.where(rows == cols, entries.log(), entries)

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        return y.diagonal(dim1=-2, dim2=-1).log().sum(-1)

    def forward_shape(self, shape: torch.Size) -> torch.Size:
        side = self._side(shape[-1])
        return torch.Size((*shape[:-1], side, side))

    def inverse_shape(self, shape: torch.Size) -> torch.Size:
        return torch.Size((*shape[:-2], shape[-1] * (shape[-1] + 1) // 2))


def _register() -> None:
    try:
        biject_to(constraints.lower_cholesky)
    except NotImplementedError:
        biject_to.register(constraints.lower_cholesky)(lambda constraint: VecToLowerCholesky())


_register()
