r"""Planar flows, with an exact inverse by one-dimensional root finding."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from pyroflows._checks import check_positive_int
from pyroflows.registry import register_flow
from pyroflows.transforms._math import above_minus_one
from pyroflows.transforms.base import Flow, FlowStack
from pyroflows.transforms.roots import solve_increasing


class Planar(Flow):
    r"""A planar layer :math:`f(z) = z + \hat u \tanh(w^\top z + b)`.

    The log-det is :math:`\log|1 + \hat u^\top w \, \tanh'(w^\top z + b)|`. The layer is
    invertible when :math:`w^\top \hat u > -1` (Rezende & Mohamed 2015, appendix A), which
    the free parameter :math:`u` is mapped to by

    .. math:: \hat u = u + \big(m(w^\top u) - w^\top u\big) \frac{w}{\|w\|^2},
              \qquad m(a) = (1 - \epsilon)\,\mathrm{elu}(a),

    so that :math:`w^\top \hat u = m(w^\top u) > -1 + \epsilon` (:math:`\epsilon = 10^{-3}`
    keeps the bound strict in floating point), and :math:`u = 0` is the identity. (Rezende &
    Mohamed use :math:`m = -1 + \mathrm{softplus}`, which is not the identity at
    :math:`u = 0`.)

    The inverse is exact: with :math:`a = w^\top z`, :math:`c = w^\top \hat u` and
    :math:`t = w^\top y`, the equation :math:`w^\top f(z) = w^\top y` reads
    :math:`a + c \tanh(a + b) = t`, a strictly increasing scalar equation whose root lies in
    :math:`[t - |c|, t + |c|]`; it is solved by safeguarded Newton iteration
    (:mod:`pyroflows.transforms.roots`), and then :math:`z = y - \hat u \tanh(a + b)`.
    Pyro's planar layer has no inverse and can only score its own cached samples.

    References:
        Variational Inference with Normalizing Flows (Rezende & Mohamed, 2015)
        https://arxiv.org/abs/1505.05770

    Example:
        >>> import torch
        >>> layer = Planar(2)
        >>> with torch.no_grad():
        ...     _ = layer.u.fill_(0.8)
        >>> y, ladj = layer.forward_and_log_det(torch.tensor([0.3, -1.2]))
        >>> z, _ = layer.inverse_and_log_det(y)
        >>> torch.allclose(z, torch.tensor([0.3, -1.2]), atol=1e-5)
        True
    """

    forward_method = "analytic"
    inverse_method = "numerical"

    def __init__(self, dim: int) -> None:
        super().__init__(dim)
        self.u = nn.Parameter(torch.zeros(dim))
        self.w = nn.Parameter(torch.randn(dim) / math.sqrt(dim))
        self.b = nn.Parameter(torch.zeros(()))

    def _u_hat(self) -> tuple[Tensor, Tensor]:
        """Return :math:`\\hat u` and :math:`c = w^\\top \\hat u`."""
        wu = self.w @ self.u
        c = above_minus_one(wu)
        u_hat = self.u + (c - wu) * self.w / (self.w @ self.w).clamp_min(1e-12)
        return u_hat, c

    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        u_hat, c = self._u_hat()
        h = torch.tanh(x @ self.w + self.b)
        y = x + h.unsqueeze(-1) * u_hat
        return y, torch.log1p(c * (1 - h**2))

    def inverse_and_log_det(self, y: Tensor) -> tuple[Tensor, Tensor]:
        u_hat, c = self._u_hat()
        t = y @ self.w

        def lhs(a: Tensor) -> tuple[Tensor, Tensor]:
            h = torch.tanh(a + self.b)
            return a + c * h, 1 + c * (1 - h**2)

        a = solve_increasing(lhs, t, t - c.abs(), t + c.abs())
        h = torch.tanh(a + self.b)
        return y - h.unsqueeze(-1) * u_hat, -torch.log1p(c * (1 - h**2))


@register_flow("planar")
def planar(dim: int, *, layers: int = 8) -> FlowStack:
    """A stack of ``layers`` planar layers (:class:`Planar`), each starting at the identity.

    Example:
        >>> import pyroflows
        >>> len(pyroflows.build("planar", 4, layers=3))
        3
    """
    check_positive_int("layers", layers)
    return FlowStack(Planar(dim) for _ in range(layers))
