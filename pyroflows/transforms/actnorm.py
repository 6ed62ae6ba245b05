r"""Elementwise affine layers: a plain one, and Glow's actnorm with a data-dependent start."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

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
    r"""A :class:`LocScale` layer that starts from the data it first sees (Glow's actnorm).

    It starts as the identity. The first inverse pass in training mode over a batch of at
    least two vectors (the density direction: data in, noise out) sets :math:`t` and
    :math:`s` to the batch's mean and log standard deviation, so that its output has zero
    mean and unit variance per dimension (Kingma & Dhariwal 2018, sec. 3.1). Forward passes
    (sampling, variational inference) never initialise, so a guide still starts at the
    identity. Whether the layer is initialised is a buffer, saved in its ``state_dict``.

    References:
        Glow: Generative Flow with Invertible 1x1 Convolutions (Kingma & Dhariwal, 2018)
        https://arxiv.org/abs/1807.03039

    Example:
        >>> import torch
        >>> layer = ActNorm(2)
        >>> data = torch.randn(1000, 2) * torch.tensor([3.0, 0.5]) + 10
        >>> z, _ = layer.inverse_and_log_det(data)
        >>> torch.allclose(z.mean(0), torch.zeros(2), atol=1e-5), bool(layer.initialized)
        (True, True)
    """

    def __init__(self, dim: int, context: int = 0, hidden: Sequence[int] = (64, 64)) -> None:
        super().__init__(torch.zeros(dim), context=context, hidden=hidden)
        self.register_buffer("initialized", torch.tensor(False))
        self._known_initialized = False
        self.register_load_state_dict_post_hook(_forget_initialized)

    def inverse_and_log_det(
        self, y: Tensor, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        if self.training and not self._is_initialized():
            self._initialize(y.reshape(-1, self.dim))
        return super().inverse_and_log_det(y, context)

    def _is_initialized(self) -> bool:
        # Read the buffer (a device sync) only until it is known to be set.
        if not self._known_initialized:
            self._known_initialized = bool(self.initialized)
        return self._known_initialized

    @torch.no_grad()
    def _initialize(self, data: Tensor) -> None:
        if data.shape[0] < 2:
            return
        mean, std = data.mean(0), data.std(0)
        self.shift.copy_(mean)
        self.log_scale.copy_(torch.where(std > 0, std, torch.ones_like(std)).log())
        self.initialized.fill_(True)
        self._known_initialized = True


def skip_data_init(module: nn.Module) -> None:
    """Mark every :class:`ActNorm` in ``module`` as initialised, keeping its current values.

    Variational inference has no data to start from: a guide's actnorm layers start at the
    identity and stay plain learned affine maps, whatever points the guide later scores.

    Example:
        >>> import torch, pyroflows
        >>> flow = pyroflows.build("glow", 2)
        >>> skip_data_init(flow)
        >>> flow.inverse_and_log_det(torch.randn(100, 2) * 5)[1].abs().max().item()
        0.0
    """
    for layer in module.modules():
        if isinstance(layer, ActNorm):
            layer.initialized.fill_(True)
            layer._known_initialized = True


def _forget_initialized(module: ActNorm, incompatible_keys: Any) -> None:
    module._known_initialized = False


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
