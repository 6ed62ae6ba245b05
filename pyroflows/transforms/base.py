r"""The flow contract: a layer is two primitives, one per direction.

A flow layer is an invertible map :math:`f` on :math:`\mathbb{R}^d`. Each layer implements

* ``forward_and_log_det(x) -> (y, log|det J_f(x)|)``
* ``inverse_and_log_det(y) -> (x, log|det J_{f^{-1}}(y)|)`` with :math:`x = f^{-1}(y)`,

so that :math:`\log|\det J_{f^{-1}}(y)| = -\log|\det J_f(x)|`. Everything torch's
:class:`~torch.distributions.Transform` API asks for (``_call``, ``_inverse``,
``log_abs_det_jacobian``) derives from these two, and nothing is cached: a result never
outlives the parameters that produced it, so an optimiser step can never leave a stale value
behind (Pyro's built-in flows cache the last ``(x, y)`` pair by tensor identity).

Each layer states per direction how it is computed: ``"analytic"`` (closed form),
``"numerical"`` (root finding, exact to the solver's tolerance) or ``"unavailable"``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch
from pyro.distributions import TransformModule
from torch import Tensor
from torch.distributions import constraints

Method = Literal["analytic", "numerical", "unavailable"]
_RANK = {"analytic": 0, "numerical": 1, "unavailable": 2}


class NotInvertibleError(RuntimeError):
    """Raised when a layer is asked for a direction whose method is ``"unavailable"``."""


class Flow(TransformModule):
    r"""Base class of every pyroflows layer and stack: an invertible map of ``dim``-vectors.

    Subclasses implement :meth:`forward_and_log_det` and :meth:`inverse_and_log_det` for any
    batch shape ``(..., dim)``, returning the log-det with the batch shape ``(...)``. They set
    the class attributes ``forward_method`` and ``inverse_method``. A flow is a Pyro
    :class:`~pyro.distributions.TransformModule`, so it works in
    :class:`~pyro.distributions.TransformedDistribution`, ``pyro.module`` and Pyro's
    autoguides unchanged.

    Example:
        >>> import torch, pyroflows
        >>> flow = pyroflows.build("realnvp", 3)
        >>> x = torch.randn(5, 3)
        >>> y, ladj = flow.forward_and_log_det(x)
        >>> x2, ladj_inv = flow.inverse_and_log_det(y)
        >>> torch.allclose(x, x2, atol=1e-5), torch.allclose(ladj, -ladj_inv, atol=1e-5)
        (True, True)
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True
    forward_method: Method = "analytic"
    inverse_method: Method = "analytic"
    #: whether the inverse (density) direction is one pass, not ``dim`` sequential ones
    fast_inverse: bool = True

    def __init__(self, dim: int) -> None:
        super().__init__(cache_size=0)
        self.dim = dim

    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``y = f(x)`` and ``log|det J_f(x)|``."""
        raise NotInvertibleError(f"{type(self).__name__} has no forward direction")

    def inverse_and_log_det(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``x = f^{-1}(y)`` and ``log|det J_{f^{-1}}(y)|``."""
        raise NotInvertibleError(f"{type(self).__name__} has no inverse direction")

    # torch's Transform API, derived from the two primitives.
    def _call(self, x: Tensor) -> Tensor:
        return self.forward_and_log_det(x)[0]

    def _inverse(self, y: Tensor) -> Tensor:
        return self.inverse_and_log_det(y)[0]

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        return self.forward_and_log_det(x)[1]

    def with_cache(self, cache_size: int = 1) -> Flow:
        """Return ``self``: pyroflows never caches, so every cache size behaves as 0."""
        return self

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class FlowStack(Flow):
    r"""The composition :math:`f = f_K \circ \dots \circ f_1` of flow layers.

    ``layers[0]`` acts first in the forward (sampling) direction and last in the inverse
    (density) direction; log-dets add up. A stack's method per direction is the least exact
    of its layers'.

    Example:
        >>> import torch, pyroflows
        >>> from pyroflows.transforms import FlowStack, Planar
        >>> stack = FlowStack([Planar(2), Planar(2)])
        >>> stack.forward_and_log_det(torch.zeros(4, 2))[0].shape
        torch.Size([4, 2])
    """

    def __init__(self, layers: Iterable[Flow]) -> None:
        layers = list(layers)
        if not layers:
            raise ValueError("a FlowStack needs at least one layer")
        for layer in layers:
            if not isinstance(layer, Flow):
                raise TypeError(
                    f"FlowStack layers must be pyroflows.Flow, got {type(layer).__name__}"
                )
        dims = {layer.dim for layer in layers}
        if len(dims) != 1:
            raise ValueError(f"FlowStack layers must share one dim, got {sorted(dims)}")
        super().__init__(dims.pop())
        self.layers = torch.nn.ModuleList(layers)

    @property
    def forward_method(self) -> Method:  # type: ignore[override]
        return max((layer.forward_method for layer in self.layers), key=_RANK.__getitem__)

    @property
    def inverse_method(self) -> Method:  # type: ignore[override]
        return max((layer.inverse_method for layer in self.layers), key=_RANK.__getitem__)

    @property
    def fast_inverse(self) -> bool:  # type: ignore[override]
        return all(layer.fast_inverse for layer in self.layers)

    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        total = x.new_zeros(x.shape[:-1])
        for layer in self.layers:
            x, ladj = layer.forward_and_log_det(x)
            total = total + ladj
        return x, total

    def inverse_and_log_det(self, y: Tensor) -> tuple[Tensor, Tensor]:
        total = y.new_zeros(y.shape[:-1])
        for layer in reversed(self.layers):
            y, ladj = layer.inverse_and_log_det(y)
            total = total + ladj
        return y, total

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, index: int) -> Flow:
        return self.layers[index]
