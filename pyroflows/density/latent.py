r"""The density of standardised rows: a flow over a Gaussian base, guarded in the tails.

A :class:`FlowDensity` is

.. math::

    q(u) = (1 - w)\, b\big(f^{-1}(u)\big)\, \big|\det J_{f^{-1}}(u)\big|
         + w\, t_3(u),

with :math:`f` a flow, :math:`b` its base (a fitted
:class:`~pyroflows.density.mixture.GaussianMixture`; the estimator's is the Gaussian of the
rows) and :math:`t_3` a multivariate Student-t with 3 degrees of freedom, location 0 and
scale :math:`I` (the rows are standardised, so that is their own scale). The guard weight
:math:`w` (:data:`GUARD`) costs a row in the bulk at most :math:`-\log(1 - w) \approx w`
nats, and bounds every row's score from below by :math:`\log w + \log t_3(u)`, which falls
like :math:`-\tfrac{D+3}{2}\log \lVert u\rVert^2`: a row far from the training data costs
far less than under a Gaussian (:math:`\tfrac12\lVert u\rVert^2`), whatever the flow does
out there. A flow that starts at the identity starts as its (guarded) base.

References:
    Tails of Lipschitz Triangular Flows (Jaini, Kobyzev, Yu & Brubaker, 2020)
    https://arxiv.org/abs/1907.04481 (light-tailed bases cannot give heavy tails)

    Normalizing Flows for Probabilistic Modeling and Inference (Papamakarios, Nalisnick,
    Rezende, Mohamed & Lakshminarayanan, 2021) https://arxiv.org/abs/1912.02762 (mixture
    bases)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from pyroflows.density.mixture import GaussianMixture
from pyroflows.transforms import Flow
from pyroflows.transforms.base import call_with_context

#: weight of the Student-t guard in a :class:`FlowDensity`
GUARD = 1e-3
#: degrees of freedom of the guard
GUARD_DF = 3.0


class FlowDensity(nn.Module):
    r"""The guarded density of a flow over a base (module doc): ``log_prob(u, context)`` and
    ``sample(n, context)``; the flow is the only trained part (the base and the guard are
    fixed).

    Example:
        >>> import pyroflows
        >>> from pyroflows.density.mixture import GaussianMixture
        >>> density = FlowDensity(pyroflows.build("realnvp", 2), GaussianMixture(1, 2))
        >>> u = torch.zeros(1, 2)
        >>> gauss = torch.distributions.MultivariateNormal(torch.zeros(2), torch.eye(2))
        >>> bool(torch.allclose(density.log_prob(u), gauss.log_prob(u), atol=2e-3))
        True
    """

    def __init__(self, flow: Flow, base: GaussianMixture, guard: float = GUARD) -> None:
        super().__init__()
        if not 0 <= guard < 1:
            raise ValueError(f"guard must be a weight in [0, 1), got {guard!r}")
        self.flow = flow
        self.base = base
        self.guard = guard
        self.context_features = flow.context_features

    def log_prob(self, u: Tensor, context: Tensor | None = None) -> Tensor:
        z, log_det = call_with_context(
            self.flow.inverse_and_log_det, u, context, self.context_features
        )
        log_q = self.base.log_prob(z) + log_det
        if self.guard == 0:
            return log_q
        return torch.logaddexp(
            log_q + math.log1p(-self.guard), student_log_prob(u) + math.log(self.guard)
        )

    @torch.no_grad()
    def sample(self, n: int, context: Tensor | None = None) -> Tensor:
        z = self.base.sample(n)
        u = call_with_context(self.flow.forward_and_log_det, z, context, self.context_features)[0]
        if self.guard == 0:
            return u
        tail = torch.rand(n, device=u.device) < self.guard
        return torch.where(tail.unsqueeze(-1), student_sample(n, u.shape[-1], u), u)


def student_log_prob(u: Tensor, df: float = GUARD_DF) -> Tensor:
    r"""Log-density of the multivariate Student-t with ``df`` degrees of freedom, location 0
    and scale :math:`I`:
    :math:`\log\Gamma(\tfrac{\nu+D}{2}) - \log\Gamma(\tfrac{\nu}{2})
    - \tfrac D2\log(\nu\pi) - \tfrac{\nu+D}{2}\log(1 + \lVert u\rVert^2/\nu)`.

    Example:
        >>> round(student_log_prob(torch.zeros(1, 1), df=1.0).item(), 4)  # Cauchy: -log(pi)
        -1.1447
    """
    dim = u.shape[-1]
    constant = math.lgamma((df + dim) / 2) - math.lgamma(df / 2) - dim / 2 * math.log(df * math.pi)
    return constant - (df + dim) / 2 * torch.log1p((u * u).sum(-1) / df)


def student_sample(n: int, dim: int, like: Tensor, df: float = GUARD_DF) -> Tensor:
    """``n`` draws of :func:`student_log_prob`'s Student-t, on ``like``'s device and dtype:
    a standard normal divided by :math:`\\sqrt{\\chi^2_\\nu / \\nu}`."""
    normal = torch.randn(n, dim, device=like.device, dtype=like.dtype)
    chi2 = torch.distributions.Chi2(torch.tensor(df, device=like.device, dtype=like.dtype))
    return normal / (chi2.sample((n, 1)) / df).sqrt()


class Blend(nn.Module):
    r"""The average :math:`q(u) = (1 - a)\, q_1(u) + a\, q_2(u)` of a flow density
    :math:`q_1` (a :class:`FlowDensity`) and a Gaussian mixture :math:`q_2`, with a fixed
    weight :math:`a` (a buffer): ``log_prob(u, context)`` and ``sample(n, context)``.

    Two fitted densities averaged score at least as well as the worse of them on every
    row, and on average often better than the better one: where one is overconfident,
    the other covers. The context (of a conditional flow) goes to :math:`q_1` only:
    :math:`q_2` is the rows' marginal density.

    Example:
        >>> import pyroflows
        >>> flow = FlowDensity(pyroflows.build("realnvp", 2), GaussianMixture(1, 2))
        >>> mixture = GaussianMixture(1, 2)
        >>> blend = Blend(flow, mixture, weight=0.25)
        >>> u = torch.randn(3, 2)
        >>> average = 0.75 * flow.log_prob(u).exp() + 0.25 * mixture.log_prob(u).exp()
        >>> bool(torch.allclose(blend.log_prob(u), average.log()))
        True
    """

    def __init__(self, flow: FlowDensity, mixture: GaussianMixture, weight: float) -> None:
        super().__init__()
        if not 0 <= weight <= 1:
            raise ValueError(f"weight must be in [0, 1], got {weight!r}")
        self.flow = flow
        self.mixture = mixture
        self.register_buffer("weight", torch.tensor(float(weight)))
        self.context_features = flow.context_features

    def log_prob(self, u: Tensor, context: Tensor | None = None) -> Tensor:
        return torch.logaddexp(
            self.flow.log_prob(u, context) + torch.log1p(-self.weight),
            self.mixture.log_prob(u) + self.weight.log(),
        )

    @torch.no_grad()
    def sample(self, n: int, context: Tensor | None = None) -> Tensor:
        first = self.flow.sample(n, context)
        second = self.mixture.sample(n)
        pick = torch.rand(n, device=first.device) < self.weight
        return torch.where(pick.unsqueeze(-1), second, first)


def blend_weight(first: Tensor, second: Tensor, grid: int = 20) -> tuple[float, float]:
    r"""The weight :math:`a \in \{0, \tfrac1{grid}, \dots, 1\}` that maximises the mean of
    :math:`\log((1 - a)\, e^{l_1} + a\, e^{l_2})` over rows with log-densities ``first``
    (:math:`l_1`) and ``second`` (:math:`l_2`), and that mean (ties: the smallest
    :math:`a`).

    Example:
        >>> weight, mean = blend_weight(torch.tensor([0.0, -9.0]), torch.tensor([-9.0, 0.0]), 4)
        >>> weight, round(mean, 3)  # log(1/2 + e^-9 / 2)
        (0.5, -0.693)
    """
    weights = torch.linspace(0, 1, grid + 1, dtype=torch.float64)
    first, second = first.double().unsqueeze(0), second.double().unsqueeze(0)
    inner = weights[1:-1].unsqueeze(-1)
    means = torch.cat(
        [
            first.mean(1),
            torch.logaddexp(first + torch.log1p(-inner), second + inner.log()).mean(1),
            second.mean(1),
        ]
    )
    best = int(torch.argmax(means))
    return float(weights[best]), float(means[best])
