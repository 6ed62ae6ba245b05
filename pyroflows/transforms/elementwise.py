r"""Scalar bijections with external parameters: the transformers of coupling layers.

An elementwise transformer maps each entry :math:`x_i` by a monotone scalar bijection whose
parameters :math:`\theta_i` come from a network. ``forward(x, params)`` and
``inverse(y, params)`` take ``params`` of shape ``x.shape + (n_params,)`` and return the
output with the elementwise log-derivative. Zero parameters give the identity, so a layer
whose network starts at zero starts as the identity.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch
from torch import Tensor

from pyroflows._checks import check_positive_float


class Elementwise(Protocol):
    """A scalar bijection family parametrised by ``n_params`` numbers per entry."""

    n_params: int

    def forward(self, x: Tensor, params: Tensor) -> tuple[Tensor, Tensor]: ...

    def inverse(self, y: Tensor, params: Tensor) -> tuple[Tensor, Tensor]: ...


@dataclass(frozen=True)
class Shift:
    r"""The additive map :math:`y = x + t`, with log-derivative 0 (NICE's coupling law).

    References:
        NICE: Non-linear Independent Components Estimation (Dinh et al., 2014)
        https://arxiv.org/abs/1410.8516

    Example:
        >>> import torch
        >>> Shift().forward(torch.tensor([1.0]), torch.tensor([[2.0]]))
        (tensor([3.]), tensor([0.]))
    """

    n_params: ClassVar[int] = 1

    def forward(self, x: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        return x + params[..., 0], torch.zeros_like(x)

    def inverse(self, y: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        return y - params[..., 0], torch.zeros_like(y)


@dataclass(frozen=True)
class Affine:
    r"""The affine map :math:`y = x e^{s} + t` with a softly clamped log-scale.

    The raw log-scale :math:`\tilde s` is bounded smoothly,
    :math:`s = c \tanh(\tilde s / c)` with ``clamp`` :math:`= c`, so one layer can scale by at
    most :math:`e^{\pm c}`. This keeps training and held-out densities finite where an
    unbounded :math:`e^{\tilde s}` overflows (the soft clamp of Ardizzone et al.; RealNVP's
    affine coupling law).

    References:
        Density estimation using Real NVP (Dinh et al., 2016)
        https://arxiv.org/abs/1605.08803

        Guided Image Generation with Conditional Invertible Neural Networks
        (Ardizzone et al., 2019) https://arxiv.org/abs/1907.02392

    Example:
        >>> import torch
        >>> y, ladj = Affine().forward(torch.tensor([1.0]), torch.tensor([[0.0, 2.0]]))
        >>> y, ladj
        (tensor([3.]), tensor([0.]))
    """

    clamp: float = 3.0
    n_params: ClassVar[int] = 2

    def __post_init__(self) -> None:
        check_positive_float("clamp", self.clamp)

    def _split(self, params: Tensor, sign: float) -> tuple[Tensor, Tensor]:
        # sign * s (by tanh's oddness: no negation in the inverse) and t, by one unbind
        # (whose backward is one stack, where two slices' would be two zero-filled tensors
        # and their sum): fewer passes over the batch in eager mode
        raw, shift = params.unbind(-1)
        return torch.tanh(raw * (sign / self.clamp)) * self.clamp, shift

    def forward(self, x: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        log_scale, shift = self._split(params, 1.0)
        return x * log_scale.exp() + shift, log_scale

    def inverse(self, y: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        neg_log_scale, shift = self._split(params, -1.0)
        return (y - shift) * neg_log_scale.exp(), neg_log_scale


@dataclass(frozen=True)
class Inverted:
    """The inverse of an elementwise ``transformer``: its two directions swapped.

    A layer built on it puts the transformer's closed-form direction on the layer's inverse
    (density) pass: for splines, whose inverse needs a quadratic solve, density estimation
    then runs the cheap direction on every training step.

    Example:
        >>> import torch
        >>> Inverted(Shift()).forward(torch.tensor([1.0]), torch.tensor([[2.0]]))
        (tensor([-1.]), tensor([0.]))
    """

    transformer: Elementwise

    @property
    def n_params(self) -> int:
        return self.transformer.n_params

    def forward(self, x: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        return self.transformer.inverse(x, params)

    def inverse(self, y: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        return self.transformer.forward(y, params)
