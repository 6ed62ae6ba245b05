r"""FlowDistribution: a base distribution pushed through a flow, one pass per density."""

from __future__ import annotations

from typing import ClassVar

import torch
from pyro.distributions import TorchDistribution
from torch import Tensor
from torch.distributions import Distribution, Independent, Normal, constraints

from pyroflows.transforms.base import Conditioned, Flow


class FlowDistribution(TorchDistribution):
    r"""The distribution of :math:`y = f(x)`, :math:`x \sim p_0`, for a flow :math:`f`.

    By the change of variables,

    .. math:: \log q(y) = \log p_0(f^{-1}(y)) + \log|\det J_{f^{-1}}(y)|.

    :meth:`log_prob` costs one inverse pass, :meth:`rsample` one forward pass, and
    :meth:`rsample_and_log_prob` one forward pass for both the samples and their density,
    which is what reverse-KL training needs. The base distribution must have event shape
    ``(dim,)`` and live on the flow's device.

    For a conditional flow with its context fixed, ``flow.condition(c)``, this is
    :math:`q(y \mid c)`, with the batch shape of ``c`` (a batch of contexts gives a batch
    of conditional distributions).

    Nothing is remembered between calls: :meth:`log_prob` always runs the inverse, so a
    draw and its density in one pass come only from :meth:`rsample_and_log_prob` (which
    :class:`~pyroflows.AutoFlow` uses).

    With ``stl=True`` the log-density of a draw from :meth:`rsample_and_log_prob` is
    computed with the flow's parameters held fixed, so that its gradient reaches the
    parameters (and a context) only through the draw: the path-derivative ("sticking the
    landing") estimator of Roeder et al. (2017). Its value is unchanged; the term it drops
    (the score function) has expectation zero, and what remains of the reverse-KL gradient
    is exactly zero for every draw when the flow equals the target. (It is unbiased for the
    ELBO, not for importance-weighted bounds such as Renyi's.) The base distribution is
    then taken to have no learnable parameters. For planar flows and the guides' Gaussian
    part (``analytic_grad``) with a normal base this costs a gradient-free forward pass
    (:meth:`~pyroflows.transforms.Flow.forward_and_grad`); for other flows one inverse pass
    told the base draw (:meth:`~pyroflows.transforms.Flow.inverse_and_log_det_given`).

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
        self,
        base: Distribution,
        transform: Flow,
        validate_args: bool | None = None,
        *,
        stl: bool = False,
    ) -> None:
        if not isinstance(base, Distribution):
            raise TypeError(f"base must be a torch Distribution, got {type(base).__name__}")
        if not isinstance(transform, Flow):
            raise TypeError(
                f"transform must be a pyroflows.Flow (see pyroflows.build), "
                f"got {type(transform).__name__}"
            )
        if not torch.jit.is_tracing() and base.event_shape != torch.Size([transform.dim]):
            raise ValueError(
                f"base event_shape {tuple(base.event_shape)} does not match the flow's "
                f"dim {transform.dim}; use e.g. Normal(...).to_event(1)"
            )
        if isinstance(transform, Conditioned):  # one distribution per context row
            context_batch = transform.context.shape[:-1]
            base = base.expand(torch.broadcast_shapes(base.batch_shape, context_batch))
        self.base = base
        self.transform = transform
        self.stl = stl
        super().__init__(base.batch_shape, base.event_shape, validate_args=validate_args)

    @property
    def has_rsample(self) -> bool:
        return self.base.has_rsample

    def expand(self, batch_shape: torch.Size, _instance=None) -> FlowDistribution:
        return FlowDistribution(
            self.base.expand(batch_shape),
            self.transform,
            validate_args=self._validate_args,
            stl=self.stl,
        )

    def rsample(self, sample_shape: torch.Size = torch.Size()) -> Tensor:
        return self.rsample_and_log_prob(sample_shape)[0]

    def sample(self, sample_shape: torch.Size = torch.Size()) -> Tensor:
        with torch.no_grad():
            return self.transform.forward_and_log_det(self.base.sample(sample_shape))[0]

    def rsample_and_log_prob(
        self, sample_shape: torch.Size = torch.Size()
    ) -> tuple[Tensor, Tensor]:
        """Draw reparametrised samples and their log-density with one forward pass."""
        x = self.base.rsample(sample_shape)
        y, ladj = self.transform.forward_and_log_det(x)
        log_q = self.base.log_prob(x) - ladj
        if self.stl:
            log_q = self._path_log_prob(x, y, log_q)
        return y, log_q

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(value)
        x, ladj = self.transform.inverse_and_log_det(value)
        return self.base.log_prob(x) + ladj

    def _path_log_prob(self, x: Tensor, y: Tensor, log_q: Tensor) -> Tensor:
        r"""``log q(y)`` for the draw ``y = f(x)``, its gradient only the path derivative.

        Where the flow pushes the gradient forward in closed form and the base is normal:
        ``log_q`` (detached) plus :math:`s^\top (y - \bar y)` with :math:`s = \nabla_y \log
        q(y)` held fixed. Otherwise the score-function term is subtracted: ``log_q`` minus
        :math:`\log q_\theta(\bar y) - \mathrm{sg}[\log q_\theta(\bar y)]` at the detached
        draw :math:`\bar y` (one inverse pass, told ``x``), since
        :math:`\tfrac{d}{d\theta} \log q_\theta(y_\theta) = \partial_\theta \log q_\theta(y)
        + \nabla_y \log q_\theta(y)\, \tfrac{dy}{d\theta}`. Neither holds parameters
        fixed, so both work under JIT traces.
        """
        base = self.base
        while isinstance(base, Independent):
            base = base.base_dist
        if isinstance(base, Normal) and self.transform.analytic_grad:
            grad = ((base.loc - x) / base.scale**2).detach()
            _, grad = self.transform.forward_and_grad(x.detach(), grad)
            return log_q.detach() + (grad * (y - y.detach())).sum(-1)
        if torch.jit.is_tracing():  # a trace does not record requires_grad: subtract
            x_fixed, ladj = self.transform.inverse_and_log_det_given(y.detach(), x)
            at_draw = self.base.log_prob(x_fixed) + ladj
            return log_q - (at_draw - at_draw.detach())
        params = [p for p in self.transform.parameters() if p.requires_grad]
        try:
            for p in params:
                p.requires_grad_(False)
            x_held, ladj = self.transform.inverse_and_log_det_given(y, x)
        finally:
            for p in params:
                p.requires_grad_(True)
        return self.base.log_prob(x_held) + ladj
