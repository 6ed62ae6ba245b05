r"""A flow whose two passes run compiled by :func:`torch.compile`."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from pyroflows.transforms.base import Flow, call_with_context


class Compiled(Flow):
    r"""``flow`` with :meth:`forward_and_log_det` and :meth:`inverse_and_log_det` compiled
    by :func:`torch.compile` (``**options`` are its options, e.g. ``mode``).

    The parameters are ``flow``'s own (a submodule), so an optimiser, ``state_dict`` and
    ``.to()`` see the same tensors; the wrapper holds no state of its own, and a new one
    around the same flow reuses the compiled code (torch caches it by the code it
    compiled, guarded on the flow). The first call of each pass compiles it: seconds to
    a minute. Every coupling, autoregressive and spline family compiles to one graph per
    pass (tests/test_compile.py asserts zero graph breaks); the path-derivative helpers
    (:meth:`forward_and_grad`, :meth:`inverse_and_log_det_given`) stay eager.

    Example:
        >>> import pyroflows
        >>> flow = pyroflows.build("realnvp", 2)
        >>> fast = Compiled(flow)  # compiles at the first call of each pass
        >>> all(p is q for p, q in zip(fast.parameters(), flow.parameters(), strict=True))
        True
        >>> fast.inverse_method
        'analytic'
    """

    def __init__(self, flow: Flow, **options: Any) -> None:
        super().__init__(flow.dim)
        self.flow = flow
        self.forward_method, self.inverse_method = flow.forward_method, flow.inverse_method
        self.analytic_grad = flow.analytic_grad
        self.context_features = flow.context_features
        self._forward = torch.compile(flow.forward_and_log_det, **options)
        self._inverse = torch.compile(flow.inverse_and_log_det, **options)

    def forward_and_log_det(
        self, x: Tensor, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        return call_with_context(self._forward, x, context, self.context_features)

    def inverse_and_log_det(
        self, y: Tensor, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        return call_with_context(self._inverse, y, context, self.context_features)

    def initialize(self, y: Tensor, context: Tensor | None = None) -> None:
        self.flow.initialize(y, context)

    def inverse_and_log_det_given(
        self, y: Tensor, x: Tensor, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        return self.flow.inverse_and_log_det_given(y, x, context)

    def forward_and_grad(
        self, x: Tensor, grad: Tensor, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        return self.flow.forward_and_grad(x, grad, context)
