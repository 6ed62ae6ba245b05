"""Importance-weight diagnostics and arviz export."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.optim import Adam

from pyroflows import AutoFlow, diagnostics


def test_weights_of_the_exact_posterior():
    q = dist.Normal(torch.zeros(3, dtype=torch.float64), 2.0).to_event(1)
    shift = 1.7  # an unnormalised target: log p = log q + shift, so log Z = shift
    result = diagnostics.diagnose(q, lambda z: q.log_prob(z) + shift, num_samples=500)
    assert result.k_hat == -math.inf and result.verdict == "good"
    assert result.ess == pytest.approx(500)
    assert result.elbo == pytest.approx(shift) and result.iw_elbo == pytest.approx(shift)


@pytest.mark.parametrize(("k", "verdict"), [(0.2, "good"), (0.95, "unreliable")])
def test_k_hat_recovers_a_known_pareto_tail(k, verdict):
    # z ~ q = N(0, 1) and p(z) = q(z) Phi(z)^(-k), a proper density for k < 1: the weights
    # w = Phi(z)^(-k) = U^(-k) have a Pareto tail of shape exactly k.
    q = dist.Normal(torch.zeros(1, dtype=torch.float64), 1.0).to_event(1)
    normal = torch.distributions.Normal(0.0, 1.0)
    result = diagnostics.diagnose(
        q, lambda z: q.log_prob(z) - k * normal.cdf(z[..., 0]).log(), num_samples=4000
    )
    assert abs(result.k_hat - k) < 0.15 and result.verdict == verdict
    assert result.ess < 4000 and result.iw_elbo >= result.elbo


def test_non_finite_weights_are_refused():
    q = dist.Normal(torch.zeros(1), 1.0).to_event(1)
    with pytest.raises(ValueError, match="q puts mass where p is 0"):
        diagnostics.diagnose(q, lambda z: torch.where(z[:, 0] > 0, 0.0, -math.inf))


def conjugate_model(y):
    def model():
        mu = pyro.sample("mu", dist.Normal(torch.zeros((), dtype=y.dtype, device=y.device), 10.0))
        pyro.deterministic("mu_squared", mu**2)
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    return model


def test_a_trained_guide_is_good_and_bounds_the_exact_evidence(device):
    y = torch.tensor([1.2, 0.7, 2.1, 1.5, 0.9, 1.8], device=device, dtype=torch.float64)
    model = conjugate_model(y)
    guide = AutoFlow(model, "planar")
    svi = SVI(
        model, guide, Adam({"lr": 0.02}), Trace_ELBO(num_particles=32, vectorize_particles=True)
    )
    for _ in range(800):
        svi.step()
    # y ~ N(0, I + 100 11^T) marginally
    cov = torch.eye(6, dtype=torch.float64, device=device) + 100.0
    log_evidence = dist.MultivariateNormal(torch.zeros_like(y), cov).log_prob(y).item()
    result = diagnostics.diagnose(guide, model, num_samples=1000)
    assert result.verdict == "good", result
    assert result.elbo <= log_evidence + 0.01
    assert abs(result.iw_elbo - log_evidence) < 0.02


def test_inference_data_holds_every_site_by_name_and_shape(device):
    import arviz as az

    y = torch.tensor([0.3, -0.2, 0.8], device=device, dtype=torch.float64)

    def model():
        zero = torch.zeros((), dtype=torch.float64, device=device)
        scale = pyro.sample("scale", dist.LogNormal(zero, 1.0))
        weights = pyro.sample(
            "weights", dist.Dirichlet(torch.ones(3, dtype=torch.float64, device=device))
        )
        pyro.deterministic("spread", scale * weights)
        with pyro.plate("data", 3):
            pyro.sample("y", dist.Normal(zero, scale), obs=y)

    guide = AutoFlow(model, "realnvp")
    data = diagnostics.to_inference_data(guide, model, num_samples=40)
    assert data.posterior["scale"].shape == (1, 40)
    assert data.posterior["weights"].shape == (1, 40, 3)
    assert data.posterior["spread"].shape == (1, 40, 3)
    assert "y" not in data.posterior
    assert data.sample_stats["log_importance_weight"].shape == (1, 40)
    assert (data.posterior["scale"] > 0).all()
    summary = az.summary(data, var_names=["scale", "weights"], kind="stats")
    assert list(summary.index) == ["scale", "weights[0]", "weights[1]", "weights[2]"]
