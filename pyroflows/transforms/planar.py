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
    r"""``layers`` planar maps :math:`f_k(z) = z + \hat u_k \tanh(w_k^\top z + b_k)`, applied in
    turn (:math:`k = 1` first in the sampling direction).

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

    The maps' :math:`(u_k, w_k, b_k)` are the rows of one ``(layers, 2 dim + 1)`` parameter,
    ``params``, so that Pyro's optimisers, which step tensor by tensor, step one tensor for
    the whole stack (views: :attr:`u`, :attr:`w`, :attr:`b`).

    With ``context=k`` the layer is conditional: a hypernetwork (:class:`~.nn.Hypernet`
    with ``hidden`` units, zero at the start) adds context-dependent offsets to
    :math:`u, w, b`, one set per context row; the constraint and the inverse hold row by
    row.

    References:
        Variational Inference with Normalizing Flows (Rezende & Mohamed, 2015)
        https://arxiv.org/abs/1505.05770

    Example:
        >>> import torch
        >>> layer = Planar(2, layers=3)
        >>> with torch.no_grad():
        ...     _ = layer.u.fill_(0.8)
        >>> y, ladj = layer.forward_and_log_det(torch.tensor([0.3, -1.2]))
        >>> z, _ = layer.inverse_and_log_det(y)
        >>> torch.allclose(z, torch.tensor([0.3, -1.2]), atol=1e-5)
        True
    """

    inverse_method = "numerical"
    analytic_grad = True

    def __init__(
        self, dim: int, context: int = 0, hidden: Sequence[int] = (64, 64), layers: int = 1
    ) -> None:
        super().__init__(dim)
        self.layers = check_positive_int("layers", layers)
        w = torch.randn(layers, dim) / math.sqrt(dim)
        self.params = nn.Parameter(
            torch.cat([torch.zeros(layers, dim), w, torch.zeros(layers, 1)], dim=-1)
        )
        self.context_features = context
        if context:
            shapes = {"u": (layers, dim), "w": (layers, dim), "b": (layers,)}
            self.hyper = Hypernet(shapes, context, hidden)

    @property
    def u(self) -> Tensor:
        return self.params[:, : self.dim]

    @property
    def w(self) -> Tensor:
        return self.params[:, self.dim : 2 * self.dim]

    @property
    def b(self) -> Tensor:
        return self.params[:, -1]

    def _params(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, ...]:
        r"""``x`` broadcast against the context, and per map :math:`\hat u`, :math:`w` (shape
        ``(..., layers, dim)``), :math:`b` and :math:`c = w^\top \hat u` (``(..., layers)``;
        ``...`` the context rows of a conditional layer)."""
        x, context = broadcast_context(x, context, self.context_features)
        u, w, b = self.params.split([self.dim, self.dim, 1], dim=-1)
        b = b.squeeze(-1)
        if context is not None:
            u, w, b = self.hyper.shifted(context, u=u, w=w, b=b)
        wu = (w * u).sum(-1)
        c = above_minus_one(wu)
        u_hat = u + ((c - wu) / (w * w).sum(-1).clamp_min(1e-12)).unsqueeze(-1) * w
        return x, u_hat, w, b, c

    def _forward(self, x: Tensor, params: tuple[Tensor, ...]) -> tuple[list[Tensor], Tensor]:
        """The input of each map and the output, with the summed log-det."""
        u_hat, w, b, c = params
        inputs, total = [], 0.0
        for k in range(self.layers):
            inputs.append(x)
            h = torch.tanh((x * w[..., k, :]).sum(-1) + b[..., k])
            x = x + h.unsqueeze(-1) * u_hat[..., k, :]
            total = total + torch.log1p(c[..., k] * (1 - h**2))
        return [*inputs, x], total

    def forward_and_log_det(
        self, x: Tensor, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        x, *params = self._params(x, context)
        values, ladj = self._forward(x, params)
        return values[-1], ladj

    def forward_and_grad(
        self, x: Tensor, grad: Tensor, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        r"""Map by map, with :math:`h = \tanh(w^\top x + b)` and :math:`h' = 1 - h^2`: the
        log-det's gradient is :math:`-2 c h h' w / (1 + c h')`, and :math:`J^\top = I + h' w
        \hat u^\top` inverts by Sherman-Morrison: :math:`J^{-\top} r = r - h' w \,(\hat
        u^\top r) / (1 + c h')`."""
        with torch.no_grad():
            x, u_hat, w, b, c = self._params(x, context)
            for k in range(self.layers):
                w_k, u_k, c_k = w[..., k, :], u_hat[..., k, :], c[..., k]
                h = torch.tanh((x * w_k).sum(-1) + b[..., k])
                slope = 1 - h**2
                det = 1 + c_k * slope
                r = grad + (2 * c_k * h * slope / det).unsqueeze(-1) * w_k
                grad = r - (slope * (u_k * r).sum(-1) / det).unsqueeze(-1) * w_k
                x = x + h.unsqueeze(-1) * u_k
            return x, grad

    def inverse_and_log_det(
        self, y: Tensor, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        return self.inverse_and_log_det_given(y, None, context)

    def inverse_and_log_det_given(
        self, y: Tensor, x: Tensor | None, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        r"""The inverse, map by map from the last, by root search, or (``x`` given) by one
        Newton step from each map's :math:`a = w^\top x_k` (its input recomputed from
        ``x`` without gradient)."""
        y, u_hat, w, b, c = self._params(y, context)
        known = [None] * self.layers
        if x is not None:
            with torch.no_grad():
                detached = tuple(v.detach() for v in (u_hat, w, b, c))
                known = self._forward(x.detach().expand_as(y), detached)[0][:-1]
        total = 0.0
        for k in reversed(range(self.layers)):
            u_k, w_k, b_k, c_k = u_hat[..., k, :], w[..., k, :], b[..., k], c[..., k]
            t = (y * w_k).sum(-1)

            def lhs(a: Tensor, b_k: Tensor = b_k, c_k: Tensor = c_k) -> tuple[Tensor, Tensor]:
                h = torch.tanh(a + b_k)
                return a + c_k * h, 1 + c_k * (1 - h**2)

            start = None if known[k] is None else (known[k] * w_k.detach()).sum(-1)
            a = solve_increasing(lhs, t, t - c_k.abs(), t + c_k.abs(), start=start)
            h = torch.tanh(a + b_k)
            y = y - h.unsqueeze(-1) * u_k
            total = total - torch.log1p(c_k * (1 - h**2))
        return y, total


@register_flow("planar")
def planar(
    dim: int, *, layers: int = 8, context: int = 0, hidden: Sequence[int] = (64, 64)
) -> FlowStack:
    """``layers`` planar maps (one :class:`Planar` module), each starting at the identity.

    ``context=k`` makes the maps conditional through a hypernetwork of ``hidden`` units
    (unused without a context).

    Example:
        >>> import pyroflows
        >>> pyroflows.build("planar", 4, layers=3)[0].layers
        3
    """
    return FlowStack([Planar(dim, context, hidden, layers)])
