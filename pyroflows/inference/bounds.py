r"""Every mode: a mixture of flows, and the stratified importance-weighted bound that trains it.

A :class:`FlowMixture` is :math:`q(z) = \sum_k \pi_k q_k(z)`, each :math:`q_k` a
:class:`~pyroflows.FlowDistribution` and :math:`\pi = \operatorname{softmax}(\text{logits})`
learned. :func:`stratified_bound` estimates, from :math:`T` draws of *every* component
(stratified: no draw of the component index, so the gradient reaches each component and
each weight without a score-function term), the bound

.. math:: \mathcal{L}_\alpha = \frac{1}{1 - \alpha} \log \sum_k \pi_k \frac1T \sum_t
    w_{kt}^{1-\alpha}, \qquad w_{kt} = \frac{\tilde p(z_{kt})}{q(z_{kt})},
    \quad z_{kt} \sim q_k,

averaged over groups of ``importance`` = :math:`T` draws. :math:`\alpha = 1` (the limit)
is the stratified ELBO :math:`\sum_k \pi_k \frac1T \sum_t \log w_{kt}`; :math:`\alpha = 0`
the stratified importance-weighted bound (SIWAE), which tightens with :math:`T` towards
:math:`\log Z`; in between, the Rényi bounds. Every one is a lower bound on
:math:`\log Z` for :math:`\alpha \ge 0`. With one component it is the ELBO, IWAE or
Rényi bound of a single flow. Each :math:`w_{kt}` divides by the mixture's density, so
each draw costs one inverse pass of every other component.

References:
    Automatic Differentiation Variational Inference with Mixtures (Morningstar, Vikram,
    Ham, Gallagher & Dillon, 2021) https://arxiv.org/abs/2003.01687 (stratified bounds)

    Importance Weighted Autoencoders (Burda, Grosse & Salakhutdinov, 2016)
    https://arxiv.org/abs/1509.00519

    Rényi Divergence Variational Inference (Li & Turner, 2016)
    https://arxiv.org/abs/1602.02311
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import ClassVar

import torch
from pyro.distributions import TorchDistribution
from torch import Tensor, nn
from torch.distributions import constraints

from pyroflows.distributions import FlowDistribution


class FlowMixture(TorchDistribution):
    r""":math:`q(z) = \sum_k \pi_k q_k(z)` over flow distributions ``components`` (same event
    shape) with weights ``softmax(logits)``: ``log_prob`` (one inverse pass per component),
    ``sample``, and :meth:`rsample_stratified` for training. The logits and the components'
    flows are the parameters; :attr:`parameters` lists them all.

    Example:
        >>> import torch, pyro.distributions as dist, pyroflows
        >>> def flow_at(loc):
        ...     base = dist.Normal(torch.full((2,), loc), 1.0).to_event(1)
        ...     return pyroflows.FlowDistribution(base, pyroflows.build("realnvp", 2))
        >>> q = FlowMixture([flow_at(-3.0), flow_at(3.0)], torch.log(torch.tensor([0.25, 0.75])))
        >>> share = (q.sample((4000,))[:, 0] > 0).float().mean()  # of the mode at +3
        >>> bool(abs(share - 0.75) < 0.03)
        True
    """

    arg_constraints: ClassVar[dict[str, constraints.Constraint]] = {}
    support = constraints.real_vector

    def __init__(self, components: Sequence[FlowDistribution], logits: Tensor) -> None:
        if not components:
            raise ValueError("a FlowMixture needs at least one component")
        if logits.shape != (len(components),):
            raise ValueError(
                f"logits must have shape ({len(components)},), got {tuple(logits.shape)}"
            )
        shapes = {c.event_shape for c in components}
        if len(shapes) > 1:
            raise ValueError(f"the components' event shapes differ: {sorted(shapes)}")
        self.components = list(components)
        self.logits = logits
        super().__init__(torch.Size(), components[0].event_shape, validate_args=False)

    @property
    def weights(self) -> Tensor:
        """The mixture weights :math:`\\pi`."""
        return self.logits.softmax(-1)

    @property
    def parameters(self) -> list[Tensor]:
        """The logits, then every component flow's parameters."""
        found = [self.logits]
        for component in self.components:
            found += [p for p in component.transform.parameters() if p.requires_grad]
        return found

    def component_log_probs(self, z: Tensor) -> Tensor:
        r""":math:`\log \pi_k + \log q_k(z)` for every component, stacked last: ``(..., K)``."""
        log_weights = self.logits.log_softmax(-1)
        return torch.stack([c.log_prob(z) for c in self.components], -1) + log_weights

    def log_prob(self, value: Tensor) -> Tensor:
        return torch.logsumexp(self.component_log_probs(value), -1)

    def sample(self, sample_shape: torch.Size = torch.Size()) -> Tensor:
        with torch.no_grad():
            shape = torch.Size(sample_shape)
            picks = torch.multinomial(self.weights, max(1, shape.numel()), replacement=True)
            draws = torch.stack([c.sample(shape) for c in self.components], 0)  # (K, ..., D)
            flat = draws.reshape(len(self.components), -1, *self.event_shape)
            chosen = flat[picks[: shape.numel()], torch.arange(shape.numel())]
            return chosen.reshape(shape + self.event_shape)

    def rsample_component(
        self, k: int, sample_shape: torch.Size = torch.Size()
    ) -> tuple[Tensor, Tensor]:
        r"""Reparametrised draws of component ``k`` and the mixture's log-density
        :math:`\log q(z)` at each: component ``k``'s own density from its forward pass,
        the others' by one inverse pass each."""
        z, own = self.components[k].rsample_and_log_prob(sample_shape)
        terms = [own if j == k else other.log_prob(z) for j, other in enumerate(self.components)]
        return z, torch.logsumexp(torch.stack(terms, -1) + self.logits.log_softmax(-1), -1)

    def rsample_stratified(self, n: int) -> tuple[Tensor, Tensor]:
        r"""``n`` reparametrised draws of every component, ``(K, n, D)``, and the mixture's
        log-density at each, ``(K, n)`` (:meth:`rsample_component`)."""
        draws = [self.rsample_component(k, (n,)) for k in range(len(self.components))]
        z, log_q = zip(*draws, strict=True)
        return torch.stack(z), torch.stack(log_q)


def stratified_bound(
    q: FlowMixture,
    log_density: Callable[[Tensor], Tensor],
    draws: int,
    *,
    alpha: float = 1.0,
    importance: int = 1,
    beta: float = 1.0,
) -> Tensor:
    r"""A Monte Carlo estimate of the stratified Rényi bound :math:`\mathcal{L}_\alpha` (module
    doc) of ``q`` for :math:`\tilde p^\beta` (``beta`` < 1 tempers the target), from ``draws``
    draws per component in groups of ``importance``; differentiable in ``q``'s parameters.

    Example:
        >>> import torch, pyro.distributions as dist, pyroflows
        >>> base = dist.Normal(torch.zeros(2), 1.0).to_event(1)
        >>> q = FlowMixture([pyroflows.FlowDistribution(base, pyroflows.build("realnvp", 2))],
        ...                 torch.zeros(1))
        >>> bound = stratified_bound(q, base.log_prob, 8, alpha=0.0, importance=4)
        >>> round(bound.item(), 5)  # q is the target: every bound is log Z = 0
        0.0
    """
    z, log_q = q.rsample_stratified(draws)  # (K, n, D), (K, n)
    log_w = beta * log_density(z.reshape(-1, z.shape[-1])).reshape(log_q.shape) - log_q
    return stratified_estimate(log_w, q.logits.log_softmax(-1), alpha=alpha, importance=importance)


def stratified_estimate(
    log_w: Tensor, log_weights: Tensor, *, alpha: float = 1.0, importance: int = 1
) -> Tensor:
    r"""The stratified Rényi bound :math:`\mathcal{L}_\alpha` (module doc) from the log
    importance weights ``log_w`` ``(K, n)`` of ``n`` draws of each of ``K`` components, in
    groups of ``importance``, and the log mixture weights :math:`\log \pi` ``(K,)``.

    Example:
        >>> import torch
        >>> log_w = torch.tensor([[0.0, -2.0], [-1.0, -1.0]])
        >>> half = torch.log(torch.tensor([0.5, 0.5]))
        >>> float(stratified_estimate(log_w, half))  # sum_k pi_k mean_t log w_kt
        -1.0
    """
    check_alpha(alpha)
    if importance < 1 or log_w.shape[-1] % importance:
        raise ValueError(
            f"importance must be a positive divisor of the draws per component "
            f"({log_w.shape[-1]}), got {importance!r}"
        )
    log_pi = log_weights.unsqueeze(-1)  # (K, 1)
    if alpha == 1:
        return (log_pi.exp() * log_w).sum(0).mean()
    groups = log_w.reshape(len(log_w), -1, importance)  # (K, G, T)
    inner = torch.logsumexp((1 - alpha) * groups, -1) - math.log(importance)  # (K, G)
    return (torch.logsumexp(inner + log_pi, 0) / (1 - alpha)).mean()


def check_alpha(alpha: float) -> float:
    """``alpha`` if it is a finite number >= 0 (a Rényi order with a lower bound), else
    raise naming it."""
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha >= 0):
        raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")
    return float(alpha)


def mixture_logits(components: int, like: Tensor) -> nn.Parameter:
    """Uniform mixture logits, a parameter on ``like``'s device and dtype."""
    return nn.Parameter(torch.zeros(components, device=like.device, dtype=like.dtype))
