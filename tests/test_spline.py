"""The rational-quadratic spline: exact tails, float32 safety, and the spline families."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pyroflows.transforms import RationalQuadratic


def test_inputs_far_outside_the_bound_pass_through_exactly(device):
    spline = RationalQuadratic(bins=6, bound=3.0)
    x = torch.tensor([-1e6, -50.0, -3.0001, 3.0001, 50.0, 1e6], device=device)
    x.requires_grad_(True)
    params = torch.randn(6, spline.n_params, device=device, requires_grad=True)
    for direction in (spline.forward, spline.inverse):
        y, ladj = direction(x, params)
        assert torch.equal(y, x.detach()) and torch.equal(ladj, torch.zeros_like(ladj))
        grads = torch.autograd.grad(y.sum() + ladj.sum(), [x, params])
        assert all(bool(torch.isfinite(g).all()) for g in grads)


def test_the_spline_joins_its_tails_continuously_with_slope_one(device):
    spline = RationalQuadratic(bins=5, bound=2.0)
    params = 3 * torch.randn(1, spline.n_params, device=device, dtype=torch.float64)
    for edge in (-2.0, 2.0):
        x = torch.tensor([edge - 1e-10, edge + 1e-10], device=device, dtype=torch.float64)
        y, ladj = spline.forward(x, params.expand(2, -1))
        torch.testing.assert_close(y, x, atol=1e-6, rtol=0)
        torch.testing.assert_close(ladj, torch.zeros_like(ladj), atol=1e-5, rtol=0)


def test_zero_parameters_give_the_identity():
    spline = RationalQuadratic(bins=8, bound=4.0)
    x = torch.linspace(-6, 6, 101)
    y, ladj = spline.forward(x, torch.zeros(101, spline.n_params))
    torch.testing.assert_close(y, x)
    torch.testing.assert_close(ladj, torch.zeros(101), atol=1e-6, rtol=0)


@settings(max_examples=200, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    scale=st.floats(0.0, 12.0),
    bins=st.integers(1, 16),
    spread=st.floats(0.1, 3.0),
)
def test_float32_sweep_never_gives_nan_or_inf_and_round_trips(seed, scale, bins, spread):
    generator = torch.Generator().manual_seed(seed)
    spline = RationalQuadratic(bins=bins, bound=3.0)
    n = 512
    params = scale * torch.randn(n, spline.n_params, generator=generator)
    x = spread * 3.0 * (2 * torch.rand(n, generator=generator) - 1)
    xs = spline._knots(params)[..., 0, :]  # also probe the knots themselves, where bins meet
    knots = xs.gather(-1, torch.randint(0, bins + 1, (n, 1), generator=generator)).squeeze(-1)
    x = torch.where(torch.rand(n, generator=generator) < 0.25, knots, x)
    y, ladj = spline.forward(x, params)
    back, ladj_back = spline.inverse(y, params)
    for t in (y, ladj, back, ladj_back):
        assert bool(torch.isfinite(t).all())
    # Where the spline is nearly flat x is ill-determined by y, so the round trip's error is
    # measured in y. (Without the inverse's Newton steps, bins thousands of times wider than
    # high miss this by 30x in float32.)
    assert float(((back - x).abs() * ladj.exp()).max()) < 1e-4
    assert float((spline.forward(back, params)[0] - y).abs().max()) < 1e-4


@pytest.mark.parametrize("bad", [{"bins": 0}, {"bound": -1.0}])
def test_bad_spline_options_are_refused(bad):
    with pytest.raises(ValueError):
        RationalQuadratic(**bad)
