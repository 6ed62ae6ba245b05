"""The Pathfinder start: exact on Gaussian posteriors whatever their scales, chooses along the
path where the mode misleads, and makes AutoFlow and fit_reverse_kl right on badly scaled
flat-prior regressions."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO

import pyroflows
from pyroflows.inference.start import pathfinder


def gaussian(dim: int, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A mean and a covariance with scales from 1e-3 to 1e3 and correlations near +-0.9."""
    generator = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-3, 3, dim, dtype=torch.float64)
    raw = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
    correlation = raw @ raw.T + 0.05 * torch.eye(dim, dtype=torch.float64)
    correlation = correlation / torch.outer(correlation.diagonal(), correlation.diagonal()).sqrt()
    cov = correlation * torch.outer(scales, scales)
    mean = scales * torch.randn(dim, generator=generator, dtype=torch.float64) * 5
    return mean.to(device), cov.to(device)


def gaussian_log_density(mean: torch.Tensor, cov: torch.Tensor):
    precision = torch.linalg.inv(cov)
    return lambda z: -0.5 * (((z - mean) @ precision) * (z - mean)).sum(-1)


@pytest.mark.parametrize("dim", [1, 5, 12])
def test_on_a_gaussian_the_start_is_the_gaussian_whatever_its_scales(dim, device):
    mean, cov = gaussian(dim, device)
    start = pathfinder(gaussian_log_density(mean, cov), torch.zeros(dim, device=device).double())
    sd = cov.diagonal().sqrt()
    torch.testing.assert_close((start.loc - mean) / sd, torch.zeros_like(mean), atol=1e-6, rtol=0)
    found = start.scale_tril @ start.scale_tril.T
    torch.testing.assert_close(
        found / torch.outer(sd, sd), cov / torch.outer(sd, sd), atol=1e-6, rtol=0
    )
    log_z = 0.5 * dim * math.log(2 * math.pi) + 0.5 * torch.logdet(cov).item()
    assert start.elbo == pytest.approx(log_z, abs=1e-6)  # the ELBO of the exact posterior


def funnel(z: torch.Tensor) -> torch.Tensor:
    """Neal's funnel in 2-D, normalised: v ~ N(0, 3^2), x | v ~ N(0, e^v). It has no mode:
    along x = 0 its density grows without bound as v falls."""
    v, x = z[..., 0], z[..., 1]
    return (
        -0.5 * (v / 3) ** 2
        - math.log(3)
        - 0.5 * x**2 * torch.exp(-v)
        - 0.5 * v
        - math.log(2 * math.pi)
    )


def test_where_the_density_has_no_mode_the_start_is_chosen_along_the_path():
    start = pathfinder(funnel, torch.tensor([0.0, 1.0], dtype=torch.float64))
    finite = [e for e in start.path_elbos if math.isfinite(e)]
    assert len(start.path_elbos) > 2  # L-BFGS ran into the neck
    assert start.elbo == max(finite) and start.elbo > finite[-1] + 5
    # log Z = 0, so -ELBO estimates KL(q || p): the chosen Gaussian is a fair start
    assert -start.elbo < 2.0
    assert 0 < start.scale_tril[0, 0] ** 2 < 20  # v's variance: the prior's is 9


def test_a_start_outside_the_support_is_refused():
    def half_line(z):
        return torch.where(z[..., 0] > 0, -z[..., 0], -math.inf)

    with pytest.raises(ValueError, match="not finite at the initial point"):
        pathfinder(half_line, torch.tensor([-1.0]))


@pytest.mark.parametrize("option", ["max_iter", "history", "draws", "candidates"])
def test_bad_options_are_named(option):
    with pytest.raises(ValueError, match=f"{option} must be a positive integer"):
        pathfinder(funnel, torch.zeros(2), **{option: 0})


@pytest.fixture
def float64():
    """Flat priors start at zeros of the default dtype: make it float64 for one test."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(default)


def regression(device: torch.device, seed: int = 0):
    """A linear regression with known noise and flat priors on raw, badly scaled, correlated
    columns, and its exact Gaussian posterior (mean, covariance) over (intercept, slopes)."""
    generator = torch.Generator().manual_seed(seed)
    n = 100
    x = torch.randn(n, 4, generator=generator, dtype=torch.float64)
    x = x * torch.tensor([100.0, 1.0, 0.01, 10.0], dtype=torch.float64)
    x[:, 0] += 500.0
    x[:, 3] = 0.1 * x[:, 0] + 0.5 * x[:, 3]
    noise = 0.5
    y = x @ torch.tensor([0.01, 1.0, 50.0, -0.2], dtype=torch.float64) + 2.0
    y = y + noise * torch.randn(n, generator=generator, dtype=torch.float64)
    x, y = x.to(device), y.to(device)

    def model():
        flat = dist.ImproperUniform(dist.constraints.real, (), ())
        intercept = pyro.sample("intercept", flat)
        slopes = pyro.sample("slopes", flat.expand([4]).to_event(1))
        with pyro.plate("rows", n):
            pyro.sample("y", dist.Normal(intercept + x @ slopes, noise), obs=y)

    design = torch.cat([torch.ones(n, 1, dtype=x.dtype, device=device), x], 1)
    cov = noise**2 * torch.linalg.inv(design.T @ design)
    return model, cov @ design.T @ y / noise**2, cov


def test_autoflow_by_default_gets_a_badly_scaled_flat_prior_regression_right(device, float64):
    model, mean, cov = regression(device)
    guide = pyroflows.AutoFlow(model, "realnvp")  # the default start: pathfinder
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 5e-3}), Trace_ELBO())
    svi.step()
    assert guide.whitening is not None and guide.start.elbo > -math.inf
    sd = cov.diagonal().sqrt()
    torch.testing.assert_close(
        (guide.start.loc - mean) / sd, torch.zeros_like(sd), atol=1e-4, rtol=0
    )
    for _ in range(500):  # a plain SVI loop, the defaults otherwise
        svi.step()
    draws = guide.get_posterior().sample((20_000,))
    assert ((draws.mean(0) - mean) / sd).abs().max() < 0.15
    assert ((draws.std(0) / sd) - 1).abs().max() < 0.1


def test_without_the_start_the_same_regression_is_far_off(device, float64):
    # what the start is for: from the prior's point, 500 steps leave the guide far away
    model, mean, cov = regression(device)
    guide = pyroflows.AutoFlow(model, "realnvp", start=None)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 5e-3}), Trace_ELBO())
    for _ in range(500):
        svi.step()
    draws = guide.get_posterior().sample((20_000,))
    assert ((draws.mean(0) - mean) / cov.diagonal().sqrt()).abs().max() > 1


def test_fit_reverse_kl_with_the_start_fits_a_badly_scaled_gaussian():
    mean, cov = gaussian(5, torch.device("cpu"))
    q = pyroflows.fit_reverse_kl(
        gaussian_log_density(mean, cov),
        5,
        "realnvp",
        steps=200,
        start="pathfinder",
        dtype=torch.float64,
        progress=False,
    )
    draws = q.sample((20_000,))
    sd = cov.diagonal().sqrt()
    assert ((draws.mean(0) - mean) / sd).abs().max() < 0.1
    assert ((draws.std(0) / sd) - 1).abs().max() < 0.1


def test_unknown_starts_are_refused():
    with pytest.raises(ValueError, match="start must be one of"):
        pyroflows.AutoFlow(lambda: None, start="laplace")
    with pytest.raises(ValueError, match="start must be None or 'pathfinder'"):
        pyroflows.fit_reverse_kl(funnel, 2, start="newton", progress=False)


def test_where_the_start_fails_the_guide_says_so_and_starts_at_the_initial_point():
    def walled():  # flat up to a wall at 1: every Gaussian puts mass where log p is -inf
        x = pyro.sample("x", dist.ImproperUniform(dist.constraints.real, (), (2,)))
        pyro.factor("wall", torch.where(x < 1, 0.0, -math.inf).sum())

    guide = pyroflows.AutoFlow(walled)
    with pytest.warns(RuntimeWarning, match="pathfinder start failed"):
        guide()
    assert guide.start is None and guide.whitening is None
    torch.testing.assert_close(guide.gaussian.scale_tril(), 0.1 * torch.eye(2))


def gaussian_process(dtype: torch.dtype):
    """A latent function on 30 close points with a long length-scale: its covariance is
    singular to float32 rounding (Cholesky fails there) and factorises in float64."""
    t = torch.linspace(0, 1, 30, dtype=dtype)
    kernel = torch.exp(-((t[:, None] - t[None, :]) ** 2) / (2 * 3.0**2))
    jitter = 1e-10 * torch.eye(30, dtype=dtype)
    y = torch.sin(3 * t)

    def model():
        amplitude = pyro.sample("amplitude", dist.LogNormal(torch.zeros((), dtype=dtype), 0.5))
        chol = torch.linalg.cholesky(amplitude * kernel + jitter)
        f = pyro.sample("f", dist.Normal(torch.zeros(30, dtype=dtype), 1.0).to_event(1))
        pyro.sample("y", dist.Normal(chol @ f, 0.1).to_event(1), obs=y)

    return model


def test_a_model_whose_cholesky_fails_in_float32_is_named_with_the_cure():
    guide = pyroflows.AutoFlow(gaussian_process(torch.float32))
    named = r"after site 'amplitude'.*float32"
    with pytest.raises(torch.linalg.LinAlgError, match=named) as error:
        guide()
    assert "give the model float64 data" in str(error.value)
    pyroflows.AutoFlow(gaussian_process(torch.float64), start=None)()  # the cure works


def test_the_decaying_rate_ends_at_lr_times_decay():
    def model():
        pyro.sample("x", dist.Normal(0.0, 1.0))

    guide = pyroflows.AutoFlow(model, "planar", start=None)
    optim = pyroflows.decaying_adam(200, lr=0.01, decay=0.1)
    svi = SVI(model, guide, optim, Trace_ELBO())
    for _ in range(200):
        svi.step()
    rates = [group["lr"] for o in optim.optim_objs.values() for group in o.param_groups]
    assert rates and rates == pytest.approx([0.001] * len(rates), rel=1e-9)


@pytest.mark.parametrize("option", [{"steps": 0}, {"lr": 0.0}, {"decay": -1.0}, {"clip_norm": 0}])
def test_decaying_adam_names_a_bad_option(option):
    arguments = {"steps": 10, **option}
    with pytest.raises(ValueError, match=next(iter(option))):
        pyroflows.decaying_adam(**arguments)
