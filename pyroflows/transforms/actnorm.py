r"""Elementwise affine layers: a plain one, and Glow's actnorm with a data-dependent start."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from pyroflows.transforms.base import Flow, FlowStack, broadcast_context
from pyroflows.transforms.nn import Hypernet
from pyroflows.transforms.registry import register_flow


class LocScale(Flow):
    r"""The elementwise affine map :math:`y = x \odot e^{s} + t`, log-det :math:`\sum_i s_i`.

    It starts at the given ``loc`` (:math:`t`) and ``scale`` (:math:`e^{s}`), by default
    the identity. It is the diagonal scaling of ``nice`` and the parent of :class:`ActNorm`.
    With ``context=k`` a :class:`~.nn.Hypernet` adds context-dependent offsets to
    :math:`t` and :math:`s`, one set per context row.

    Example:
        >>> import torch
        >>> layer = LocScale(torch.tensor([1.0, 2.0]), torch.tensor([0.5, 3.0]))
        >>> layer.forward_and_log_det(torch.ones(2))[0]
        tensor([1.5000, 5.0000], grad_fn=<AddBackward0>)
    """

    def __init__(
        self,
        loc: Tensor,
        scale: Tensor | None = None,
        context: int = 0,
        hidden: Sequence[int] = (64, 64),
    ) -> None:
        if loc.dim() != 1:
            raise ValueError(f"loc must be a vector, got shape {tuple(loc.shape)}")
        scale = torch.ones_like(loc) if scale is None else scale.expand_as(loc)
        if not bool((scale > 0).all()):
            raise ValueError("scale must be positive")
        super().__init__(len(loc))
        self.shift = nn.Parameter(loc.detach().clone())
        self.log_scale = nn.Parameter(scale.detach().log())
        self.context_features = context
        if context:
            shapes = {"shift": (self.dim,), "log_scale": (self.dim,)}
            self.hyper = Hypernet(shapes, context, hidden)

    def _params(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """``x`` broadcast against the context, :math:`t` and :math:`s` (per context row)."""
        x, context = broadcast_context(x, context, self.context_features)
        if context is None:
            return x, self.shift, self.log_scale
        return x, *self.hyper.shifted(context, shift=self.shift, log_scale=self.log_scale)

    def forward_and_log_det(
        self, x: Tensor, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        x, shift, log_scale = self._params(x, context)
        y = x * log_scale.exp() + shift
        return y, log_scale.sum(-1).expand(x.shape[:-1])

    def inverse_and_log_det(
        self, y: Tensor, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        y, shift, log_scale = self._params(y, context)
        x = (y - shift) * (-log_scale).exp()
        return x, (-log_scale.sum(-1)).expand(y.shape[:-1])


class ActNorm(LocScale):
    r"""A :class:`LocScale` layer that can start from data (Glow's actnorm).

    It starts as the identity. :meth:`initialize` with a batch of at least two vectors on
    its output side (the density direction: data in, noise out) sets :math:`t` and
    :math:`s` to the batch's mean and log standard deviation, so that the layer maps that
    batch to zero mean and unit variance per dimension (Kingma & Dhariwal 2018, sec. 3.1).
    Only that explicit call starts it from data; no pass ever does, so a flow of actnorm
    layers is one fixed function whichever method is called first (a guide's actnorm
    layers stay at the identity start). :class:`~pyroflows.DensityEstimator` calls
    ``flow.initialize(rows)`` in ``fit``.

    References:
        Glow: Generative Flow with Invertible 1x1 Convolutions (Kingma & Dhariwal, 2018)
        https://arxiv.org/abs/1807.03039

    Example:
        >>> import torch
        >>> layer = ActNorm(2)
        >>> data = torch.randn(1000, 2) * torch.tensor([3.0, 0.5]) + 10
        >>> torch.equal(layer.inverse_and_log_det(data)[0], data)  # the identity until started
        True
        >>> layer.initialize(data)
        >>> z, _ = layer.inverse_and_log_det(data)
        >>> torch.allclose(z.mean(0), torch.zeros(2), atol=1e-5)
        True
    """

    def __init__(self, dim: int, context: int = 0, hidden: Sequence[int] = (64, 64)) -> None:
        super().__init__(torch.zeros(dim), context=context, hidden=hidden)

    @torch.no_grad()
    def initialize(self, y: Tensor, context: Tensor | None = None) -> None:
        """Set :math:`t, s` to the mean and log standard deviation of the rows ``y``.

        The context is not read: the hypernetwork's offsets start at zero. Fewer than two
        rows are refused, and a constant dimension keeps a unit scale.
        """
        rows = y.reshape(-1, self.dim)
        if rows.shape[0] < 2:
            raise ValueError(f"actnorm starts from at least two rows of data, got {rows.shape[0]}")
        std = rows.std(0)
        self.shift.copy_(rows.mean(0))
        self.log_scale.copy_(torch.where(std > 0, std, torch.ones_like(std)).log())


@register_flow("actnorm")
def actnorm(dim: int, *, context: int = 0, hidden: Sequence[int] = (64, 64)) -> FlowStack:
    """A single :class:`ActNorm` layer: a learned per-dimension affine map (conditional
    with ``context=k``, through a hypernetwork of ``hidden`` units).

    Example:
        >>> import pyroflows
        >>> len(pyroflows.build("actnorm", 3))
        1
    """
    return FlowStack([ActNorm(dim, context, hidden)])
