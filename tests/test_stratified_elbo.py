"""Every mode for Pyro models: AutoFlow(components=K) trained by StratifiedELBO finds unequal
mode weights; the bounds are exact where the guide is the posterior and agree with Pyro's
own RenyiELBO; misuse is refused by name."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Predictive, RenyiELBO, Trace_ELBO
from pyro.infer.autoguide import AutoDiscreteParallel
from test_bounds import mode_shares  # the tests' folder is on the path (pytest's rootdir)

import pyroflows
from pyroflows import AutoFlow, StratifiedELBO


def mixture_model(dim: int, weights: torch.Tensor, device: torch.device):
    """z ~ N(0, 5^2 I) times sum_k w_k N(m_k, 0.7^2 I), the means 6 e_k - 2 all of one norm,
    so the isotropic prior leaves the posterior's mode weights at ``weights``."""
    means = (6.0 * torch.eye(len(weights), dim, dtype=torch.float64) - 2.0).to(device)
    modes = dist.MixtureSameFamily(
        dist.Categorical(weights.to(device)), dist.Normal(means, 0.7).to_event(1)
    )
    zero = torch.zeros(dim, dtype=torch.float64, device=device)

    def model():
        z = pyro.sample("z", dist.Normal(zero, 5.0).to_event(1))
        pyro.factor("modes", modes.log_prob(z))

    return model, means


@pytest.mark.parametrize(
    ("dim", "weights"),
    [(2, [0.3, 0.7]), (5, [0.2, 0.3, 0.5])],
    ids=["2-D, two modes", "5-D, three modes"],
)
def test_a_mixture_guide_finds_every_mode_and_its_weight(dim, weights, device):
    weights = torch.tensor(weights, dtype=torch.float64)
    model, means = mixture_model(dim, weights, device)
    guide = AutoFlow(model, "realnvp", components=len(weights), layers=2, hidden=(16, 16))
    elbo = StratifiedELBO(num_particles=32, vectorize_particles=True)
    svi = SVI(model, guide, pyroflows.decaying_adam(200, lr=0.02), elbo)
    for _ in range(200):
        svi.step()
    draws = Predictive(model, guide=guide, num_samples=4000, parallel=True)()["z"]
    shares = mode_shares(draws.reshape(-1, dim), means).cpu()
    assert (shares - weights).abs().max() < 0.05, shares
    with torch.no_grad():  # the learned weights, matched to the modes by each component
        own = [
            mode_shares(guide.transforms[k](torch.zeros(1, dim).to(means)), means).argmax()
            for k in range(len(weights))
        ]
    assert sorted(int(k) for k in own) == list(range(len(weights)))  # one component per mode
    learned = torch.zeros_like(weights).index_add_(0, torch.stack(own).cpu(), guide.weights.cpu())
    assert (learned - weights).abs().max() < 0.05, learned


def conjugate_model(device):
    """y_i ~ N(mu, 1), mu ~ N(0, 2^2): the posterior is Gaussian and the evidence known."""
    y = torch.tensor([0.3, 1.1, 2.0, 0.7], dtype=torch.float64, device=device)

    def model():
        mu = pyro.sample("mu", dist.Normal(torch.zeros((), dtype=y.dtype, device=device), 2.0))
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    covariance = torch.eye(len(y), dtype=y.dtype, device=device) + 4.0
    evidence = dist.MultivariateNormal(torch.zeros_like(y), covariance).log_prob(y)
    return model, float(evidence)


@pytest.mark.parametrize("vectorize", [True, False], ids=["vectorised", "one run per draw"])
@pytest.mark.parametrize(
    ("alpha", "importance"), [(1.0, 1), (0.0, 4), (0.5, 8)], ids=["ELBO", "IWAE", "Renyi"]
)
def test_every_bound_is_the_evidence_where_the_guide_is_the_posterior(
    alpha, importance, vectorize, device
):
    model, log_evidence = conjugate_model(device)
    guide = AutoFlow(model, "planar")  # the pathfinder start (Laplace) is the exact posterior
    elbo = StratifiedELBO(
        num_particles=8, alpha=alpha, importance=importance, vectorize_particles=vectorize
    )
    assert elbo.loss(model, guide) == pytest.approx(-log_evidence, abs=1e-8)


def test_with_one_flow_it_is_pyros_renyi_bound_draw_for_draw():
    model, _ = conjugate_model(torch.device("cpu"))
    guide = AutoFlow(model, "realnvp", start=None, init_scale=0.5)
    guide()  # set up (its initial point is drawn from the prior) before either bound draws
    ours, pyros = (
        StratifiedELBO(num_particles=16, alpha=0.3, importance=16, vectorize_particles=True),
        RenyiELBO(alpha=0.3, num_particles=16, vectorize_particles=True),
    )
    values = []
    for elbo in (ours, pyros):
        pyro.set_rng_seed(3)
        values.append(elbo.loss(model, guide))
    assert values[0] == pytest.approx(values[1], rel=1e-10)
    assert values[0] > -conjugate_model(torch.device("cpu"))[1]  # a bound, and not tight here


def test_importance_draws_tighten_the_bound_towards_the_evidence():
    model, log_evidence = conjugate_model(torch.device("cpu"))
    guide = AutoFlow(model, "realnvp", start=None, init_scale=0.5)  # far from the posterior
    losses = []
    for importance in (1, 8, 64):
        elbo = StratifiedELBO(
            num_particles=4096, alpha=0.0, importance=importance, vectorize_particles=True
        )
        losses.append(elbo.loss(model, guide))
    assert losses[0] > losses[1] > losses[2] > -log_evidence


def test_a_mixture_guide_samples_under_no_grad_and_refuses_a_plain_elbo():
    model, _ = mixture_model(2, torch.tensor([0.3, 0.7], dtype=torch.float64), "cpu")
    guide = AutoFlow(model, "planar", components=2)
    draws = Predictive(model, guide=guide, num_samples=50, return_sites=["z"])()["z"]
    assert draws.shape[-1] == 2 and bool(torch.isfinite(draws).all())
    assert set(guide.median()) == {"z"}
    with pytest.raises(ValueError, match=r"is trained by pyroflows\.StratifiedELBO"):
        SVI(model, guide, pyroflows.decaying_adam(10), Trace_ELBO()).step()
    with pytest.raises(ValueError, match="NeuTraReparam needs components=1"):
        guide.get_transform()  # what NeuTraReparam calls
    with pytest.raises(ValueError, match="one transform per component"):
        guide.flow  # noqa: B018


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda m: AutoFlow(m, components=0), "components must be a positive integer"),
        (lambda m: AutoFlow(m, components=2, stl=True), "stl=True is for one flow"),
        (lambda m: StratifiedELBO(num_particles=6, importance=4), "multiple of importance=4"),
        (lambda m: StratifiedELBO(alpha=-1.0), "alpha must be a finite number >= 0"),
        (lambda m: StratifiedELBO(num_particles=0), "num_particles must be a positive"),
    ],
)
def test_bad_options_are_refused_by_name(make, message):
    model, _ = conjugate_model(torch.device("cpu"))
    with pytest.raises(ValueError, match=message):
        make(model)


def test_stl_with_an_importance_weighted_bound_is_refused():
    model, _ = conjugate_model(torch.device("cpu"))
    with pytest.raises(ValueError, match=r"AutoFlow\(stl=True\) is for the ELBO"):
        StratifiedELBO(alpha=0.0).loss(model, AutoFlow(model, stl=True))


def test_a_guide_with_discrete_sites_is_refused():
    def model():
        pyro.sample("k", dist.Categorical(torch.tensor([0.5, 0.5])))

    with pytest.raises(ValueError, match="'k' is drawn from Categorical, which has no rsample"):
        StratifiedELBO().loss(model, AutoDiscreteParallel(model))


def test_weights_of_one_flow_are_one():
    model, _ = conjugate_model(torch.device("cpu"))
    guide = AutoFlow(model)
    guide()
    assert guide.weights.tolist() == [1.0]
    assert math.isfinite(StratifiedELBO(num_particles=2).loss(model, guide))
