r"""Test densities with known normalisers, for checking variational approximations.

The four two-dimensional energies :math:`U_1, \dots, U_4` of Rezende & Mohamed (2015,
Table 1) define :math:`p(z) \propto e^{-U(z)}`. :math:`U_2, U_3, U_4` do not depend on
:math:`z_1` except through periodic terms, so they are not normalisable on the plane; as in
the paper's figures, which show :math:`[-4, 4]^2`, each target here adds a soft wall
:math:`\tfrac12 (\max(|z_1| - 4, 0) / 0.2)^2` (the same for all four, negligible for
:math:`U_1`). :func:`grid_log_normalizer` then gives :math:`\log Z` by quadrature, so that
:math:`\mathrm{KL}(q \,\|\, p)` is computable exactly up to Monte Carlo error in the
expectation over :math:`q` (:func:`reverse_kl`).

References:
    Variational Inference with Normalizing Flows (Rezende & Mohamed, 2015)
    https://arxiv.org/abs/1505.05770
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from pyroflows.distributions import FlowDistribution


def _w1(z: Tensor) -> Tensor:
    return torch.sin(2 * math.pi * z[..., 0] / 4)


def _w2(z: Tensor) -> Tensor:
    return 3 * torch.exp(-0.5 * ((z[..., 0] - 1) / 0.6) ** 2)


def _w3(z: Tensor) -> Tensor:
    return 3 * torch.sigmoid((z[..., 0] - 1) / 0.3)


def u1(z: Tensor) -> Tensor:
    """A ring with two modes along :math:`z_1`."""
    ring = 0.5 * ((torch.linalg.vector_norm(z, dim=-1) - 2) / 0.4) ** 2
    modes = torch.logaddexp(
        -0.5 * ((z[..., 0] - 2) / 0.6) ** 2, -0.5 * ((z[..., 0] + 2) / 0.6) ** 2
    )
    return ring - modes


def u2(z: Tensor) -> Tensor:
    """A sine wave."""
    return 0.5 * ((z[..., 1] - _w1(z)) / 0.4) ** 2


def u3(z: Tensor) -> Tensor:
    """A sine wave that splits in two."""
    return -torch.logaddexp(
        -0.5 * ((z[..., 1] - _w1(z)) / 0.35) ** 2,
        -0.5 * ((z[..., 1] - _w1(z) + _w2(z)) / 0.35) ** 2,
    )


def u4(z: Tensor) -> Tensor:
    """A sine wave with a step."""
    return -torch.logaddexp(
        -0.5 * ((z[..., 1] - _w1(z)) / 0.4) ** 2,
        -0.5 * ((z[..., 1] - _w1(z) + _w3(z)) / 0.35) ** 2,
    )


ENERGIES: dict[str, Callable[[Tensor], Tensor]] = {"U1": u1, "U2": u2, "U3": u3, "U4": u4}


def energy_log_density(name: str) -> Callable[[Tensor], Tensor]:
    r"""The unnormalised log-density :math:`-U(z) - \text{wall}(z)` of energy ``name``.

    Example:
        >>> import torch
        >>> log_p = energy_log_density("U1")
        >>> log_p(torch.tensor([[2.0, 0.0], [0.0, 0.0]])).shape
        torch.Size([2])
    """
    if name not in ENERGIES:
        raise ValueError(f"unknown energy {name!r}; choose from {', '.join(ENERGIES)}")
    energy = ENERGIES[name]

    def log_density(z: Tensor) -> Tensor:
        wall = 0.5 * (torch.relu(z[..., 0].abs() - 4) / 0.2) ** 2
        return -energy(z) - wall

    return log_density


def grid_log_normalizer(
    log_density: Callable[[Tensor], Tensor],
    bound: float = 6.0,
    points: int = 1201,
    dtype: torch.dtype = torch.float64,
) -> float:
    r""":math:`\log \int e^{\log \tilde p(z)} dz` over :math:`[-b, b]^2` by the trapezoidal rule.

    Example:
        >>> log_p = lambda z: -0.5 * (z**2).sum(-1)
        >>> round(grid_log_normalizer(log_p), 6) == round(math.log(2 * math.pi), 6)
        True
    """
    axis = torch.linspace(-bound, bound, points, dtype=dtype)
    step = axis[1] - axis[0]
    weights = torch.full((points,), 1.0, dtype=dtype)
    weights[0] = weights[-1] = 0.5
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), dim=-1)
    log_w = (weights[:, None] * weights[None, :]).log() + 2 * step.log()
    return torch.logsumexp((log_density(grid) + log_w).flatten(), 0).item()


@torch.no_grad()
def reverse_kl(
    q: FlowDistribution,
    log_density: Callable[[Tensor], Tensor],
    log_normalizer: float,
    num_samples: int = 100_000,
) -> float:
    r""":math:`\mathrm{KL}(q \,\|\, p) = \mathbb{E}_q[\log q(z) - \log \tilde p(z)] + \log Z`,
    the expectation by Monte Carlo over ``num_samples`` draws of ``q``.

    Example:
        >>> import torch, pyro.distributions as dist, pyroflows
        >>> base = dist.Normal(torch.zeros(2), torch.ones(2)).to_event(1)
        >>> q = pyroflows.FlowDistribution(base, pyroflows.build("planar", 2))
        >>> log_p = lambda z: -0.5 * (z**2).sum(-1)
        >>> abs(reverse_kl(q, log_p, math.log(2 * math.pi))) < 1e-5
        True
    """
    z, log_q = q.rsample_and_log_prob((num_samples,))
    return (log_q - log_density(z)).mean().item() + log_normalizer
