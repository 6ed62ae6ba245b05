r"""A flow whose parameters live in one tensor, for optimisers that step tensor by tensor."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from pyroflows.transforms.base import Flow, Method, call_with_context


class Packed(Flow):
    r"""The flow ``flow`` with all its parameters packed into one flat tensor.

    The map is unchanged: each parameter of ``flow`` becomes a view of the flat vector
    :math:`\theta`, re-read at every call, so gradients, state dicts and ``.to(device)``
    act on :math:`\theta` alone (and on the buffers, which the wrapper holds too). Pyro's
    optimisers (``pyro.optim``) make one torch optimiser per parameter tensor and step them
    one by one, and ``pyro.module`` registers every tensor on every call, so a flow guide
    with dozens of small tensors spends most of an SVI step in that bookkeeping; packed,
    it is one tensor, like :class:`~pyro.infer.autoguide.AutoMultivariateNormal`'s few.
    The wrapped flow is kept out of the module tree (its parameters would otherwise count
    twice); ``train``/``eval`` are passed on to it.

    Setting ``held = True`` holds :math:`\theta` fixed: the flow reads it detached, so it
    is not in the autograd graph and gets no gradient at all (``.grad`` stays ``None``, and
    a torch optimiser neither steps it nor starts its state).

    Example:
        >>> import torch, pyroflows
        >>> flow = pyroflows.build("planar", 3, layers=2)
        >>> packed = Packed(flow)
        >>> [name for name, _ in packed.named_parameters()]
        ['flat']
        >>> x = torch.randn(4, 3)
        >>> torch.allclose(packed(x), flow(x))
        True
    """

    def __init__(self, flow: Flow) -> None:
        super().__init__(flow.dim)
        self._flow = (flow,)  # a tuple keeps it out of the module tree
        self._slots: list[tuple[nn.Module, str, torch.Size]] = []
        parts = []
        for module in flow.modules():
            for name, param in list(module.named_parameters(recurse=False)):
                self._slots.append((module, name, param.shape))
                parts.append(param.detach().reshape(-1))
                del module._parameters[name]
        self.flat = nn.Parameter(torch.cat(parts) if parts else torch.zeros(0))
        self._sizes = [math.prod(shape) for _, _, shape in self._slots]
        self.held = False
        self._buffer_slots: list[tuple[nn.Module, str]] = []
        for module in flow.modules():
            for name, buffer in list(module.named_buffers(recurse=False)):
                key = f"_buffer{len(self._buffer_slots)}"
                self._buffer_slots.append((module, name))
                self.register_buffer(key, buffer)
        self._load()

    @property
    def forward_method(self) -> Method:  # type: ignore[override]
        return self._flow[0].forward_method

    @property
    def inverse_method(self) -> Method:  # type: ignore[override]
        return self._flow[0].inverse_method

    @property
    def fast_inverse(self) -> bool:  # type: ignore[override]
        return self._flow[0].fast_inverse

    @property
    def analytic_score(self) -> bool:  # type: ignore[override]
        return self._flow[0].analytic_score

    def _load(self) -> Flow:
        """Point every parameter and buffer of the wrapped flow at this wrapper's tensors."""
        flat = self.flat.detach() if self.held else self.flat
        for (module, name, shape), view in zip(self._slots, flat.split(self._sizes), strict=True):
            module.__dict__[name] = view.view(shape)
        for index, (module, name) in enumerate(self._buffer_slots):
            module._buffers[name] = getattr(self, f"_buffer{index}")
        return self._flow[0]

    @property
    def context_features(self) -> int:  # type: ignore[override]
        return self._flow[0].context_features

    def forward_and_log_det(
        self, x: Tensor, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        flow = self._load()
        return call_with_context(flow.forward_and_log_det, x, context, flow.context_features)

    def inverse_and_log_det(
        self, y: Tensor, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        flow = self._load()
        return call_with_context(flow.inverse_and_log_det, y, context, flow.context_features)

    def inverse_and_log_det_given(
        self, y: Tensor, x: Tensor, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        return self._load().inverse_and_log_det_given(y, x, context)

    def forward_and_score(
        self, x: Tensor, score: Tensor, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        return self._load().forward_and_score(x, score, context)

    def train(self, mode: bool = True) -> Packed:
        self._flow[0].train(mode)
        return super().train(mode)
