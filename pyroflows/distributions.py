r"""FlowDistribution: a base distribution pushed through a flow, one pass per density."""

from __future__ import annotations

from typing import ClassVar

import torch
from pyro.distributions import TorchDistribution
from torch import Tensor
from torch.distributions import Distribution, constraints

from pyroflows.transforms.base import Flow


class FlowDistribution(TorchDistribution):
    r"""The distribution of :math:`y = f(x)`, :math:`x \sim p_0`, for a flow :math:`f`.

    By the change of variables,

    .. math:: \log q(y) = \log p_0(f^{-1}(y)) + \log|\det J_{f^{-1}}(y)|.

    :meth:`log_prob` costs one inverse pass, :meth:`rsample` one forward pass, and
    :meth:`rsample_and_log_prob` one forward pass for both the samples and their density,
    which is what reverse-KL training needs. Unlike Pyro's
    :class:`~pyro.distributions.TransformedDistribution`, nothing is cached between calls.
    The base distribution must have event shape ``(dim,)`` and live on the flow's device.

    Example:
        >>> import torch, pyro.distributions as dist, pyroflows
        >>> base = dist.Normal(torch.zeros(2), torch.ones(2)).to_event(1)
        >>> q = pyroflows.FlowDistribution(base, pyroflows.build("realnvp", 2))
        >>> y, log_q = q.rsample_and_log_prob((5,))
        >>> torch.allclose(log_q, q.log_prob(y), atol=1e-5)
        True
    """

    arg_constraints: ClassVar[dict[str, constraints.Constraint]] = {}
    support = constraints.real_vector

    def __init__(
        self, base: Distribution, transform: Flow, validate_args: bool | None = None
    ) -> None:
        if not isinstance(base, Distribution):
            raise TypeError(f"base must be a torch Distribution, got {type(base).__name__}")
        if not isinstance(transform, Flow):
            raise TypeError(
                f"transform must be a pyroflows.Flow (see pyroflows.build), "
                f"got {type(transform).__name__}"
            )
        if base.event_shape != torch.Size([transform.dim]):
            raise ValueError(
                f"base event_shape {tuple(base.event_shape)} does not match the flow's "
                f"dim {transform.dim}; use e.g. Normal(...).to_event(1)"
            )
        self.base = base
        self.transform = transform
        super().__init__(base.batch_shape, base.event_shape, validate_args=validate_args)

    @property
    def has_rsample(self) -> bool:
        return self.base.has_rsample

    def expand(self, batch_shape: torch.Size, _instance=None) -> FlowDistribution:
        return FlowDistribution(
            self.base.expand(batch_shape), self.transform, validate_args=self._validate_args
        )

    def rsample(self, sample_shape: torch.Size = torch.Size()) -> Tensor:
        return self.transform.forward_and_log_det(self.base.rsample(sample_shape))[0]

    def sample(self, sample_shape: torch.Size = torch.Size()) -> Tensor:
        with torch.no_grad():
            return self.transform.forward_and_log_det(self.base.sample(sample_shape))[0]

    def rsample_and_log_prob(
        self, sample_shape: torch.Size = torch.Size()
    ) -> tuple[Tensor, Tensor]:
        """Draw reparametrised samples and their log-density with one forward pass."""
        x = self.base.rsample(sample_shape)
        y, ladj = self.transform.forward_and_log_det(x)
        return y, self.base.log_prob(x) - ladj

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(value)
        x, ladj = self.transform.inverse_and_log_det(value)
        return self.base.log_prob(x) + ladj
