"""``temper(beta)``: the likelihood raised to ``beta``, checked on a conjugate model whose
tempered posterior is known in closed form."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO

import pyroflows


def conjugate(device: torch.device):
    r""":math:`\mu \sim \mathcal{N}(0, 1)`, ten :math:`y_i \sim \mathcal{N}(\mu, 1)`, a
    factor of :math:`-\mu^2 / 2` (a second likelihood term), and the tempered posterior's
    mean and sd: precision :math:`1 + \beta (n + 1)`, mean :math:`\beta \sum y` over it."""
    y = torch.linspace(0.5, 2.5, 10, device=device)

    def model():
        mu = pyro.sample("mu", dist.Normal(torch.zeros((), device=device), 1.0))
        pyro.factor("extra", -0.5 * mu**2)
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    def posterior(beta: float) -> tuple[float, float]:
        precision = 1 + beta * (len(y) + 1)
        return beta * float(y.sum()) / precision, precision**-0.5

    return model, y, posterior


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_the_tempered_density_is_the_prior_times_the_likelihood_to_the_beta(beta, device):
    model, y, _ = conjugate(device)
    mu = torch.tensor(0.7, device=device)
    fixed = poutine.trace(lambda: pyro.sample("mu", dist.Delta(mu))).get_trace()
    with pyroflows.temper(beta):
        got = poutine.trace(poutine.replay(model, trace=fixed)).get_trace().log_prob_sum()
    prior = dist.Normal(0.0, 1.0).log_prob(mu.cpu())
    likelihood = dist.Normal(mu.cpu(), 1.0).log_prob(y.cpu()).sum() - 0.5 * mu.cpu() ** 2
    torch.testing.assert_close(got.cpu(), prior + beta * likelihood)


def test_a_guide_trained_under_temper_fits_the_tempered_posterior(device):
    model, _, posterior = conjugate(device)
    beta = 0.25
    guide = pyroflows.AutoFlow(model, "realnvp", layers=2)
    svi = SVI(model, guide, pyroflows.decaying_adam(600, lr=1e-2), Trace_ELBO(4))
    for _ in range(600):
        with pyroflows.temper(beta):
            svi.step()
    draws = guide.get_posterior().sample((20_000,))
    mean, sd = posterior(beta)
    assert abs(float(draws.mean()) - mean) < 0.05 * sd
    assert abs(float(draws.std()) / sd - 1) < 0.05
    _, untempered_sd = posterior(1.0)
    assert sd / untempered_sd > 1.5  # the sd check tells the two posteriors apart


@pytest.mark.parametrize("beta", [-0.1, 1.5, math.nan])
def test_beta_outside_zero_one_is_refused(beta):
    with pytest.raises(ValueError, match="beta must lie in"):
        pyroflows.temper(beta)
