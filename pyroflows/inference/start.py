r"""A deterministic Gaussian start for a variational posterior, by quasi-Newton optimisation.

:func:`pathfinder` follows the L-BFGS path of :math:`-\log p` from an initial point, in
coordinates whitened by the Hessian there (scipy's L-BFGS-B; torch's
:class:`~torch.optim.LBFGS` stops for good where its direction is not a descent
direction, which on posteriordb's diamonds, far from the mode, left it one step per
restart). At every iterate :math:`x_l` it forms a normal approximation

.. math:: q_l = \mathcal{N}(x_l + \Sigma_l \nabla \log p(x_l),\; \Sigma_l),

with :math:`\Sigma_l` the L-BFGS inverse-Hessian estimate there (the BFGS recursion over
the last ``history`` curvature pairs of the path, from a scaled identity), and at the best
point :math:`x^*` it adds the Laplace approximation
:math:`\mathcal{N}(x^* + H^{-1} \nabla \log p(x^*), H^{-1})` with :math:`H` the exact
negative Hessian (autograd) there, where that is positive definite. Each candidate's ELBO
:math:`\mathbb{E}_{q}[\log p(z) - \log q(z)]` is estimated with the same ``draws`` standard
normal draws (common random numbers), and the candidate with the best ELBO is the start.

On a Gaussian posterior the Laplace candidate is exact. Where the mode is a poor summary
(a funnel's neck, where the density grows without bound) a point part-way along the path
has the better ELBO, which is why Pathfinder chooses along the path rather than at its end.
Unlike Zhang et al., the inverse-Hessian estimate starts from a scaled identity (the
classic L-BFGS choice), not a diagonal one, the path runs in whitened coordinates, the
Laplace approximation is a candidate too, and one path is followed (no multi-path
importance resampling; :func:`~pyroflows.fit_reverse_kl` runs several for a mixture).

References:
    Pathfinder: Parallel quasi-Newton variational inference (Zhang, Carpenter, Gelman &
    Vehtari, 2022) https://arxiv.org/abs/2108.03782

    On the limited memory BFGS method for large scale optimization (Liu & Nocedal, 1989)
    https://doi.org/10.1007/BF01589116
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from pyroflows._checks import check_positive_int

LogDensity = Callable[[Tensor], Tensor]
#: the deterministic starts a variational posterior offers (``None``: the initial point)
STARTS = (None, "pathfinder")


@dataclass
class GaussianStart:
    r"""A normal approximation :math:`\mathcal{N}(\text{loc}, LL^\top)` chosen by
    :func:`pathfinder`: ``loc`` ``(D,)``, ``scale_tril`` :math:`L` ``(D, D)``, its ELBO
    estimate (nats), which candidate it is (``"path"`` at an iterate, ``"laplace"`` at
    the best point), the iterate it came from, and the ELBO at each iterate (``nan``
    where not scored, ``-inf`` where a draw's density was not finite)."""

    loc: Tensor
    scale_tril: Tensor
    elbo: float
    kind: str
    iteration: int
    path_elbos: list[float] = field(default_factory=list)


def pathfinder(
    log_density: LogDensity,
    init: Tensor,
    *,
    max_iter: int = 1000,
    history: int = 6,
    draws: int = 32,
    candidates: int = 50,
    generator: torch.Generator | None = None,
) -> GaussianStart:
    r"""The best-ELBO normal approximation along the L-BFGS path of ``log_density`` (module
    doc), from ``init`` ``(D,)``.

    ``log_density`` maps a batch ``(n, D)`` to ``(n,)`` (unnormalised). L-BFGS runs in
    coordinates whitened by the Hessian at ``init`` (:func:`_whitening`) until it converges,
    the density is not finite at the next point, or ``max_iter`` iterations. ``draws``
    standard normal draws (from ``generator``) estimate the ELBO of the candidates at
    ``candidates`` iterates spread evenly along the path (the first and the last among
    them) and of the Laplace approximation. Runs in ``init``'s dtype and device.

    Raises:
        ValueError: if ``log_density`` or its gradient is not finite at ``init``.

    Example:
        >>> import torch
        >>> cov = torch.tensor([[4.0, 1.9], [1.9, 1.0]], dtype=torch.float64)
        >>> precision = torch.linalg.inv(cov)
        >>> target = lambda z: -0.5 * ((z - 3) @ precision * (z - 3)).sum(-1)
        >>> start = pathfinder(target, torch.zeros(2, dtype=torch.float64))
        >>> start.loc.round(decimals=2).tolist()
        [3.0, 3.0]
        >>> bool(torch.allclose(start.scale_tril @ start.scale_tril.T, cov, atol=1e-2))
        True
    """
    check_positive_int("max_iter", max_iter)
    check_positive_int("history", history)
    check_positive_int("draws", draws)
    check_positive_int("candidates", candidates)
    origin = init.detach().clone().reshape(-1)
    value, grad = _value_and_grad(log_density, origin)
    if not (math.isfinite(value) and bool(torch.isfinite(grad).all())):
        raise ValueError(
            f"the log-density or its gradient is not finite at the initial point "
            f"(log-density {value}); start inside the support"
        )
    whiten = _whitening(log_density, origin)

    def whitened(u: Tensor) -> Tensor:
        return log_density(origin + u @ whiten.T)

    points, grads, values = _lbfgs_path(whitened, origin, max_iter, history)
    noise = torch.randn(draws, len(origin), generator=generator, dtype=torch.float64)
    noise = noise.to(device=origin.device, dtype=origin.dtype)
    found = []  # (elbo, kind, iteration, loc, scale_tril), in x = origin + W u
    path_elbos = [math.nan] * len(points)
    scored = torch.linspace(0, len(points) - 1, min(candidates, len(points))).round().long()
    for i in scored.unique().tolist():
        point, grad = points[i], grads[i]
        cov = _inverse_hessian(points[: i + 1], grads[: i + 1], history)
        factor, info = torch.linalg.cholesky_ex(cov)
        elbo = -math.inf
        if not info:  # N(u + cov g, cov) in u is N(origin + W(u + cov g), W cov W^T) in x
            loc, scale_tril = origin + whiten @ (point + cov @ grad), whiten @ factor
            elbo = _elbo(log_density, loc, scale_tril, noise)
            found.append((elbo, "path", i, loc, scale_tril))
        path_elbos[i] = elbo
    best = max(range(len(values)), key=values.__getitem__)
    laplace = _laplace(whitened, points[best], grads[best])
    if laplace is not None:
        loc, scale_tril = origin + whiten @ laplace[0], whiten @ laplace[1]
        elbo = _elbo(log_density, loc, scale_tril, noise)
        found.append((elbo, "laplace", best, loc, scale_tril))
    finite = [c for c in found if math.isfinite(c[0])]
    if not finite:
        raise ValueError(
            "no normal approximation along the L-BFGS path has a finite ELBO: the "
            "log-density is not finite near its path"
        )
    elbo, kind, iteration, loc, scale_tril = max(finite, key=lambda c: c[0])
    return GaussianStart(loc, scale_tril, elbo, kind, iteration, path_elbos)


def _lbfgs_path(
    log_density: LogDensity, like: Tensor, max_iter: int, history: int
) -> tuple[list[Tensor], list[Tensor], list[float]]:
    """The iterates of L-BFGS (scipy's L-BFGS-B, unbounded) on ``-log_density`` from 0, on
    ``like``'s dtype and device, with the values and gradients of ``log_density`` there,
    up to ``max_iter`` iterations or convergence. Each iterate was evaluated by the line
    search that accepted it, and those evaluations are reused. A point where the density is
    not finite, or where ``log_density`` raises a ``torch.linalg.LinAlgError`` (a
    covariance it cannot factorise), has density 0: the line search backs off from it."""
    import scipy.optimize  # on use: it is slow to import

    evaluated: dict[bytes, tuple[float, Tensor]] = {}

    def objective(u: np.ndarray) -> tuple[float, np.ndarray]:
        point = torch.as_tensor(u, dtype=like.dtype, device=like.device)
        try:
            value, grad = _value_and_grad(log_density, point)
        except torch.linalg.LinAlgError:  # e.g. a covariance the model cannot factorise
            value, grad = -math.inf, torch.zeros_like(point)
        evaluated[u.tobytes()] = value, grad
        if not (math.isfinite(value) and bool(torch.isfinite(grad).all())):
            return math.inf, np.zeros_like(u)
        return -value, -grad.double().cpu().numpy()

    path = [np.zeros(len(like))]
    scipy.optimize.minimize(
        objective,
        path[0],
        jac=True,
        method="L-BFGS-B",
        callback=lambda u: path.append(np.array(u, dtype=np.float64)),
        options={"maxiter": max_iter - 1, "maxcor": history},
    )
    points, grads, values = [], [], []
    for u in path:
        if u.tobytes() not in evaluated:
            objective(u)
        value, grad = evaluated[u.tobytes()]
        if not math.isfinite(value):
            break
        points.append(torch.as_tensor(u, dtype=like.dtype, device=like.device))
        grads.append(grad)
        values.append(value)
    return points, grads, values


def _value_and_grad(log_density: LogDensity, x: Tensor) -> tuple[float, Tensor]:
    """``log_density`` at one point and its gradient (both detached)."""
    with torch.enable_grad():
        leaf = x.detach().clone().requires_grad_()
        value = log_density(leaf.unsqueeze(0))[0]
        grad = None
        if value.requires_grad:  # else it does not depend on the point at all
            (grad,) = torch.autograd.grad(value, leaf, allow_unused=True)
        if grad is None:
            grad = torch.zeros_like(leaf)
    return float(value.detach()), grad.detach()


def _inverse_hessian(points: list[Tensor], grads: list[Tensor], history: int) -> Tensor:
    r"""The BFGS estimate of :math:`(-\nabla^2 \log p)^{-1}` at the last point: the
    recursion :math:`H \leftarrow (I - \rho s y^\top)^\top H (I - \rho y s^\top)
    + \rho s s^\top` over the last ``history`` pairs :math:`s = x_{k+1} - x_k`,
    :math:`y = \nabla \log p(x_k) - \nabla \log p(x_{k+1})` with :math:`s^\top y > 0`,
    from :math:`H_0 = \frac{s^\top y}{y^\top y} I` of the newest pair (the identity on a
    path with no such pair)."""
    dim = len(points[0])
    eye = torch.eye(dim, dtype=points[0].dtype, device=points[0].device)
    pairs = []
    for k in range(len(points) - 1):
        s, y = points[k + 1] - points[k], grads[k] - grads[k + 1]
        if s @ y > 1e-10 * (y @ y):
            pairs.append((s, y))
    pairs = pairs[-history:]
    if not pairs:
        return eye
    s, y = pairs[-1]
    inverse = (s @ y) / (y @ y) * eye
    for s, y in pairs:
        rho = 1 / (s @ y)
        left = eye - rho * torch.outer(s, y)
        inverse = left @ inverse @ left.T + rho * torch.outer(s, s)
    return (inverse + inverse.T) / 2


def _laplace(log_density: LogDensity, point: Tensor, grad: Tensor) -> tuple[Tensor, Tensor] | None:
    r"""The Laplace approximation :math:`\mathcal{N}(x + H^{-1} g, H^{-1})` at ``point``
    :math:`x` (one Newton step on, :math:`g` the gradient, :math:`H` the exact negative
    Hessian): its mean and Cholesky factor, or ``None`` where :math:`H` is not positive
    definite."""
    inverse = _inverse_and_factor(_negative_hessian(log_density, point))
    if inverse is None:
        return None
    cov, scale_tril = inverse
    return point + cov @ grad, scale_tril


def _inverse_and_factor(hessian: Tensor) -> tuple[Tensor, Tensor] | None:
    """:math:`H^{-1}` and its Cholesky factor, or ``None`` where ``hessian`` :math:`H` is
    not finite or not positive definite."""
    if not bool(torch.isfinite(hessian).all()):
        return None
    factor, info = torch.linalg.cholesky_ex(hessian)
    if info:
        return None
    eye = torch.eye(len(hessian), dtype=hessian.dtype, device=hessian.device)
    cov = torch.cholesky_solve(eye, factor)
    cov = (cov + cov.T) / 2
    scale_tril, info = torch.linalg.cholesky_ex(cov)
    return None if info else (cov, scale_tril)


def _negative_hessian(log_density: LogDensity, point: Tensor) -> Tensor:
    """:math:`-\\nabla^2 \\log p` at ``point`` by autograd (one model run, one backward pass
    per coordinate), symmetrised."""

    def negative(z: Tensor) -> Tensor:
        return -log_density(z.unsqueeze(0))[0]

    with torch.enable_grad():
        hessian = torch.autograd.functional.hessian(negative, point.detach())
    return (hessian + hessian.T) / 2


def _whitening(log_density: LogDensity, point: Tensor) -> Tensor:
    r"""A lower-triangular :math:`W` that makes :math:`u \mapsto \log p(x_0 + Wu)` well
    conditioned at :math:`u = 0`: the Cholesky factor of the inverse negative Hessian
    where that is positive definite, else :math:`|H_{ii}|^{-1/2}` on the diagonal (the
    identity where the Hessian is not finite or zero). L-BFGS's first step is a scaled
    gradient step, which a posterior with scales 1e-2 and 1e2 side by side (a regression
    on raw covariates) leaves stuck at its start."""
    hessian = _negative_hessian(log_density, point)
    inverse = _inverse_and_factor(hessian)
    if inverse is not None:
        return inverse[1]
    curvature = hessian.diagonal().abs()
    if not bool(torch.isfinite(hessian).all() and (curvature > 0).any()):
        return torch.eye(len(point), dtype=point.dtype, device=point.device)
    curvature = curvature.clamp_min(1e-12 * curvature.max())
    return torch.diag(curvature.rsqrt())


@torch.no_grad()
def _elbo(log_density: LogDensity, loc: Tensor, scale_tril: Tensor, noise: Tensor) -> float:
    r"""Monte Carlo ELBO of :math:`\mathcal{N}(loc, LL^\top)` with the draws
    :math:`loc + L\varepsilon` of the standard normal ``noise`` (``-inf`` if any draw's
    density is not finite)."""
    z = loc + noise @ scale_tril.T
    log_q = (
        -0.5 * noise.square().sum(-1)
        - scale_tril.diagonal().log().sum()
        - 0.5 * len(loc) * math.log(2 * math.pi)
    )
    values = log_density(z) - log_q
    mean = float(values.mean())
    return mean if math.isfinite(mean) else -math.inf


def distinct_starts(
    log_density: LogDensity, points: Sequence[Tensor], count: int, sds: float = 3.0
) -> list[GaussianStart]:
    """Up to ``count`` :func:`pathfinder` starts at distinct modes, best ELBO first: one
    path from each of ``points``; a start joins unless its mean lies within ``sds``
    standard deviations (Mahalanobis, under either start) of one already chosen. Paths
    that fail are skipped, so the list may be shorter than ``count``; where every one
    fails, the first failure's ``ValueError`` is raised.

    Example:
        >>> import torch
        >>> modes = torch.tensor([[-3.0], [3.0]])
        >>> log_p = lambda z: torch.logsumexp(-0.5 * (z.unsqueeze(-2) - modes).pow(2).sum(-1), -1)
        >>> points = [torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([2.0])]
        >>> sorted(round(float(s.loc)) for s in distinct_starts(log_p, points, 2))
        [-3, 3]
    """
    found, failures = [], []
    for point in points:
        try:
            found.append(pathfinder(log_density, point))
        except ValueError as error:
            failures.append(error)
    if not found:
        raise failures[0]
    chosen: list[GaussianStart] = []
    for candidate in sorted(found, key=lambda s: s.elbo, reverse=True):
        if all(_apart(candidate, other, sds) for other in chosen):
            chosen.append(candidate)
        if len(chosen) == count:
            break
    return chosen


def _apart(first: GaussianStart, second: GaussianStart, sds: float) -> bool:
    """Whether each start's mean lies more than ``sds`` Mahalanobis units from the other's."""
    gap = (first.loc - second.loc).unsqueeze(-1)
    return all(
        torch.linalg.solve_triangular(start.scale_tril, gap, upper=False).norm() > sds
        for start in (first, second)
    )
