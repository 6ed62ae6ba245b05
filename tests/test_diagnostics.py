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


def test_importance_resampling_moves_a_biased_guess_to_the_posterior():
    # q: too narrow and off-centre; p: N(0, 1) per coordinate. k-hat is moderate, and the
    # PSIS mean and the resampled spread must land near p's, far nearer than q's own.
    q = dist.Normal(torch.full((3,), 0.4), 0.8).to_event(1)
    p = dist.Normal(torch.zeros(3), 1.0).to_event(1)
    torch.manual_seed(0)
    fixed = diagnostics.importance_resample(q, p.log_prob, num_samples=20_000)
    assert fixed.k_hat < 0.7
    assert fixed.mean()["z"].abs().max() < 0.1  # q's mean is 0.4 off (k-hat 0.4 to 0.6)
    spread = fixed.draws["z"].std(0)
    assert (spread - 1).abs().max() < 0.1  # q's spread is 0.8 (PSIS trims the far tail)
    assert fixed.weights.sum().item() == pytest.approx(1.0)
    assert fixed.draws["z"].shape == (20_000, 3)


def test_importance_resampling_of_a_guide_keeps_every_site(device):
    def model():
        loc = pyro.sample("loc", dist.Normal(torch.zeros((), device=device), 1.0))
        pyro.deterministic("twice", 2 * loc)
        pyro.sample("obs", dist.Normal(loc, 0.5), obs=torch.tensor(1.0, device=device))

    guide = AutoFlow(model, "planar", start=None, init_scale=1.0)
    fixed = diagnostics.importance_resample(guide, model, num_samples=4000, resamples=500)
    assert set(fixed.draws) == {"loc", "twice"} and fixed.draws["loc"].shape == (500,)
    torch.testing.assert_close(fixed.draws["twice"], 2 * fixed.draws["loc"])
    # the exact posterior of loc is N(0.8, 0.2): the untrained guide is N(0, 1)
    assert fixed.mean()["loc"].item() == pytest.approx(0.8, abs=0.05)


def test_equal_weights_have_no_tail_and_change_nothing():
    q = dist.Normal(torch.zeros(2), 1.0).to_event(1)
    fixed = diagnostics.importance_resample(q, q.log_prob, num_samples=100)
    assert fixed.k_hat == -math.inf
    torch.testing.assert_close(fixed.weights, torch.full((100,), 0.01, dtype=torch.float64))
