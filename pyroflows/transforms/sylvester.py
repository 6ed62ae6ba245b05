r"""Householder Sylvester flows, with an exact inverse by back substitution."""

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


class Sylvester(Flow):
    r"""A Sylvester layer :math:`f(z) = z + Q R \tanh(\tilde R Q^\top z + b)`, Householder form.

    :math:`Q = H_1 \cdots H_K` is orthogonal, a product of ``reflections`` Householder
    reflections :math:`H_k = I - 2 v_k v_k^\top / \|v_k\|^2`, and :math:`R, \tilde R` are
    upper-triangular :math:`d \times d`. By Sylvester's determinant identity the Jacobian's
    determinant is :math:`\prod_i (1 + h'_i R_{ii} \tilde R_{ii})` with
    :math:`h' = \tanh'(\tilde R Q^\top z + b) \in (0, 1]`, so the layer is invertible when
    every :math:`R_{ii} \tilde R_{ii} > -1`. As for :class:`~pyroflows.transforms.Planar`,
    the free diagonal of :math:`R` is corrected so that
    :math:`R_{ii} \tilde R_{ii} = m(\cdot) > -1` (:func:`above_minus_one`), and
    :math:`R = 0` is the identity.

    The inverse is exact: in :math:`u = Q^\top z` the map is
    :math:`u' = u + R \tanh(\tilde R u + b)`, whose entry :math:`i` depends only on
    :math:`u_i, \dots, u_d` (both matrices are upper-triangular). Back substitution from
    :math:`u_d` to :math:`u_1` then leaves one strictly increasing scalar equation per
    entry, :math:`u_i + R_{ii} \tanh(\tilde R_{ii} u_i + c_i) = t_i`, whose root lies within
    :math:`|R_{ii}|` of :math:`t_i`; each is solved by safeguarded Newton iteration
    (:mod:`pyroflows.transforms.roots`), so the inverse costs :math:`d` batched root
    searches (given :math:`z` already, one Newton step each). The forward (sampling)
    direction is one pass.

    With ``context=k`` a :class:`~pyroflows.transforms.nn.Hypernet` (zero at the start) adds
    context-dependent offsets to :math:`v_k, R, \tilde R, b`: one :math:`Q` and one pair
    of triangles per context row, and the back substitution runs row by row.

    References:
        Sylvester Normalizing Flows for Variational Inference (van den Berg, Hasenclever,
        Tomczak & Welling, 2018) https://arxiv.org/abs/1803.05649

    Example:
        >>> import torch
        >>> layer = Sylvester(3)
        >>> with torch.no_grad():
        ...     _ = layer.r.normal_()
        >>> x = torch.randn(4, 3)
        >>> y, ladj = layer.forward_and_log_det(x)
        >>> torch.allclose(layer.inverse_and_log_det(y)[0], x, atol=1e-4)
        True
    """

    forward_method = "analytic"
    inverse_method = "numerical"

    def __init__(
        self,
        dim: int,
        reflections: int | None = None,
        context: int = 0,
        hidden: Sequence[int] = (64, 64),
    ) -> None:
        super().__init__(dim)
        k = dim if reflections is None else check_positive_int("reflections", reflections)
        self.v = nn.Parameter(torch.randn(k, dim))
        self.r = nn.Parameter(torch.zeros(dim, dim))
        off_diagonal = torch.randn(dim, dim).triu(1) / math.sqrt(dim)
        self.r_tilde = nn.Parameter(torch.eye(dim) + off_diagonal)
        self.b = nn.Parameter(torch.zeros(dim))
        self.context_features = context
        if context:
            shapes = {"v": (k, dim), "r": (dim, dim), "r_tilde": (dim, dim), "b": (dim,)}
            self.hyper = Hypernet(shapes, context, hidden)

    def _params(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, ...]:
        r"""``x`` broadcast against the context; :math:`Q`, :math:`R` with its corrected
        diagonal, :math:`\tilde R`, :math:`b` and the diagonal products (per context row, as
        batches of matrices, for a conditional layer)."""
        x, context = broadcast_context(x, context, self.context_features)
        v, r, r_tilde, b = self.v, self.r, self.r_tilde, self.b
        if context is not None:
            v, r, r_tilde, b = self.hyper.shifted(context, v=v, r=r, r_tilde=r_tilde, b=b)
        q = torch.eye(self.dim, dtype=x.dtype, device=x.device).expand(*v.shape[:-2], -1, -1)
        for k in range(v.shape[-2]):
            vk = v[..., k, :]
            qv = (q @ vk.unsqueeze(-1)) * (2 / (vk * vk).sum(-1).clamp_min(1e-12))[..., None, None]
            q = q - qv @ vk.unsqueeze(-2)
        r_tilde = r_tilde.triu()
        a, c = r.diagonal(dim1=-2, dim2=-1), r_tilde.diagonal(dim1=-2, dim2=-1)
        product = above_minus_one(a * c)
        diag = a + (product - a * c) * c / (c * c).clamp_min(1e-12)
        r = r.triu(1) + torch.diag_embed(diag)
        return x, q, r, r_tilde, b, product

    def forward_and_log_det(
        self, x: Tensor, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        x, q, r, r_tilde, b, product = self._params(x, context)
        u = (x.unsqueeze(-2) @ q).squeeze(-2)  # Q^T x, as rows
        h = torch.tanh((u.unsqueeze(-2) @ r_tilde.mT).squeeze(-2) + b)
        y = x + ((h.unsqueeze(-2) @ r.mT) @ q.mT).squeeze(-2)
        return y, torch.log1p((1 - h**2) * product).sum(-1)

    def inverse_and_log_det(
        self, y: Tensor, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        return self.inverse_and_log_det_given(y, None, context)

    def inverse_and_log_det_given(
        self, y: Tensor, x: Tensor | None, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        r"""Back substitution, each entry by root search or (``x`` given) by one Newton
        step from :math:`u = Q^\top x`."""
        y, q, r, r_tilde, b, product = self._params(y, context)
        target = (y.unsqueeze(-2) @ q).squeeze(-2)  # u' = Q^T y, as rows
        known = None if x is None else (x.detach().unsqueeze(-2) @ q.detach()).squeeze(-2)
        u: list[Tensor] = [target[..., 0]] * self.dim
        h: list[Tensor] = [target[..., 0]] * self.dim
        for i in reversed(range(self.dim)):
            later = range(i + 1, self.dim)
            zero = torch.zeros_like(u[i])
            c = b[..., i] + sum((r_tilde[..., i, k] * u[k] for k in later), zero)
            t = target[..., i] - sum((r[..., i, j] * h[j] for j in later), zero)
            r_ii, rt_ii = r[..., i, i], r_tilde[..., i, i]

            def lhs(a: Tensor, r_ii=r_ii, rt_ii=rt_ii, c=c) -> tuple[Tensor, Tensor]:
                tanh = torch.tanh(rt_ii * a + c)
                return a + r_ii * tanh, 1 + r_ii * rt_ii * (1 - tanh**2)

            start = None if known is None else known[..., i]
            u[i] = solve_increasing(lhs, t, t - r_ii.abs(), t + r_ii.abs(), start=start)
            h[i] = torch.tanh(rt_ii * u[i] + c)
        hs = torch.stack(h, dim=-1)
        x = (torch.stack(u, dim=-1).unsqueeze(-2) @ q.mT).squeeze(-2)
        return x, -torch.log1p((1 - hs**2) * product).sum(-1)


@register_flow("sylvester")
def sylvester(
    dim: int,
    *,
    layers: int = 4,
    reflections: int | None = None,
    context: int = 0,
    hidden: Sequence[int] = (64, 64),
) -> FlowStack:
    """A stack of ``layers`` Householder Sylvester layers (:class:`Sylvester`), each with
    ``reflections`` reflections (default ``dim``, which spans every orthogonal matrix of
    determinant :math:`(-1)^{dim}`); each starts at the identity. ``context=k`` makes each
    layer conditional through a hypernetwork of ``hidden`` units.

    Example:
        >>> import pyroflows
        >>> len(pyroflows.build("sylvester", 4, layers=2))
        2
    """
    check_positive_int("layers", layers)
    return FlowStack(Sylvester(dim, reflections, context, hidden) for _ in range(layers))
