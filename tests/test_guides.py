"""AutoFlow: every registered family as a guide for Pyro models."""

from __future__ import annotations

import copy
import io
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.distributions import constraints
from pyro.infer import (
    SVI,
    JitTrace_ELBO,
    JitTraceGraph_ELBO,
    Predictive,
    RenyiELBO,
    Trace_ELBO,
    TraceGraph_ELBO,
    TraceMeanField_ELBO,
)
from pyro.infer.autoguide import AutoDiagonalNormal, init_to_feasible
from pyro.optim import Adam, ClippedAdam

import pyroflows
from pyroflows import AutoFlow, list_flows
from pyroflows.transforms import Planar

FLOWS = list_flows()
# a CNF solves an ODE at float64 tolerances in every step: its training runs in CI's slow set
TRAINED = [pytest.param(name, marks=pytest.mark.slow) if name == "cnf" else name for name in FLOWS]
JIT_WARNINGS = [
    "ignore::torch.jit.TracerWarning:torch",
    "ignore::torch.jit.TracerWarning:pyro",
    "ignore::DeprecationWarning:torch.jit",
]


def tensor(value, device):
    return torch.as_tensor(value, device=device, dtype=torch.float64)


def regression_model(device):
    """A small model with real, positive and unit-interval latent sites."""
    x = torch.linspace(-1, 1, 12, device=device, dtype=torch.float64)
    y = 0.5 + 2.0 * x + 0.3 * torch.sin(7 * x)
    zero = tensor(0.0, device)

    def model():
        slope = pyro.sample("slope", dist.Normal(zero, 3.0))
        noise = pyro.sample("noise", dist.LogNormal(zero - 1, 1.0))
        weight = pyro.sample("weight", dist.Beta(zero + 2, 2.0))
        with pyro.plate("data", 12):
            pyro.sample("y", dist.Normal(weight + slope * x, noise), obs=y)

    return model


@pytest.mark.parametrize("name", TRAINED)
def test_every_registered_family_is_a_guide_family(name, device):
    model = regression_model(device)
    guide = AutoFlow(model, name, start=None)  # from the prior's point: it must learn
    svi = SVI(model, guide, Adam({"lr": 0.01}), Trace_ELBO())
    losses = [svi.step() for _ in range(60)]
    assert all(math.isfinite(loss) for loss in losses)
    assert sum(losses[-10:]) < sum(losses[:10])
    sample = guide()
    assert sample["noise"] > 0 and 0 < sample["weight"] < 1
    assert all(v.device.type == device.type for v in sample.values())
    assert all(p.dtype == torch.float64 for p in guide.parameters())
    # Pyro's optimiser steps exactly the guide's parameters: the family's and the Gaussian's
    store = {id(p) for p in pyro.get_param_store().values()}
    assert store == {id(p) for p in guide.parameters()}
    assert [n for n, _ in guide.gaussian.named_parameters()] == ["params"]


@pytest.mark.parametrize("name", FLOWS)
def test_step_zero_is_the_mean_field_gaussian(name, device):
    model = regression_model(device)
    guide = AutoFlow(model, name, init_loc_fn=init_to_feasible, init_scale=0.3, start=None)
    guide()
    mean_field = AutoDiagonalNormal(model, init_loc_fn=init_to_feasible, init_scale=0.3)
    mean_field()
    loc, scale = mean_field._loc_scale()
    expected = dist.Normal(loc, scale).to_event(1)
    posterior = guide.get_posterior()
    z = expected.sample((50,))
    torch.testing.assert_close(posterior.log_prob(z), expected.log_prob(z))


def test_every_common_support_and_a_dependent_bound(device):
    def model():
        zero = tensor(0.0, device)
        pyro.sample("positive", dist.Gamma(zero + 2, 1.0))
        pyro.sample("unit", dist.Beta(zero + 2, 2.0))
        pyro.sample("simplex", dist.Dirichlet(torch.ones(3, device=device, dtype=torch.float64)))
        pyro.sample("corr", dist.LKJCholesky(3, zero + 2))
        pyro.sample("chol", dist.ImproperUniform(constraints.lower_cholesky, (), (2, 2)))
        ordered = pyro.sample(
            "ordered", dist.ImproperUniform(constraints.ordered_vector, (), (3,))
        )
        pyro.factor("ordered_prior", dist.Normal(zero, 2.0).log_prob(ordered).sum())
        a = pyro.sample("a", dist.Beta(zero + 2, 5.0))
        pyro.sample("b", dist.Uniform(zero, 1 - a))

    # improper in the Cholesky factor's direction: no start to find, start at the prior
    guide = AutoFlow(model, "realnvp", init_scale=1.0, start=None)
    svi = SVI(model, guide, Adam({"lr": 0.01}), Trace_ELBO())
    for _ in range(5):
        assert math.isfinite(svi.step())
    for _ in range(20):
        sample = guide()
        for name, value in sample.items():
            if name != "b":  # b's support depends on a
                support = guide.prototype_trace.nodes[name]["fn"].support
                assert support.check(value).all(), name
        assert 0 < sample["b"] < 1 - sample["a"]


def test_a_dependent_bound_gives_the_exact_density(device):
    # a = sigmoid(u1), b = (1 - a) sigmoid(u2): the guide's density of (a, b) is
    # q(u) / |d(a, b) / du| with log|d(a, b) / du| = log s'(u1) + log(1 - a) + log s'(u2).
    # A guide that froze b's bound at the initial a would use log(1 - a0) instead.
    def model():
        a = pyro.sample("a", dist.Beta(tensor(2.0, device), 2.0))
        pyro.sample("b", dist.Uniform(tensor(0.0, device), 1 - a))

    guide = AutoFlow(model, "planar", init_scale=2.0)
    for _ in range(10):
        trace = pyro.poutine.trace(guide).get_trace()
        u = trace.nodes["_AutoFlow_latent"]["value"]
        a, b = trace.nodes["a"]["value"], trace.nodes["b"]["value"]
        assert 0 < b < 1 - a
        torch.testing.assert_close(b, (1 - a) * torch.sigmoid(u[1]))
        log_jacobian = (
            torch.nn.functional.logsigmoid(u).sum()
            + torch.nn.functional.logsigmoid(-u).sum()
            + torch.log1p(-a)
        )
        expected = guide.get_posterior().log_prob(u.detach()) - log_jacobian
        torch.testing.assert_close(trace.log_prob_sum(), expected)


@pytest.mark.parametrize(
    "elbo",
    [
        Trace_ELBO(),
        TraceGraph_ELBO(),
        RenyiELBO(alpha=0.5, num_particles=4, vectorize_particles=True),
        Trace_ELBO(num_particles=4, vectorize_particles=True),
    ],
    ids=["trace", "tracegraph", "renyi", "vectorized"],
)
def test_elbos(elbo, device):
    model = regression_model(device)
    guide = AutoFlow(model, "planar", start=None)  # from the prior's point: it must learn
    svi = SVI(model, guide, Adam({"lr": 0.02}), elbo)
    losses = [svi.step() for _ in range(40)]
    assert all(math.isfinite(loss) for loss in losses)
    assert sum(losses[-10:]) < sum(losses[:10])


@pytest.mark.filterwarnings(*JIT_WARNINGS)
@pytest.mark.parametrize("name", ["realnvp", "planar", "glow"])
def test_jit_elbo_gives_the_plain_loss_and_gradients(name, device):
    # Pyro's own flow guides fail under JitTrace_ELBO (pyro-ppl issue 3132). After the
    # first (compiling) call, the compiled ELBO must draw the same noise as the plain one
    # and give the same loss and the same gradient for every parameter.
    model = regression_model(device)
    guide = AutoFlow(model, name)
    guide()
    with torch.no_grad():
        for p in guide.parameters():
            p.add_(0.1 * torch.randn_like(p))
    params = list(guide.parameters())
    jit = JitTrace_ELBO()
    jit.loss_and_grads(model, guide)
    results = []
    for elbo in [jit, Trace_ELBO()]:
        for p in params:
            p.grad = None
        pyro.set_rng_seed(5)
        loss = elbo.loss_and_grads(model, guide)
        results.append((loss, [p.grad.clone() for p in params]))
    (jit_loss, jit_grads), (loss, grads) = results
    assert jit_loss == pytest.approx(loss, rel=1e-7)  # fused ops round differently
    for jit_grad, grad in zip(jit_grads, grads):
        torch.testing.assert_close(jit_grad, grad)


def test_guide_draws_and_scores_with_one_forward_pass(monkeypatch, device):
    def no_inverse(self, y):
        raise AssertionError("the guide ran a planar inverse")

    monkeypatch.setattr(Planar, "inverse_and_log_det", no_inverse)
    model = regression_model(device)
    guide = AutoFlow(model, "planar")
    svi = SVI(model, guide, Adam({"lr": 0.02}), Trace_ELBO())
    assert math.isfinite(svi.step())


def test_predictive_median_and_quantiles_on_a_conjugate_model(device):
    # y_i ~ N(mu, 1), mu ~ N(0, 10^2): the posterior of mu is Gaussian and known exactly.
    y = torch.tensor([1.2, 0.7, 2.1, 1.5, 0.9, 1.8], device=device, dtype=torch.float64)

    def model():
        mu = pyro.sample("mu", dist.Normal(tensor(0.0, device), 10.0))
        with pyro.plate("data", 6):
            pyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    post_var = 1 / (1 / 100 + 6)
    post_mean = post_var * y.sum().item()
    guide = AutoFlow(model, "planar")
    elbo = Trace_ELBO(num_particles=32, vectorize_particles=True)
    # A decaying learning rate, so that the end point is not SGD noise around the optimum.
    svi = SVI(model, guide, ClippedAdam({"lr": 0.02, "lrd": 0.997}), elbo)
    for _ in range(800):
        svi.step()
    median = guide.median(num_samples=4000)["mu"]
    assert abs(median.item() - post_mean) < 0.05
    q = guide.quantiles([0.1587, 0.8413], num_samples=4000)["mu"]
    assert abs((q[1] - q[0]).item() / 2 - math.sqrt(post_var)) < 0.05
    samples = Predictive(model, guide=guide, num_samples=300)()
    assert samples["mu"].shape == (300, 1) and samples["y"].shape == (300, 6)  # Pyro's layout
    assert samples["mu"].device.type == device.type


@pytest.mark.parametrize("name", ["realnvp", "planar"])
def test_stl_guide_gradient_vanishes_when_the_guide_is_the_posterior(name, device):
    # Prior N(0, I), no data: the guide started at N(0, I) is the posterior. The path
    # derivative is then zero for every draw; the plain ELBO gradient only on average.
    def model():
        zero = tensor(0.0, device)
        pyro.sample("z", dist.Normal(zero, 1.0).expand([3]).to_event(1))

    gradients = {}
    for stl in (False, True):
        guide = AutoFlow(model, name, stl=stl, init_loc_fn=init_to_feasible, init_scale=1.0)
        loss = Trace_ELBO(num_particles=16, vectorize_particles=True).differentiable_loss
        value = loss(model, guide)
        params = list(guide.parameters())
        gradients[stl] = torch.cat([g.flatten() for g in torch.autograd.grad(value, params)])
    assert gradients[True].abs().max() < 1e-10
    assert gradients[False].abs().max() > 1e-3


@pytest.mark.filterwarnings(*JIT_WARNINGS)
def test_warmup_holds_the_flow_at_the_identity_while_the_gaussian_fits(device):
    model = regression_model(device)
    guide = AutoFlow(model, "realnvp", warmup=5)
    optimiser = Adam({"lr": 0.01})
    svi = SVI(model, guide, optimiser, Trace_ELBO())
    svi.step()
    flow = list(guide.flow.parameters())
    start = [p.detach().clone() for p in flow], guide.gaussian.params.detach().clone()
    for _ in range(4):
        svi.step()
    assert all(torch.equal(p, p0) for p, p0 in zip(flow, start[0], strict=True))
    assert not torch.equal(guide.gaussian.params, start[1])
    # no gradient at all, not a zero one: Adam has no state for the flow until its release
    assert all(p.grad is None and not optimiser.optim_objs[p].state for p in flow)
    svi.step()
    assert not all(torch.equal(p, p0) for p, p0 in zip(flow, start[0], strict=True))
    for p in flow:
        (state,) = optimiser.optim_objs[p].state.values()
        assert state["step"] == 1  # so its first steps are bias-corrected like any first step
    with pytest.raises(ValueError, match="warmup"):
        AutoFlow(model, "realnvp", warmup=-1)
    with pytest.raises(ValueError, match="JitTrace_ELBO"):
        JitTrace_ELBO().loss_and_grads(model, AutoFlow(model, "realnvp", warmup=5))


@pytest.mark.filterwarnings(*JIT_WARNINGS)
@pytest.mark.parametrize("name", ["realnvp", "planar"])  # autograd; closed-form push
def test_stl_guide_under_jit_gives_the_plain_stl_loss_and_gradients(name, device):
    model = regression_model(device)
    guide = AutoFlow(model, name, stl=True)
    guide()
    params = list(guide.parameters())
    with torch.no_grad():
        for flat in params:
            flat.add_(0.1 * torch.randn_like(flat))
    jit = JitTrace_ELBO()
    jit.loss_and_grads(model, guide)
    results = []
    for elbo in [jit, Trace_ELBO()]:
        for flat in params:
            flat.grad = None
        pyro.set_rng_seed(5)
        loss = elbo.loss_and_grads(model, guide)
        results.append((loss, torch.cat([flat.grad.flatten() for flat in params])))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-7)
    torch.testing.assert_close(results[0][1], results[1][1])


def test_state_dict_round_trip_gives_identical_draws(device):
    model = regression_model(device)
    guide = AutoFlow(model, "realnvp")
    svi = SVI(model, guide, Adam({"lr": 0.02}), Trace_ELBO())
    for _ in range(10):
        svi.step()
    buffer = io.BytesIO()
    torch.save(guide.state_dict(), buffer)
    buffer.seek(0)
    pyro.clear_param_store()
    fresh = AutoFlow(model, "realnvp")
    fresh()  # builds the flow from the model's structure
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    pyro.set_rng_seed(7)
    a = guide()
    pyro.set_rng_seed(7)
    b = fresh()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("name", ["realnvp", "glow", "planar"])
def test_a_guide_is_plain_modules_whose_flow_loads_into_a_build(name, device):
    model = regression_model(device)
    guide = AutoFlow(model, name)
    svi = SVI(model, guide, Adam({"lr": 0.02}), Trace_ELBO())
    for _ in range(5):
        svi.step()
    layers = set(guide.flow.modules())
    assert layers <= set(guide.modules()) and len(layers) > 1  # the family's layers are there
    plain = pyroflows.build(name, guide.flow.dim).to(device=device, dtype=torch.float64)
    plain.load_state_dict(guide.flow.state_dict())
    z = torch.randn(4, guide.flow.dim, device=device, dtype=torch.float64)
    torch.testing.assert_close(plain.forward_and_log_det(z), guide.flow.forward_and_log_det(z))
    twin = copy.deepcopy(guide)
    pyro.set_rng_seed(3)
    a = guide()
    pyro.set_rng_seed(3)
    b = twin()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(p.dtype == torch.float32 for p in copy.deepcopy(guide).float().parameters())


def test_a_latent_site_in_a_subsampled_plate_is_refused(device):
    def model():
        with pyro.plate("groups", 100, subsample_size=10):
            pyro.sample("z", dist.Normal(tensor(0.0, device), 1.0))

    with pytest.raises(
        ValueError, match=r"latent site 'z'.*plate 'groups', subsampled to 10 of 100"
    ):
        AutoFlow(model)()


def test_subsampling_observed_sites_only_is_supported(device):
    data = torch.randn(100, device=device, dtype=torch.float64) + 2

    def model():
        mu = pyro.sample("mu", dist.Normal(tensor(0.0, device), 10.0))
        with pyro.plate("data", 100, subsample_size=20) as index:
            pyro.sample("y", dist.Normal(mu, 1.0), obs=data[index])

    guide = AutoFlow(model, "planar")
    svi = SVI(model, guide, Adam({"lr": 0.05}), Trace_ELBO())
    for _ in range(300):
        svi.step()
    assert guide.latent_dim == 1
    assert abs(guide.median()["mu"].item() - data.mean().item()) < 0.3


def test_discrete_latent_site_is_named():
    def model():
        p = pyro.sample("p", dist.Beta(2.0, 2.0))
        pyro.sample("coin", dist.Bernoulli(p))

    with pytest.raises(ValueError, match="discrete sample site 'coin'"):
        AutoFlow(model)()


def test_model_without_latent_sites_is_refused():
    def model():
        pyro.sample("y", dist.Normal(0.0, 1.0), obs=torch.tensor(0.0))

    with pytest.raises(RuntimeError, match="found no latent variables"):
        AutoFlow(model)()


def test_unknown_family_and_option_are_refused_at_construction():
    with pytest.raises(ValueError, match="unknown flow family 'nvp'"):
        AutoFlow(lambda: None, "nvp")
    with pytest.raises(ValueError, match="'planar' has no option 'bins'"):
        AutoFlow(lambda: None, "planar", bins=8)
    with pytest.raises(ValueError, match="init_scale must be a finite positive number"):
        AutoFlow(lambda: None, init_scale=0.0)


def test_flat_priors_start_feasibly_and_follow_the_data_device(device):
    # ImproperUniform cannot be sampled, so its initial value is made on the CPU; the guide
    # must still live where the model's data live.
    y = torch.tensor([0.3, 1.1, 0.7], device=device, dtype=torch.float64)

    def model():
        loc = pyro.sample("loc", dist.ImproperUniform(constraints.real, (), ()))
        scale = pyro.sample("scale", dist.ImproperUniform(constraints.positive, (), ()))
        with pyro.plate("data", 3):
            pyro.sample("y", dist.Normal(loc, scale), obs=y)

    guide = AutoFlow(model, "realnvp")
    svi = SVI(model, guide, Adam({"lr": 0.01}), Trace_ELBO())
    assert math.isfinite(svi.step())
    sample = guide()
    assert sample["loc"].device.type == device.type and sample["scale"] > 0
    assert guide.get_base_dist().sample().device.type == device.type


def conjugate_normal(device):
    """mu ~ N(0, 2^2), y_i ~ N(mu, 1): mu's posterior is N(v sum(y), v), v = 1 / (1/4 + n)."""
    y = tensor([1.2, 0.7, 2.1, 1.5, 0.9, 1.8], device)
    zero, n = tensor(0.0, device), len(y)  # outside the model, which a JIT ELBO traces

    def model():
        mu = pyro.sample("mu", dist.Normal(zero, 2.0))
        with pyro.plate("data", n):
            pyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    variance = 1 / (1 / 4 + n)
    return model, "mu", variance * y.sum().item(), math.sqrt(variance)


def conjugate_gamma_poisson(device):
    """rate ~ Gamma(2, 1), y_i ~ Poisson(rate): rate's posterior is Gamma(2 + sum(y), 1 + n).

    A positive site: the guide's density of ``rate`` carries the Jacobian of ``exp``.
    """
    y = tensor([2.0, 0.0, 3.0, 1.0], device)
    two, n = tensor(2.0, device), len(y)

    def model():
        rate = pyro.sample("rate", dist.Gamma(two, 1.0))
        with pyro.plate("data", n):
            pyro.sample("y", dist.Poisson(rate), obs=y)

    shape, rate = 2 + y.sum().item(), 1 + n
    return model, "rate", shape / rate, math.sqrt(shape) / rate


@pytest.mark.filterwarnings(*JIT_WARNINGS)
@pytest.mark.parametrize(
    "conjugate", [conjugate_normal, conjugate_gamma_poisson], ids=["normal", "gamma-poisson"]
)
@pytest.mark.parametrize(
    "elbo", [TraceMeanField_ELBO, JitTraceGraph_ELBO], ids=["mean-field", "jit-tracegraph"]
)
def test_mean_field_and_jit_tracegraph_elbos_fit_a_conjugate_posterior(elbo, conjugate, device):
    model, site, mean, sd = conjugate(device)
    guide = AutoFlow(model, "realnvp")
    optimiser = ClippedAdam({"lr": 0.02, "lrd": 0.993})  # decays, so the end is not SGD noise
    svi = SVI(model, guide, optimiser, elbo(num_particles=32, vectorize_particles=True))
    losses = [svi.step() for _ in range(600)]
    assert sum(losses[-50:]) < sum(losses[:50])
    predictive = Predictive(model, guide=guide, num_samples=10_000, parallel=True)
    draws = predictive()[site]
    assert abs(draws.mean().item() - mean) < 0.1 * sd
    assert abs(draws.std().item() / sd - 1) < 0.1
