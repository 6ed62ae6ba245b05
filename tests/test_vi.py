"""Reverse-KL fitting of unnormalised log-densities, and the test energies."""

from __future__ import annotations

import math

import pyro.distributions as dist
import pytest
import torch

import pyroflows
from pyroflows.inference.targets import (
    ENERGIES,
    energy_log_density,
    grid_log_normalizer,
    reverse_kl,
)

FLOWS = pyroflows.list_flows()


def correlated_gaussian(device):
    cov = torch.tensor([[1.0, 0.9], [0.9, 1.0]], device=device, dtype=torch.float64)
    return dist.MultivariateNormal(
        torch.tensor([1.0, -2.0], device=device, dtype=torch.float64), cov
    )


def fit(target, device, flow, **options):
    """fit_reverse_kl in float64 on the test device, without a progress bar."""
    return pyroflows.fit_reverse_kl(
        target.log_prob, 2, flow, device=device, dtype=torch.float64, progress=False, **options
    )


@pytest.mark.parametrize("name", FLOWS)
def test_every_family_lowers_the_kl_to_a_known_gaussian(name, device):
    target = correlated_gaussian(device)
    log_z = 0.0  # target.log_prob is normalised
    start = fit(target, device, name, steps=1, lr=1e-9)
    fitted = fit(target, device, name, steps=300, lr=0.02)
    kl_start = reverse_kl(start, target.log_prob, log_z, 20_000)
    kl_end = reverse_kl(fitted, target.log_prob, log_z, 20_000)
    assert kl_end < 0.5 * kl_start
    assert fitted.sample((3,)).device.type == device.type


def test_realnvp_fits_a_correlated_gaussian_closely(device):
    target = correlated_gaussian(device)
    q = fit(target, device, "realnvp", steps=800, lr=0.01)
    assert reverse_kl(q, target.log_prob, 0.0, 50_000) < 0.02
    samples = q.sample((50_000,))
    torch.testing.assert_close(samples.mean(0), target.mean, atol=0.03, rtol=0)
    torch.testing.assert_close(torch.cov(samples.T), target.covariance_matrix, atol=0.05, rtol=0)


@pytest.mark.parametrize("stl", [False, True], ids=["elbo", "stl"])
def test_stl_and_plain_gradients_both_fit(stl, device):
    target = correlated_gaussian(device)
    q = fit(target, device, "planar", steps=600, lr=0.02, stl=stl)
    assert reverse_kl(q, target.log_prob, 0.0, 50_000) < 0.05


@pytest.mark.parametrize("name", ["realnvp", "planar"])
def test_stl_gradient_vanishes_at_the_optimum_where_the_plain_one_does_not(name, device):
    # q = p exactly: the path derivative is zero for every draw (Roeder et al. 2017), the
    # plain reparametrised gradient is zero only in expectation.
    flow = pyroflows.build(name, 2).to(device=device, dtype=torch.float64)
    zeros = torch.zeros(2, device=device, dtype=torch.float64)
    base = dist.Normal(zeros, 1.0).to_event(1)
    params = [p for p in flow.parameters() if p.requires_grad]
    gradients = {}
    for stl in (False, True):
        q = pyroflows.FlowDistribution(base, flow, stl=stl)
        z, log_q = q.rsample_and_log_prob((64,))
        torch.testing.assert_close(log_q, base.log_prob(z))  # the value is the same
        loss = (log_q - base.log_prob(z)).mean()
        gradients[stl] = torch.autograd.grad(loss, params, allow_unused=True)
    plain, path = gradients[False], gradients[True]
    assert max(g.abs().max().item() for g in path if g is not None) < 1e-12
    assert max(g.abs().max().item() for g in plain if g is not None) > 1e-3


def test_annealing_runs_and_fits(device):
    target = correlated_gaussian(device)
    q = fit(target, device, "realnvp", steps=500, anneal=200, lr=0.01)
    assert reverse_kl(q, target.log_prob, 0.0, 20_000) < 0.1


def test_init_loc_sets_device_dtype_and_start(device):
    loc = torch.tensor([5.0, -5.0], device=device, dtype=torch.float64)
    target = dist.Normal(loc, 1.0).to_event(1)
    q = fit(target, device, "planar", steps=1, lr=1e-9, init_loc=loc, init_scale=0.5)
    samples = q.sample((20_000,))
    assert samples.dtype == torch.float64 and samples.device.type == device.type
    torch.testing.assert_close(samples.mean(0), loc, atol=0.02, rtol=0)
    torch.testing.assert_close(samples.std(0), torch.full_like(loc, 0.5), atol=0.02, rtol=0)


@pytest.mark.parametrize(
    ("log_density", "kwargs", "error", "message"),
    [
        (lambda z: z.sum(), {}, ValueError, r"map a batch of shape \(n, 2\) to shape \(n,\)"),
        (lambda z: z, {}, ValueError, r"it returned \(2, 2\)"),
        (lambda z: z.sum(-1) * math.nan, {}, ValueError, "log_density is nan at the initial"),
        (lambda z: -z.sum(-1).log(), {}, ValueError, "must be finite there"),
        ("not callable", {}, TypeError, "log_density must be callable"),
        (lambda z: -z.sum(-1), {"init_loc": torch.zeros(3)}, ValueError, r"shape \(2,\)"),
        (lambda z: -z.sum(-1), {"steps": 0}, ValueError, "steps must be a positive integer"),
        (lambda z: -z.sum(-1), {"anneal": -1}, ValueError, "anneal must be a non-negative"),
        (lambda z: -z.sum(-1), {"hidden": 3}, TypeError, "hidden must be a sequence"),
        (lambda z: -z.sum(-1), {"flow": "nvp"}, ValueError, "unknown flow family 'nvp'"),
    ],
)
def test_bad_input_names_the_problem(log_density, kwargs, error, message):
    with pytest.raises(error, match=message):
        pyroflows.fit_reverse_kl(log_density, 2, progress=False, **kwargs)


def test_a_log_density_that_goes_infinite_stops_training_with_a_clear_error():
    def half_plane(z):  # -inf where z_0 < 0: a constrained target in raw coordinates
        return torch.where(z[:, 0] > 0, -0.5 * (z**2).sum(-1), -math.inf)

    with pytest.raises(FloatingPointError, match="not finite by step 49: log_density is not"):
        pyroflows.fit_reverse_kl(half_plane, 2, init_loc=torch.ones(2), progress=False)


@pytest.mark.parametrize("name", sorted(ENERGIES))
def test_energies_are_normalisable_and_the_grid_is_fine_enough(name):
    log_p = energy_log_density(name)
    coarse = grid_log_normalizer(log_p, bound=6.0, points=801)
    fine = grid_log_normalizer(log_p, bound=8.0, points=1601)
    assert math.isfinite(fine) and abs(fine - coarse) < 1e-3


def test_grid_normaliser_of_a_gaussian_is_exact():
    scale = torch.tensor([0.7, 1.3], dtype=torch.float64)
    log_p = dist.Normal(torch.zeros(2, dtype=torch.float64), scale).to_event(1).log_prob
    assert abs(grid_log_normalizer(log_p, bound=10.0, points=2001)) < 1e-8


def test_planar_fits_the_first_energy():
    log_p = energy_log_density("U1")
    q = pyroflows.fit_reverse_kl(log_p, 2, "planar", layers=8, steps=600, lr=0.01, progress=False)
    assert reverse_kl(q, log_p, grid_log_normalizer(log_p), 50_000) < 0.1
