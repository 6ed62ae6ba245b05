r"""The density of whitened rows: a flow over a Gaussian-mixture base, guarded in the tails.

A :class:`FlowDensity` is

.. math::

    q(u) = (1 - w)\, b\big(f^{-1}(u)\big)\, \big|\det J_{f^{-1}}(u)\big|
         + w\, t_3(u),

with :math:`f` a flow, :math:`b` its base (a fitted
:class:`~pyroflows.density.mixture.GaussianMixture`) and :math:`t_3` a multivariate
Student-t with 3 degrees of freedom, location 0 and scale :math:`I` (the rows are
whitened, so that is their own scale). The guard weight :math:`w` (:data:`GUARD`) costs a
row in the bulk at most :math:`-\log(1 - w) \approx w` nats, and bounds every row's score
from below by :math:`\log w + \log t_3(u)`, which falls like :math:`-\tfrac{D+3}{2}\log
\lVert u\rVert^2`: a row far from the training data costs far less than under a
Gaussian (:math:`\tfrac12\lVert u\rVert^2`), whatever the flow does out there. A flow that
starts at the identity starts as the (guarded) mixture.

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
