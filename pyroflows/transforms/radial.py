r"""Radial flows, with an exact closed-form inverse."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pyroflows._checks import check_positive_int
from pyroflows.transforms._math import above_minus_one
from pyroflows.transforms.base import Flow, FlowStack, broadcast_context
from pyroflows.transforms.nn import Hypernet
from pyroflows.transforms.registry import register_flow


class Radial(Flow):
    r"""A radial layer :math:`f(z) = z + \beta h(r) (z - z_0)`, :math:`h(r) = 1 / (\alpha + r)`.

    Here :math:`r = \|z - z_0\|` and the log-det is

    .. math:: (d - 1) \log\big(1 + \beta h(r)\big)
              + \log\Big(1 + \frac{\alpha\beta}{(\alpha + r)^2}\Big).

    The layer is invertible when :math:`\beta \ge -\alpha` (Rezende & Mohamed 2015, appendix
    A); the free parameters map to :math:`\alpha = \mathrm{softplus}(\alpha')` and
    :math:`\beta = \alpha (1 - \epsilon) \, \mathrm{elu}(\beta') > -\alpha (1 - \epsilon)`
    (:math:`\epsilon = 10^{-3}` keeps the bound strict in floating point), so
    :math:`\beta' = 0` is the identity.

    The inverse is exact and closed-form. Taking norms of :math:`y - z_0 = (1 + \beta h(r))
    (z - z_0)` gives the increasing scalar equation :math:`s = r + \beta r / (\alpha + r)`
    in :math:`r`, with :math:`s = \|y - z_0\|`, i.e. the quadratic
    :math:`r^2 + (\alpha + \beta - s) r - \alpha s = 0`, whose one non-negative root is taken
    in the form that avoids cancellation; then :math:`z = z_0 + (y - z_0) / (1 + \beta h(r))`.

    With ``context=k`` the layer is conditional: a hypernetwork (zero at the start) adds
    context-dependent offsets to :math:`z_0, \alpha', \beta'`, one set per context row.

    References:
        Variational Inference with Normalizing Flows (Rezende & Mohamed, 2015)
        https://arxiv.org/abs/1505.05770

        A family of nonparametric density estimation algorithms (Tabak & Turner, 2013)
        https://doi.org/10.1002/cpa.21423

    Example:
        >>> import torch
        >>> layer = Radial(3)
        >>> with torch.no_grad():
        ...     _ = layer.beta_raw.fill_(1.5)
        >>> x = torch.tensor([0.5, -0.2, 1.0])
        >>> torch.allclose(layer.inv(layer(x)), x, atol=1e-5)
        True
    """

    def __init__(self, dim: int, context: int = 0, hidden: Sequence[int] = (64, 64)) -> None:
        super().__init__(dim)
        self.z0 = nn.Parameter(torch.randn(dim) * 0.1)
        self.alpha_raw = nn.Parameter(torch.zeros(()))
        self.beta_raw = nn.Parameter(torch.zeros(()))
        self.context_features = context
        if context:
            shapes = {"z0": (dim,), "alpha_raw": (), "beta_raw": ()}
            self.hyper = Hypernet(shapes, context, hidden)

    def _params(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, ...]:
        r"""``x`` broadcast against the context, :math:`z_0`, :math:`\alpha`, :math:`\beta`
        (per context row for a conditional layer)."""
        x, context = broadcast_context(x, context, self.context_features)
        z0, alpha_raw, beta_raw = self.z0, self.alpha_raw, self.beta_raw
        if context is not None:
            z0, alpha_raw, beta_raw = self.hyper.shifted(
                context, z0=z0, alpha_raw=alpha_raw, beta_raw=beta_raw
            )
        alpha = F.softplus(alpha_raw)
        return x, z0, alpha, alpha * above_minus_one(beta_raw)

    def _log_det(self, r: Tensor, alpha: Tensor, beta: Tensor) -> Tensor:
        return (self.dim - 1) * torch.log1p(beta / (alpha + r)) + torch.log1p(
            alpha * beta / (alpha + r) ** 2
        )

    def forward_and_log_det(
        self, x: Tensor, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        x, z0, alpha, beta = self._params(x, context)
        diff = x - z0
        r = torch.linalg.vector_norm(diff, dim=-1)
        y = x + (beta / (alpha + r)).unsqueeze(-1) * diff
        return y, self._log_det(r, alpha, beta)

    def inverse_and_log_det(
        self, y: Tensor, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        y, z0, alpha, beta = self._params(y, context)
        diff = y - z0
        s = torch.linalg.vector_norm(diff, dim=-1)
        b = alpha + beta - s
        root = (b**2 + 4 * alpha * s).sqrt()
        # Both forms are the same root; each is free of cancellation on its side of b = 0.
        r = torch.where(
            b < 0, (root - b) / 2, 2 * alpha * s / (b + root).clamp_min(torch.finfo(s.dtype).tiny)
        )
        x = z0 + diff / (1 + beta / (alpha + r)).unsqueeze(-1)
        return x, -self._log_det(r, alpha, beta)


@register_flow("radial")
def radial(
    dim: int, *, layers: int = 8, context: int = 0, hidden: Sequence[int] = (64, 64)
) -> FlowStack:
    """A stack of ``layers`` radial layers (:class:`Radial`), each starting at the identity.

    ``context=k`` makes each layer conditional through a hypernetwork of ``hidden`` units
    (unused without a context).

    Example:
        >>> import pyroflows
        >>> len(pyroflows.build("radial", 4, layers=3))
        3
    """
    check_positive_int("layers", layers)
    return FlowStack(Radial(dim, context, hidden) for _ in range(layers))
