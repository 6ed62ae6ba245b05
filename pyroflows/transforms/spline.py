r"""Monotonic rational-quadratic splines with linear tails, and the NSF families built on them."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

from pyroflows._checks import check_positive_float, check_positive_int
from pyroflows.transforms.autoregressive import autoregressive_stack
from pyroflows.transforms.base import FlowStack
from pyroflows.transforms.coupling import Coupling, coupling_masks
from pyroflows.transforms.elementwise import Inverted
from pyroflows.transforms.registry import register_flow

MIN_WIDTH = 1e-3  # smallest bin width and height, as a fraction of the interval
MIN_SLOPE = 1e-3  # smallest derivative at a knot
NEWTON_STEPS = 4  # after the quadratic formula, in the inverse


@dataclass(frozen=True)
class RationalQuadratic:
    r"""A monotonic rational-quadratic spline on :math:`[-B, B]`, the identity outside.

    ``bins`` bins of widths :math:`w_k` and heights :math:`h_k` (softmax of the raw
    parameters, each at least ``1e-3`` of :math:`2B`) and positive derivatives
    :math:`\delta_k` at the interior knots (softplus; 1 at the two end knots, so that the
    spline joins the identity tails with a continuous derivative). In bin :math:`k`, with
    :math:`s_k = h_k / w_k` and :math:`\xi = (x - x_k) / w_k`,

    .. math:: y = y_k + h_k \frac{s_k \xi^2 + \delta_k \xi (1 - \xi)}
              {s_k + (\delta_{k+1} + \delta_k - 2 s_k) \xi (1 - \xi)}

    (Durkan et al. 2019, eq. 4; the derivative is their eq. 5). The inverse solves the
    quadratic of their eq. 6 in the cancellation-free form
    :math:`\xi = 2c / (-b - \sqrt{b^2 - 4ac})`, with the discriminant clamped at 0 and
    :math:`\xi` at :math:`[0, 1]`, so it never returns NaN or inf in float32, then takes four
    Newton steps on the forward map, which restores full float32 accuracy in bins far wider
    than high (where the formula alone loses digits to cancellation). Inputs
    outside :math:`[-B, B]` pass through unchanged, with log-derivative 0: exact at any
    distance. Bins are found with :func:`torch.searchsorted` and every entry is computed
    on the same path (no boolean indexing, so shapes stay static for ``torch.compile``).
    Zero parameters give the identity. ``n_params = 3 * bins - 1`` per entry.

    References:
        Neural Spline Flows (Durkan, Bekasov, Murray & Papamakarios, 2019)
        https://arxiv.org/abs/1906.04032

    Example:
        >>> import torch
        >>> spline = RationalQuadratic(bins=4, bound=3.0)
        >>> x = torch.tensor([-10.0, -1.0, 0.5, 2.9, 10.0])
        >>> params = torch.randn(5, spline.n_params)
        >>> y, ladj = spline.forward(x, params)
        >>> y[[0, 4]].tolist(), torch.allclose(spline.inverse(y, params)[0], x, atol=1e-5)
        ([-10.0, 10.0], True)
    """

    bins: int = 8
    bound: float = 4.0

    def __post_init__(self) -> None:
        check_positive_int("bins", self.bins)
        check_positive_float("bound", self.bound)

    @property
    def n_params(self) -> int:
        return 3 * self.bins - 1

    def _knots(self, params: Tensor) -> Tensor:
        """Knots: ``[..., 0, :]`` x-positions, ``[..., 1, :]`` y-positions, ``[..., 2, :]``
        derivatives, ``bins + 1`` of each."""
        k, bound = self.bins, self.bound
        raw = params[..., : 2 * k].unflatten(-1, (2, k))
        # A softmax written out: torch.softmax over a last dimension of a few bins is 2x
        # slower on the CPU. (The max is a constant shift: detaching it changes no gradient.)
        sizes = (raw - raw.detach().amax(-1, keepdim=True)).exp()
        sizes = sizes / sizes.sum(-1, keepdim=True)
        sizes = MIN_WIDTH + (1 - MIN_WIDTH * k) * sizes  # bin widths and heights
        positions = F.pad(torch.cumsum(sizes, dim=-1), (1, 0)) * (2 * bound) - bound
        offset = math.log(math.expm1(1 - MIN_SLOPE))  # a zero raw derivative gives slope 1
        inner = MIN_SLOPE + F.softplus(params[..., 2 * k :] + offset)
        slopes = F.pad(inner, (1, 1), value=1.0).unsqueeze(-2)
        return torch.cat([positions, slopes], dim=-2)

    def _bin(self, knots: Tensor, v: Tensor, axis: int) -> tuple[Tensor, ...]:
        """Per entry: the bin's left x-knot, width, left y-knot, height and end derivatives.

        The bin is looked up in the knots' ``axis`` (0: x, 1: y), and all six values come
        from one gather of the bin's two ends in each row of the knots.
        """
        edges = knots[..., axis, 1:-1].contiguous()
        index = torch.searchsorted(edges, v.unsqueeze(-1).contiguous())
        ends = torch.cat([index, index + 1], dim=-1).unsqueeze(-2).expand(*index.shape[:-1], 3, 2)
        (x0, x1), (y0, y1), (d0, d1) = (
            row.unbind(-1) for row in knots.gather(-1, ends).unbind(-2)
        )
        return x0, x1 - x0, y0, y1 - y0, d0, d1

    def forward(self, x: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        inside = (x > -self.bound) & (x < self.bound)
        v = x.clamp(-self.bound, self.bound)
        x0, w, y0, h, d0, d1 = self._bin(self._knots(params), v, axis=0)
        xi = ((v - x0) / w).clamp(0, 1)
        rise, grad = _rational(xi, h / w, h, d0, d1)
        return torch.where(inside, y0 + rise, x), torch.where(
            inside, grad.log(), torch.zeros_like(x)
        )

    def inverse(self, y: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        inside = (y > -self.bound) & (y < self.bound)
        v = y.clamp(-self.bound, self.bound)
        x0, w, y0, h, d0, d1 = self._bin(self._knots(params), v, axis=1)
        s = h / w
        dy = v - y0
        curve = d1 + d0 - 2 * s
        a = h * (s - d0) + dy * curve
        b = h * d0 - dy * curve
        c = -s * dy
        root = (b**2 - 4 * a * c).clamp_min(0).sqrt()
        xi = (2 * c / (-b - root)).clamp(0, 1)
        # Newton steps on the forward map: in bins far wider than high, float32's quadratic
        # formula can leave the root 1e-2 off, and the steep end of such a bin needs several.
        for _ in range(NEWTON_STEPS):
            y_xi, grad = _rational(xi, s, h, d0, d1)
            xi = (xi - (y_xi - dy) / (w * grad)).clamp(0, 1)
        _, grad = _rational(xi, s, h, d0, d1)
        x = x0 + xi * w
        ladj = torch.where(inside, -grad.log(), torch.zeros_like(y))
        return torch.where(inside, x, y), ladj


def _rational(xi: Tensor, s: Tensor, h: Tensor, d0: Tensor, d1: Tensor) -> tuple[Tensor, Tensor]:
    """The rise within a bin at relative position ``xi``, and the derivative dy/dx there."""
    mix = xi * (1 - xi)
    denom = s + (d1 + d0 - 2 * s) * mix
    rise = h * (s * xi**2 + d0 * mix) / denom
    grad = s**2 * (d1 * xi**2 + 2 * s * mix + d0 * (1 - xi) ** 2) / denom**2
    return rise, grad


@register_flow("nsf")
def nsf(
    dim: int,
    *,
    layers: int = 4,
    hidden: Sequence[int] = (64, 64),
    activation: str = "relu",
    mask: str = "alternate",
    bins: int = 8,
    bound: float = 4.0,
    context: int = 0,
) -> FlowStack:
    """Neural spline flow, coupling form: ``layers`` coupling layers of
    :class:`RationalQuadratic` splines with ``bins`` bins on ``[-bound, bound]``.

    Both directions are one network pass; the spline's closed form runs in the density
    (inverse) direction and its quadratic solve in the sampling one (:class:`Inverted`).
    Every layer starts at the identity.

    Example:
        >>> import pyroflows
        >>> len(pyroflows.build("nsf", 4, layers=2, bins=5))
        2
    """
    check_positive_int("layers", layers)
    spline = Inverted(RationalQuadratic(bins, bound))  # closed form on the density pass
    return FlowStack(
        Coupling(m, spline, hidden, activation, context) for m in coupling_masks(dim, layers, mask)
    )


@register_flow("nsf_ar")
def nsf_ar(
    dim: int,
    *,
    layers: int = 4,
    hidden: Sequence[int] = (64, 64),
    activation: str = "relu",
    order: str = "reverse",
    bins: int = 8,
    bound: float = 4.0,
    context: int = 0,
    residual: bool = False,
) -> FlowStack:
    """Neural spline flow, autoregressive form: ``layers`` MAF-style layers
    (:class:`Autoregressive`, density in one pass) of :class:`RationalQuadratic` splines.

    Sampling takes ``dim`` passes per layer, each with the spline's quadratic solve (the
    density pass runs its closed form); ``residual=True`` uses residual MADE blocks.
    Every layer starts at the identity.

    Example:
        >>> import pyroflows
        >>> len(pyroflows.build("nsf_ar", 4, layers=2))
        2
    """
    return autoregressive_stack(
        dim,
        Inverted(RationalQuadratic(bins, bound)),  # closed form on the density pass
        conditioner="data",
        layers=layers,
        order=order,
        hidden=hidden,
        activation=activation,
        context=context,
        residual=residual,
    )
