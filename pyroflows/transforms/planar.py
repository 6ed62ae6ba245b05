r"""Planar flows, with an exact inverse by one-dimensional root finding."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from pyroflows._checks import check_positive_int
from pyroflows.transforms._math import above_minus_one
from pyroflows.transforms.base import Flow, FlowStack, broadcast_context
from pyroflows.transforms.nn import Hypernet
from pyroflows.transforms.registry import register_flow
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
    Given :math:`z` already (:meth:`~pyroflows.transforms.Flow.inverse_and_log_det_given`),
    one Newton step from its :math:`a` replaces the search.
    Pyro's planar layer has no inverse and can only score its own cached samples.

    With ``context=k`` the layer is conditional: a hypernetwork (:class:`~.nn.Hypernet`
    with ``hidden`` units, zero at the start) adds context-dependent offsets to
    :math:`u, w, b`, one set per context row; the constraint and the inverse hold row by
    row.

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

    inverse_method = "numerical"
    analytic_grad = True

    def __init__(self, dim: int, context: int = 0, hidden: Sequence[int] = (64, 64)) -> None:
        super().__init__(dim)
        w = torch.randn(dim) / math.sqrt(dim)
        #: :math:`(u, w, b)` in one vector (Pyro's optimisers step tensor by tensor)
        self.params = nn.Parameter(torch.cat([torch.zeros(dim), w, torch.zeros(1)]))
        self.context_features = context
        if context:
            self.hyper = Hypernet({"u": (dim,), "w": (dim,), "b": ()}, context, hidden)

    @property
    def u(self) -> Tensor:
        return self.params[: self.dim]

    @property
    def w(self) -> Tensor:
        return self.params[self.dim : 2 * self.dim]

    @property
    def b(self) -> Tensor:
        return self.params[-1]

    def _params(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, ...]:
        r"""``x`` broadcast against the context, :math:`\hat u`, :math:`w`, :math:`b` and
        :math:`c = w^\top \hat u` (per context row for a conditional layer)."""
        x, context = broadcast_context(x, context, self.context_features)
        u, w, b = self.params.split([self.dim, self.dim, 1])
        b = b.squeeze(-1)
        if context is not None:
            u, w, b = self.hyper.shifted(context, u=u, w=w, b=b)
        wu = (w * u).sum(-1)
        c = above_minus_one(wu)
        u_hat = u + ((c - wu) / (w * w).sum(-1).clamp_min(1e-12)).unsqueeze(-1) * w
        return x, u_hat, w, b, c

    def forward_and_log_det(
        self, x: Tensor, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        x, u_hat, w, b, c = self._params(x, context)
        h = torch.tanh((x * w).sum(-1) + b)
        y = x + h.unsqueeze(-1) * u_hat
        return y, torch.log1p(c * (1 - h**2))

    def forward_and_grad(
        self, x: Tensor, grad: Tensor, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        r"""With :math:`h = \tanh(w^\top x + b)` and :math:`h' = 1 - h^2`, the log-det's
        gradient is :math:`-2 c h h' w / (1 + c h')`, and :math:`J^\top = I + h' w \hat
        u^\top` inverts by Sherman-Morrison: :math:`J^{-\top} r = r - h' w \,(\hat u^\top
        r) / (1 + c h')`."""
        with torch.no_grad():
            x, u_hat, w, b, c = self._params(x, context)
            h = torch.tanh((x * w).sum(-1) + b)
            slope = 1 - h**2
            det = 1 + c * slope
            r = grad + (2 * c * h * slope / det).unsqueeze(-1) * w
            pushed = r - (slope * (u_hat * r).sum(-1) / det).unsqueeze(-1) * w
            return x + h.unsqueeze(-1) * u_hat, pushed

    def inverse_and_log_det(
        self, y: Tensor, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        return self.inverse_and_log_det_given(y, None, context)

    def inverse_and_log_det_given(
        self, y: Tensor, x: Tensor | None, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        r"""The inverse, by root search, or (``x`` given) by one Newton step from its
        :math:`a = w^\top x`."""
        y, u_hat, w, b, c = self._params(y, context)
        t = (y * w).sum(-1)

        def lhs(a: Tensor) -> tuple[Tensor, Tensor]:
            h = torch.tanh(a + b)
            return a + c * h, 1 + c * (1 - h**2)

        start = None if x is None else (x.detach() * w.detach()).sum(-1)
        a = solve_increasing(lhs, t, t - c.abs(), t + c.abs(), start=start)
        h = torch.tanh(a + b)
        return y - h.unsqueeze(-1) * u_hat, -torch.log1p(c * (1 - h**2))


@register_flow("planar")
def planar(
    dim: int, *, layers: int = 8, context: int = 0, hidden: Sequence[int] = (64, 64)
) -> FlowStack:
    """A stack of ``layers`` planar layers (:class:`Planar`), each starting at the identity.

    ``context=k`` makes each layer conditional through a hypernetwork of ``hidden`` units
    (unused without a context).

    Example:
        >>> import pyroflows
        >>> len(pyroflows.build("planar", 4, layers=3))
        3
    """
    check_positive_int("layers", layers)
    return FlowStack(Planar(dim, context, hidden) for _ in range(layers))
