"""Properties of individual layers that the conformance suite does not cover."""

from __future__ import annotations

import pyro.distributions as dist
import pytest
import torch

from pyroflows import FlowDistribution
from pyroflows.transforms import (
    ActNorm,
    Affine,
    Autoregressive,
    CholeskyAffine,
    Coupling,
    Flow,
    FlowStack,
    LocScale,
    LULinear,
    NotInvertibleError,
    Planar,
    Radial,
    Shift,
)
from pyroflows.transforms.coupling import _Permute, coupling_masks, permute
from pyroflows.transforms.roots import solve_increasing


def test_planar_constraint_keeps_w_dot_u_above_minus_one():
    layer = Planar(3).double()
    with torch.no_grad():
        layer.u.copy_(-50 * layer.w)  # as far from invertible as a free u can ask
    _, u_hat, w, _, c = layer._params(torch.zeros(3, dtype=torch.float64), None)
    assert c.item() > -1 and torch.allclose(w[0] @ u_hat[0], c[0])


def test_planar_starts_at_the_identity():
    layer = Planar(4)
    x = torch.randn(10, 4)
    y, ladj = layer.forward_and_log_det(x)
    assert torch.equal(y, x) and torch.equal(ladj, torch.zeros(10))


@pytest.mark.parametrize("scale", [-40.0, -3.0, 0.5, 8.0])
def test_planar_inverse_is_exact_for_extreme_parameters(scale):
    torch.manual_seed(1)
    layer = Planar(3).double()
    with torch.no_grad():
        layer.u.copy_(scale * layer.w / (layer.w[0] @ layer.w[0]))
        layer.b.fill_(0.7)
    x = torch.randn(200, 3, dtype=torch.float64) * 5
    y = layer(x)
    torch.testing.assert_close(layer.inv(y), x, rtol=1e-10, atol=1e-10)


def test_planar_inverse_gradient_is_the_implicit_derivative():
    torch.manual_seed(2)
    layer = Planar(2).double()
    with torch.no_grad():
        layer.u.normal_()
    y = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    # d f^{-1}(y) / dy must be the inverse of the forward Jacobian at x = f^{-1}(y).
    jac_inv = torch.autograd.functional.jacobian(lambda v: layer.inv(v), y[0])
    x0 = layer.inv(y[0]).detach()
    jac_fwd = torch.autograd.functional.jacobian(lambda v: layer(v), x0)
    torch.testing.assert_close(jac_inv @ jac_fwd, torch.eye(2, dtype=torch.float64))


def test_roots_solver_matches_the_implicit_function_theorem():
    t = torch.tensor([2.0, 10.0, -30.0], dtype=torch.float64, requires_grad=True)
    p = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)

    def fn(a):
        return a**3 + p * a, 3 * a**2 + p

    a = solve_increasing(fn, t, torch.full_like(t, -10), torch.full_like(t, 10))
    torch.testing.assert_close(a**3 + a, t.detach())
    da_dt, da_dp = torch.autograd.grad(a.sum(), (t, p))
    slope = 3 * a.detach() ** 2 + 1
    torch.testing.assert_close(da_dt, 1 / slope)
    torch.testing.assert_close(da_dp, (-a.detach() / slope).sum())


def test_radial_inverse_at_the_centre_and_far_away():
    layer = Radial(3).double()
    with torch.no_grad():
        layer.beta_raw.fill_(2.0)
        layer.alpha_raw.fill_(-1.0)
    x = torch.cat([layer.z0.detach()[None] + 1e-9, torch.randn(5, 3, dtype=torch.float64) * 1e4])
    torch.testing.assert_close(layer.inv(layer(x)), x, rtol=1e-9, atol=1e-9)


def test_radial_constraint_keeps_beta_above_minus_alpha():
    layer = Radial(2)
    with torch.no_grad():
        layer.beta_raw.fill_(-100.0)
    _, _, alpha, beta = layer._params(torch.zeros(2), None)
    assert beta.item() > -alpha.item()


def test_actnorm_starts_from_data_only_when_asked():
    torch.manual_seed(0)
    layer = ActNorm(2).double()
    data = torch.randn(500, 2, dtype=torch.float64) * torch.tensor([3.0, 0.1]) + 7
    for mode in (True, False):  # no pass in either mode moves it
        layer.train(mode)
        layer.forward_and_log_det(data)
        layer.inverse_and_log_det(data)
        torch.testing.assert_close(layer.inverse_and_log_det(data)[0], data, rtol=0, atol=0)
    layer.initialize(data)
    z, ladj = layer.inverse_and_log_det(data)
    torch.testing.assert_close(z.mean(0), torch.zeros(2, dtype=torch.float64))
    torch.testing.assert_close(z.std(0), torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(ladj, -data.std(0).log().sum().expand(500))
    shift = layer.shift.detach().clone()
    layer.inverse_and_log_det(data * 10)
    assert torch.equal(layer.shift.detach(), shift)


def test_actnorm_start_needs_two_rows_and_keeps_constant_columns_unscaled():
    layer = ActNorm(2)
    with pytest.raises(ValueError, match="at least two rows"):
        layer.initialize(torch.randn(1, 2))
    layer.initialize(torch.stack([torch.tensor([1.0, 5.0]), torch.tensor([3.0, 5.0])]))
    torch.testing.assert_close(layer.log_scale.detach()[1], torch.tensor(0.0))


def test_stack_initialize_starts_each_actnorm_from_what_reaches_it():
    """In the density direction the last layer sees the data first; an actnorm below a
    fixed scaling sees the scaled data."""
    torch.manual_seed(0)
    scaling, norm = LocScale(torch.zeros(2), torch.tensor([2.0, 0.5])), ActNorm(2)
    stack = FlowStack([norm, scaling])
    data = torch.randn(400, 2) * torch.tensor([3.0, 1.0]) + 4
    stack.initialize(data)
    z = stack.inverse_and_log_det(data)[0]
    torch.testing.assert_close(z.mean(0), torch.zeros(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.std(0), torch.ones(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(norm.shift.detach(), (data / torch.tensor([2.0, 0.5])).mean(0))


def test_actnorm_keeps_constant_columns_finite():
    layer = ActNorm(2)
    data = torch.stack([torch.randn(20), torch.full((20,), 3.0)], dim=1)
    z, ladj = layer.inverse_and_log_det(data)
    assert torch.isfinite(z).all() and torch.isfinite(ladj).all()


def test_actnorm_loaded_state_is_not_reinitialised():
    layer = ActNorm(2)
    layer.inverse_and_log_det(torch.randn(50, 2) * 3)
    fresh = ActNorm(2)
    fresh.inverse_and_log_det(torch.randn(50, 2))  # initialised on other data
    fresh.load_state_dict(layer.state_dict())
    data = torch.randn(50, 2) + 10
    assert torch.equal(fresh.inverse_and_log_det(data)[0], layer.inverse_and_log_det(data)[0])


def test_lu_linear_matches_its_dense_matrix():
    torch.manual_seed(0)
    layer = LULinear(4).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()
    _, lower, upper, _, _ = layer._factors(torch.zeros(4, dtype=torch.float64), None)
    weight = lower @ upper
    x = torch.randn(3, 4, dtype=torch.float64)
    y, ladj = layer.forward_and_log_det(x)
    torch.testing.assert_close(y, x @ weight.T + layer.bias)
    torch.testing.assert_close(ladj, torch.linalg.slogdet(weight)[1].expand(3))


def test_cholesky_affine_is_a_gaussian_cholesky_factor(device):
    """y = L x + b with L lower-triangular with a positive diagonal: log-det, inverse, and
    the pushforward of N(0, I) is N(b, L L^T)."""
    torch.manual_seed(0)
    layer = CholeskyAffine(4).to(device=device, dtype=torch.float64)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()
    tril = layer.scale_tril()
    assert torch.equal(tril, tril.tril()) and bool((tril.diagonal() > 0).all())
    x = torch.randn(3, 4, device=device, dtype=torch.float64)
    y, ladj = layer.forward_and_log_det(x)
    torch.testing.assert_close(y, x @ tril.T + layer.bias)
    torch.testing.assert_close(ladj, tril.diagonal().log().sum().expand(3))
    x_back, ladj_inv = layer.inverse_and_log_det(y)
    torch.testing.assert_close(x_back, x)
    torch.testing.assert_close(ladj_inv, -ladj)
    zeros = torch.zeros(4, device=device, dtype=torch.float64)
    q = FlowDistribution(dist.Normal(zeros, 1.0).to_event(1), layer)
    exact = dist.MultivariateNormal(layer.bias, scale_tril=tril)
    torch.testing.assert_close(q.log_prob(y), exact.log_prob(y))
    # grad log N(0, I) pushed forward is grad log N(b, L L^T): -(L L^T)^{-1}(y - b)
    _, grad = layer.forward_and_grad(x, -x)
    expected = -torch.cholesky_solve((y - layer.bias).T, tril).T
    torch.testing.assert_close(grad, expected)


def test_affine_clamp_bounds_the_log_scale():
    x = torch.zeros(3)
    params = torch.tensor([[1e6, 0.0], [-1e6, 0.0], [0.0, 0.0]])
    _, ladj = Affine(clamp=2.0).forward(x, params)
    torch.testing.assert_close(ladj, torch.tensor([2.0, -2.0, 0.0]))


@pytest.mark.parametrize("transformer", [Shift(), Affine()], ids=["shift", "affine"])
def test_elementwise_transformers_invert(transformer):
    x = torch.randn(6, 3, dtype=torch.float64)
    params = torch.randn(6, 3, transformer.n_params, dtype=torch.float64)
    y, ladj = transformer.forward(x, params)
    x_back, ladj_back = transformer.inverse(y, params)
    torch.testing.assert_close(x_back, x)
    torch.testing.assert_close(ladj_back, -ladj)


@pytest.mark.parametrize("dim", [1, 2, 5])
def test_alternate_masks_transform_every_entry_over_two_layers(dim):
    masks = coupling_masks(dim, 6, "alternate")
    assert all(m.any() for m in masks)
    assert (masks[0] | masks[1]).all()
    assert dim == 1 or not (masks[0] & masks[1]).any()  # two halves, each entry once


@pytest.mark.parametrize("dim", [1, 2, 5, 8])
def test_random_masks_transform_half_rounded_up_in_a_fresh_draw_per_layer(dim):
    torch.manual_seed(0)
    masks = coupling_masks(dim, 6, "random")
    assert all(int(m.sum()) == (dim + 1) // 2 for m in masks)
    if dim >= 5:  # C(5, 3) = 10 halves: six equal draws would be chance of 1e-5
        assert len({tuple(m.tolist()) for m in masks}) > 1


def test_coupling_leaves_the_conditioning_entries_unchanged():
    torch.manual_seed(0)
    layer = Coupling(torch.tensor([False, True, False, True]), Affine(), hidden=(8,))
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()
    x = torch.randn(5, 4)
    y, _ = layer.forward_and_log_det(x)
    assert torch.equal(y[:, [0, 2]], x[:, [0, 2]])
    assert not torch.allclose(y[:, [1, 3]], x[:, [1, 3]])


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_permute_is_index_select_with_its_gradient_and_twice_differentiable(compiled):
    # Compiled, permute's gradient is its own gather by the inverse (eager: index_select's).
    torch.manual_seed(0)
    order = torch.randperm(7)
    inverse = torch.argsort(order)
    fn = torch.compile(permute, backend="aot_eager", fullgraph=True) if compiled else permute
    x = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(4, 7, dtype=torch.float64)
    y = fn(x, order, inverse)
    torch.testing.assert_close(y, x.index_select(-1, order))
    got = torch.autograd.grad((y * weights).sum(), x, create_graph=True)[0]
    torch.testing.assert_close(got, weights.index_select(-1, inverse))
    assert torch.autograd.gradgradcheck(lambda v: _Permute.apply(v, order, inverse), (x,))


def test_affine_is_its_closed_form():
    x = torch.randn(5, 3, dtype=torch.float64)
    params = 4 * torch.randn(5, 3, 2, dtype=torch.float64)
    log_scale = 2.0 * torch.tanh(params[..., 0] / 2.0)
    y, ladj = Affine(clamp=2.0).forward(x, params)
    torch.testing.assert_close(y, x * log_scale.exp() + params[..., 1])
    torch.testing.assert_close(ladj, log_scale)
    x_back, ladj_back = Affine(clamp=2.0).inverse(y, params)
    torch.testing.assert_close(x_back, (y - params[..., 1]) / log_scale.exp())
    torch.testing.assert_close(ladj_back, -log_scale)


def test_coupling_refuses_an_empty_mask():
    with pytest.raises(ValueError, match="coupling mask must be a 1-D boolean tensor"):
        Coupling(torch.zeros(3, dtype=torch.bool), Affine())


class ForwardOnly(Flow):
    """A layer that states its inverse as unavailable (as a sampling-only layer would)."""

    inverse_method = "unavailable"

    def forward_and_log_det(self, x):
        return x + 1, x.new_zeros(x.shape[:-1])


def test_an_unavailable_direction_raises_a_named_error():
    stack = FlowStack([ForwardOnly(2), Planar(2)])
    assert stack.forward_method == "analytic"
    assert stack.inverse_method == "unavailable"
    q = FlowDistribution(dist.Normal(torch.zeros(2), 1.0).to_event(1), stack)
    assert q.rsample_and_log_prob((3,))[0].shape == (3, 2)
    with pytest.raises(NotInvertibleError, match="ForwardOnly has no inverse direction"):
        q.log_prob(torch.zeros(2))


def test_a_stack_reports_its_least_exact_layer():
    assert FlowStack([Radial(2), Planar(2)]).inverse_method == "numerical"
    assert FlowStack([Radial(2), LULinear(2)]).inverse_method == "analytic"


@pytest.mark.parametrize(
    ("layers", "error", "message"),
    [
        ([], ValueError, "needs at least one layer"),
        ([Planar(2), Planar(3)], ValueError, r"must share one dim, got \[2, 3\]"),
        ([torch.nn.Linear(2, 2)], TypeError, "must be pyroflows.Flow, got Linear"),
    ],
)
def test_flow_stack_refuses_bad_layers(layers, error, message):
    with pytest.raises(error, match=message):
        FlowStack(layers)


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("conditioner", ["data", "base"])
@pytest.mark.parametrize("order", [[0, 1, 2, 3], [2, 0, 3, 1]])
def test_autoregressive_jacobian_is_triangular_in_the_declared_order(
    conditioner, order, residual, device
):
    torch.manual_seed(0)
    layer = Autoregressive(
        4, Affine(), conditioner=conditioner, order=torch.tensor(order), residual=residual
    )
    layer = layer.to(device=device, dtype=torch.float64)
    with torch.no_grad():
        layer.net.gain.normal_()
    x = torch.randn(4, device=device, dtype=torch.float64)
    for primitive in (layer.forward_and_log_det, layer.inverse_and_log_det):
        jac = torch.autograd.functional.jacobian(lambda v, f=primitive: f(v)[0], x)
        permuted = jac[order][:, order]  # rows and columns in the declared order
        assert torch.equal(permuted.triu(1), torch.zeros_like(permuted))
        assert bool((permuted.tril(-1) != 0).any())  # and not merely diagonal
