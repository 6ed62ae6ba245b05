r"""FlowDistribution: a base distribution pushed through a flow, one pass per density."""

from __future__ import annotations

from typing import ClassVar

import torch
from pyro.distributions import TorchDistribution
from torch import Tensor, nn
from torch.distributions import Distribution, Independent, Normal, constraints

from pyroflows.transforms.base import Conditioned, Flow
from pyroflows.transforms.packed import Packed


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

    Inside Pyro, a guide site draws with :meth:`rsample` and the ELBO then asks for
    :meth:`log_prob` of that very draw. So that this too costs one forward pass, the last
    :meth:`rsample` keeps its draw with its log-density, and :meth:`log_prob` of *that same
    tensor* returns it, but only while the version counter of every parameter and buffer of
    the flow is unchanged: an optimiser step, ``load_state_dict`` or any in-place change
    invalidates it, so it is never stale (Pyro's transforms match on tensor identity alone).
    The remembered log-density is a function of the base draw, not of the tensor passed in:
    differentiate it with respect to parameters, not with respect to the value.

    With ``stl=True`` the log-density of a draw is computed with the flow's parameters held
    fixed, so that its gradient reaches the parameters (and a context) only through the
    draw: the path-derivative ("sticking the landing") estimator of Roeder et al. (2017).
    Its value is unchanged; the score term it drops has expectation zero, and what remains
    of the reverse-KL gradient is exactly zero for every draw when the flow equals the
    target. (It is unbiased for the ELBO, not for importance-weighted bounds such as
    Renyi's.) The base distribution is then taken to have no learnable parameters. For a
    flow that pushes scores forward in closed form (``analytic_score``: planar stacks, and
    the guides' affine part) and a normal base, the held-fixed log-density is the draw
    times :math:`\nabla_y \log q(y)`, computed alongside the draw without autograd
    (:meth:`~pyroflows.transforms.Flow.forward_and_score`), and costs little; for other
    flows it is one extra inverse pass, told the base draw
    (:meth:`~pyroflows.transforms.Flow.inverse_and_log_det_given`, so that Sylvester
    layers take one Newton step each instead of a root search).

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
        self._last_draw = (y, log_q, self._versions())
        return y, log_q

    def log_prob(self, value: Tensor) -> Tensor:
        last = getattr(self, "_last_draw", None)
        if last is not None and value is last[0] and last[2] == self._versions():
            return last[1]
        if self._validate_args:
            self._validate_sample(value)
        x, ladj = self.transform.inverse_and_log_det(value)
        return self.base.log_prob(x) + ladj

    def _path_log_prob(self, x: Tensor, y: Tensor, log_q: Tensor) -> Tensor:
        r"""``log q(y)`` for the draw ``y = f(x)``, differentiable only through ``y``.

        Where the flow pushes scores forward in closed form and the base is normal, this is
        ``log_q`` plus :math:`s^\top (y - \bar y)`, zero in value, with :math:`s = \nabla_y
        \log q(y)` held fixed; else an inverse pass with the parameters held fixed.
        """
        score = _normal_score(self.base, x)
        if score is None or not self.transform.analytic_score:
            return self._fixed_log_prob(y, x)
        _, score = self.transform.forward_and_score(x.detach(), score)
        return log_q.detach() + (score * (y - y.detach())).sum(-1)

    def _fixed_log_prob(self, y: Tensor, x: Tensor) -> Tensor:
        """``log q(y)`` by an inverse pass with the flow's parameters detached, for the
        draw ``y = f(x)`` (so that numerical inverses need no root search)."""
        transform = self.transform
        packs = [m for m in transform.modules() if isinstance(m, Packed)]
        if len(list(transform.parameters())) > len(packs):  # some not packed: one flat each
            return _FixedParameters(self).log_prob(y, x)
        held = [pack.held for pack in packs]
        for pack in packs:  # works under JIT too
            pack.held = True
        try:
            x, ladj = transform.inverse_and_log_det_given(y, x)
        finally:
            for pack, was in zip(packs, held, strict=True):
                pack.held = was
        return self.base.log_prob(x) + ladj

    def _versions(self) -> tuple[int, ...]:
        tensors = [*self.transform.parameters(), *self.transform.buffers()]
        return tuple(t._version for t in tensors)


def _normal_score(base: Distribution, x: Tensor) -> Tensor | None:
    r""":math:`\nabla \log p_0(x)` for a normal base distribution, else ``None``."""
    while isinstance(base, Independent):
        base = base.base_dist
    if not isinstance(base, Normal):
        return None
    return ((base.loc - x) / base.scale**2).detach()


class _FixedParameters(nn.Module):
    """``y -> log q(y)`` by one inverse pass, with the flow's parameters detached."""

    def __init__(self, q: FlowDistribution) -> None:
        super().__init__()
        self.transform = q.transform
        self.base = q.base

    def forward(self, y: Tensor, x: Tensor) -> Tensor:
        x, ladj = self.transform.inverse_and_log_det_given(y, x)
        return self.base.log_prob(x) + ladj

    def log_prob(self, y: Tensor, x: Tensor) -> Tensor:
        fixed = {name: p.detach() for name, p in self.named_parameters()}
        return torch.func.functional_call(self, fixed, (y, x))
