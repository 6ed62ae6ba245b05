"""Every mode: mixtures of flows trained by the stratified bounds find unequal mode weights;
the importance-weighted bounds are bounds, tighten with more draws, and are exact at q = p."""

from __future__ import annotations

import math

import pyro.distributions as dist
import pytest
import torch

import pyroflows
from pyroflows.inference.bounds import FlowMixture, stratified_bound


def gaussian_mixture(means: torch.Tensor, weights: torch.Tensor, scale: float):
    """The normalised log-density of sum_k w_k N(means_k, scale^2 I)."""
    components = dist.Normal(means, scale).to_event(1)

    def log_p(z: torch.Tensor) -> torch.Tensor:
        return torch.logsumexp(components.log_prob(z.unsqueeze(-2)) + weights.log(), -1)

    return log_p


def mode_shares(draws: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """The share of draws nearest to each mean."""
    nearest = torch.cdist(draws, means).argmin(-1)
    return torch.bincount(nearest, minlength=len(means)).double() / len(draws)


@pytest.mark.parametrize(
    ("dim", "weights"),
    [(2, [0.3, 0.7]), (5, [0.2, 0.3, 0.5])],
    ids=["2-D, two modes", "5-D, three modes"],
)
def test_a_mixture_of_flows_finds_every_mode_and_its_weight(dim, weights):
    torch.manual_seed(0)
    weights = torch.tensor(weights, dtype=torch.float64)
    means = 6.0 * torch.eye(len(weights), dim, dtype=torch.float64) - 2.0
    log_p = gaussian_mixture(means, weights, 0.7)
    q = pyroflows.fit_reverse_kl(
        log_p,
        dim,
        "realnvp",
        layers=2,
        hidden=(16, 16),
        components=len(weights),
        start="pathfinder",
        init_scale=4.0,
        steps=400,
        lr=0.01,
        num_particles=96,
        dtype=torch.float64,
        progress=False,
    )
    assert isinstance(q, FlowMixture)
    shares = mode_shares(q.sample((20_000,)), means)
    assert (shares - weights).abs().max() < 0.05, shares
    # the learned weights themselves, matched to the modes by each component's mean
    own = [mode_shares(c.sample((2000,)), means).argmax() for c in q.components]
    assert sorted(own) == list(range(len(weights)))  # one component per mode
    learned = torch.zeros_like(weights).index_add_(0, torch.stack(own), q.weights.double())
    assert (learned - weights).abs().max() < 0.05, learned


def test_one_flow_with_the_elbo_is_what_it_was():
    q = pyroflows.fit_reverse_kl(
        lambda z: -0.5 * (z**2).sum(-1), 2, "planar", steps=5, progress=False
    )
    assert isinstance(q, pyroflows.FlowDistribution)


def offset_gaussian():
    """q = N(0, I), and p = N(0.5, 1.3^2 I) unnormalised, with its log Z, in 3-D."""
    q_base = dist.Normal(torch.zeros(3, dtype=torch.float64), 1.0).to_event(1)
    q = FlowMixture(
        [pyroflows.FlowDistribution(q_base, pyroflows.build("realnvp", 3).double())],
        torch.zeros(1, dtype=torch.float64),
    )
    log_z = 3 * (0.5 * math.log(2 * math.pi) + math.log(1.3))
    return q, lambda z: -0.5 * (((z - 0.5) / 1.3) ** 2).sum(-1), log_z


def test_importance_weighted_bounds_lie_below_log_z_and_tighten_with_more_draws():
    torch.manual_seed(0)
    q, log_p, log_z = offset_gaussian()
    with torch.no_grad():
        elbo = stratified_bound(q, log_p, 16_384).item()
        iwae = [
            stratified_bound(q, log_p, 16_384, alpha=0.0, importance=t).item()
            for t in (1, 4, 16, 64)
        ]
        renyi = stratified_bound(q, log_p, 16_384, alpha=0.5, importance=16).item()
    kl = 3 * (math.log(1.3) + (1 + 0.25) / (2 * 1.69) - 0.5)  # KL(q || p), closed form
    assert elbo == pytest.approx(log_z - kl, abs=0.02)
    assert iwae[0] == pytest.approx(elbo, abs=0.02)  # one draw: the ELBO
    assert iwae[0] < iwae[1] < iwae[2] < iwae[3] < log_z  # tighter with T, still a bound
    assert elbo < renyi < iwae[2]  # alpha between 0 and 1: between the two


def test_at_q_equal_to_p_every_bound_is_log_z():
    q, _, _ = offset_gaussian()
    exact = q.components[0].base.log_prob
    for alpha, importance in ((1.0, 1), (0.0, 8), (0.5, 4)):
        bound = stratified_bound(q, exact, 64, alpha=alpha, importance=importance)
        assert bound.item() == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"alpha": -1.0}, "alpha must be a finite number >= 0"),
        ({"importance": 3}, "must be a multiple of importance=3"),
        ({"components": 3}, "must be a multiple of importance"),  # 128 // 3 = 42, T = 4
        ({"components": 2, "stl": True}, "stl=True is for one flow and the ELBO"),
        ({"components": 0}, "components must be a positive integer"),
    ],
)
def test_bad_bound_options_are_named(options, message):
    options = {"importance": 4, **options} if options.get("components") == 3 else options
    with pytest.raises(ValueError, match=message):
        pyroflows.fit_reverse_kl(lambda z: -(z**2).sum(-1), 2, progress=False, **options)
