r"""Masked autoregressive flows (MAF) and inverse autoregressive flows (IAF)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from pyroflows._checks import check_choice, check_positive_int
from pyroflows.transforms.base import Flow, FlowStack, broadcast_context
from pyroflows.transforms.elementwise import Affine, Elementwise
from pyroflows.transforms.nn import MaskedMLP
from pyroflows.transforms.registry import register_flow

ORDERS = ("reverse", "random")


class Autoregressive(Flow):
    r"""An autoregressive layer: entry :math:`i` is transformed given the entries before it.

    With :math:`\tau` the elementwise ``transformer`` and :math:`\theta` a :class:`MaskedMLP`
    (MADE) in the order ``order``, the layer conditions on one side of the map:

    * ``conditioner="data"`` (MAF): :math:`y_i = \tau(x_i; \theta_i(y_{<i}))`. The inverse
      (density) direction is one network pass, :math:`x = \tau^{-1}(y; \theta(y))`; the
      forward (sampling) direction takes ``dim`` passes.
    * ``conditioner="base"`` (IAF): :math:`y_i = \tau(x_i; \theta_i(x_{<i}))`. The forward
      (sampling, and so reverse-KL) direction is one pass; the inverse takes ``dim``.

    The slow direction is exact, not iterative: after pass :math:`k` the entries of the
    first :math:`k` positions in the order are final, since each depends only on earlier
    ones. The Jacobian is triangular in the order, so the log-det is the sum of the
    transformer's log-derivatives.

    References:
        Masked Autoregressive Flow for Density Estimation (Papamakarios et al., 2017)
        https://arxiv.org/abs/1705.07057

        Improved Variational Inference with Inverse Autoregressive Flow (Kingma et al.,
        2016) https://arxiv.org/abs/1606.04934

    Example:
        >>> import torch
        >>> layer = Autoregressive(3, Affine(), conditioner="data", hidden=(8,))
        >>> _ = layer.net.gain.data.fill_(1.0)  # leave the identity start
        >>> x = torch.randn(5, 3)
        >>> y, ladj = layer.forward_and_log_det(x)
        >>> torch.allclose(layer.inverse_and_log_det(y)[0], x, atol=1e-5)
        True
    """

    def __init__(
        self,
        dim: int,
        transformer: Elementwise,
        *,
        conditioner: str = "data",
        order: Tensor | None = None,
        hidden: Sequence[int] = (64, 64),
        activation: str = "relu",
        context: int = 0,
        residual: bool = False,
    ) -> None:
        super().__init__(dim)
        self.conditioner = check_choice("conditioner", conditioner, ["data", "base"])
        self.transformer = transformer
        self.net = MaskedMLP(
            dim, transformer.n_params, hidden, activation, order, context, residual
        )
        self.context_features = context
        one_pass, passes = "analytic", "sequential"
        self.forward_method = passes if conditioner == "data" else one_pass
        self.inverse_method = one_pass if conditioner == "data" else passes

    def _sequential(self, target: Tensor, step, context: Tensor | None) -> tuple[Tensor, Tensor]:
        """Solve ``out = step(target, net(out))`` by ``dim`` passes, one position at a time."""
        out = torch.zeros_like(target)
        for _ in range(self.dim):
            out, ladj = step(target, self.net(out, context))
        return out, ladj

    def forward_and_log_det(
        self, x: Tensor, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        x, context = broadcast_context(x, context, self.context_features)
        if self.conditioner == "base":
            y, ladj = self.transformer.forward(x, self.net(x, context))
        else:
            y, ladj = self._sequential(x, self.transformer.forward, context)
        return y, ladj.sum(-1)

    def inverse_and_log_det(
        self, y: Tensor, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        y, context = broadcast_context(y, context, self.context_features)
        if self.conditioner == "data":
            x, ladj = self.transformer.inverse(y, self.net(y, context))
        else:
            x, ladj = self._sequential(y, self.transformer.inverse, context)
        return x, ladj.sum(-1)


def layer_orders(dim: int, layers: int, kind: str) -> list[Tensor]:
    """Orders of ``layers`` layers: reversed from one layer to the next, or random."""
    check_choice("order", kind, ORDERS)
    if kind == "random":
        return [torch.randperm(dim) for _ in range(layers)]
    forward = torch.arange(dim)
    return [forward if k % 2 == 0 else forward.flip(0) for k in range(layers)]


def autoregressive_stack(
    dim: int,
    transformer: Elementwise,
    *,
    conditioner: str,
    layers: int,
    order: str,
    **options: Any,
) -> FlowStack:
    """``layers`` :class:`Autoregressive` layers of one ``transformer``, with orders from
    :func:`layer_orders`; ``options`` (``hidden``, ``activation``, ``context``,
    ``residual``) go to each layer."""
    check_positive_int("layers", layers)
    return FlowStack(
        Autoregressive(dim, transformer, conditioner=conditioner, order=o, **options)
        for o in layer_orders(dim, layers, order)
    )


def affine_autoregressive(conditioner: str, doc: str) -> Callable[..., FlowStack]:
    """The family of ``layers`` affine :class:`Autoregressive` layers conditioned on
    ``conditioner``'s side (``"data"``: MAF, ``"base"``: IAF): one signature, so the two
    families' options cannot drift apart."""

    def family(
        dim: int,
        *,
        layers: int = 4,
        hidden: Sequence[int] = (64, 64),
        activation: str = "relu",
        order: str = "reverse",
        clamp: float = 3.0,
        context: int = 0,
        residual: bool = False,
    ) -> FlowStack:
        return autoregressive_stack(
            dim,
            Affine(clamp),
            conditioner=conditioner,
            layers=layers,
            order=order,
            hidden=hidden,
            activation=activation,
            context=context,
            residual=residual,
        )

    family.__doc__ = doc
    return family


maf = register_flow("maf")(
    affine_autoregressive(
        "data",
        """MAF: ``layers`` affine autoregressive layers whose density pass is one network call.

    Sampling takes ``dim`` passes per layer. The order is reversed from one layer to the
    next (``order="random"``: a random permutation per layer); ``clamp`` bounds each
    layer's log-scale (:class:`Affine`); ``residual=True`` uses residual MADE blocks
    (:class:`~pyroflows.transforms.nn.MaskedMLP`). Every layer starts at the identity.

    Example:
        >>> import pyroflows
        >>> len(pyroflows.build("maf", 5, layers=3))
        3
    """,
    )
)

iaf = register_flow("iaf")(
    affine_autoregressive(
        "base",
        """IAF: ``layers`` affine autoregressive layers whose sampling pass is one network call.

    Made for variational guides, where draws and their densities come from the forward
    pass; scoring other points takes ``dim`` passes per layer. Options as for ``maf``.

    Example:
        >>> import pyroflows
        >>> len(pyroflows.build("iaf", 5, layers=3))
        3
    """,
    )
)
