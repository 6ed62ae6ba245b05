"""The flow contract, checked on every registered family against math, not against itself.

Families are discovered through the registry, so a newly registered family is tested here
with no new test code. Each flow is first given its data-dependent start
(``flow.initialize``) and then moved away from the identity, so that no check passes
trivially; the checks of Pyro's own transform tests run on fresh flows in training mode.
"""

from __future__ import annotations

import collections
import copy
import io
import sys

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormalizingFlow
from pyro.optim import Adam

import pyroflows
from pyroflows import FlowDistribution, build, list_flows
from pyroflows.transforms import NotInvertibleError, roots
from pyroflows.transforms.nn import MLP, MaskedMLP

FLOWS = list_flows()
# a CNF solves an ODE at float64 tolerances in every step: its training runs in CI's slow set
TRAINED = [pytest.param(name, marks=pytest.mark.slow) if name == "cnf" else name for name in FLOWS]
DIMS = (1, 4)
METHODS = {"analytic", "sequential", "numerical", "integrated", "unavailable"}


def fresh_flow(name, dim, device, dtype=torch.float64, seed=0):
    """A flow as built, moved off the identity, never started from data, in training mode."""
    torch.manual_seed(seed)
    flow = build(name, dim).to(device=device, dtype=dtype)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return flow.train()


def make_flow(name, dim, device, dtype=torch.float64, seed=0):
    """A flow started from data (``initialize``), then moved off where that left it."""
    torch.manual_seed(seed)
    flow = build(name, dim).to(device=device, dtype=dtype)
    flow.initialize(torch.randn(64, dim, device=device, dtype=dtype) * 2 + 1)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return flow


def standard_normal(dim, device, dtype=torch.float64):
    zeros = torch.zeros(dim, device=device, dtype=dtype)
    return dist.Normal(zeros, torch.ones_like(zeros)).to_event(1)


def directions(flow):
    """(name, primitive, method) for both directions of a flow."""
    return [
        ("forward", flow.forward_and_log_det, flow.forward_method),
        ("inverse", flow.inverse_and_log_det, flow.inverse_method),
    ]


def autograd_log_det(fn, points):
    """log|det J| of ``fn`` at each row of ``points``, by autograd and slogdet."""
    values = []
    for point in points:
        jac = torch.autograd.functional.jacobian(lambda v: fn(v)[0], point)
        values.append(torch.linalg.slogdet(jac)[1])
    return torch.stack(values)


@pytest.fixture(params=FLOWS)
def name(request):
    return request.param


def test_declared_methods_say_how_each_direction_is_computed(name, device, monkeypatch):
    """ "analytic": each network runs at most once and no root is searched; "sequential":
    some network runs once per dimension; "numerical": a root is searched; "integrated": an
    ODE solver evaluates a network many times (more than once per dimension), no root."""
    dim = 4
    flow = make_flow(name, dim, device)
    searches, net_calls = [0], collections.Counter()
    original = roots.solve_increasing

    def counted_search(*args, **kwargs):
        searches[0] += 1
        return original(*args, **kwargs)

    for module in list(sys.modules.values()):  # every module that imported the solver
        if getattr(module, "solve_increasing", None) is original:
            monkeypatch.setattr(module, "solve_increasing", counted_search)
    for net in flow.modules():
        if isinstance(net, (MLP, MaskedMLP)):
            net.register_forward_hook(lambda module, *_: net_calls.update([module]))
    for _, primitive, method in directions(flow):
        assert method in METHODS
        searches[0] = 0
        net_calls.clear()
        x = torch.randn(5, dim, device=device, dtype=torch.float64)
        if method == "unavailable":
            with pytest.raises(NotInvertibleError):
                primitive(x)
            continue
        primitive(x)
        most = max(net_calls.values(), default=0)
        assert (searches[0] > 0) == (method == "numerical")
        if method == "analytic":
            assert most <= 1
        if method == "sequential":
            assert most == dim
        if method == "integrated":
            assert most > dim


@pytest.mark.parametrize("dim", DIMS)
def test_log_det_matches_autograd_jacobian(name, dim, device):
    flow = make_flow(name, dim, device)
    points = torch.randn(4, dim, device=device, dtype=torch.float64) * 1.5
    for direction, primitive, method in directions(flow):
        if method == "unavailable":
            continue
        _, ladj = primitive(points)
        expected = autograd_log_det(primitive, points)
        torch.testing.assert_close(ladj, expected, rtol=1e-7, atol=1e-7, msg=direction)


@pytest.mark.parametrize("dim", DIMS)
def test_inverse_round_trip(name, dim, device):
    flow = make_flow(name, dim, device)
    if "unavailable" in (flow.forward_method, flow.inverse_method):
        pytest.skip(f"{name} states a direction as unavailable (checked by test_methods)")
    x = torch.randn(32, dim, device=device, dtype=torch.float64) * 2
    y, ladj = flow.forward_and_log_det(x)
    x_back, ladj_back = flow.inverse_and_log_det(y)
    torch.testing.assert_close(x_back, x, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(ladj_back, -ladj, rtol=1e-8, atol=1e-8)
    y2 = torch.randn(32, dim, device=device, dtype=torch.float64) * 2
    torch.testing.assert_close(flow.forward_and_log_det(flow.inverse_and_log_det(y2)[0])[0], y2)


def test_a_fresh_flow_is_one_function_whichever_method_comes_first(name, device):
    """Inverse first, then forward, on a fresh flow in training mode: the same map as a twin
    that ran forward first, and a round trip (no pass starts a layer from data)."""
    dim = 3
    inverse_first, forward_first = fresh_flow(name, dim, device), fresh_flow(name, dim, device)
    y = torch.randn(64, dim, device=device, dtype=torch.float64) * 3 + 2
    x = torch.randn(64, dim, device=device, dtype=torch.float64)
    forward_first.forward_and_log_det(x)
    x_back, ladj_back = inverse_first.inverse_and_log_det(y)
    torch.testing.assert_close(inverse_first.forward_and_log_det(x_back)[0], y)
    for a, b in zip(inverse_first.inverse_and_log_det(y), forward_first.inverse_and_log_det(y)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(ladj_back, forward_first.inverse_and_log_det(y)[1])


@pytest.mark.parametrize("dim", [2, 5])
def test_pyro_transform_harness(name, dim, device):
    """The three checks of Pyro's own transform tests, on a fresh flow in training mode,
    through torch's Transform API only (``_call``, ``_inverse``, ``log_abs_det_jacobian``):
    x -> y -> x, the log-det by central finite differences, and sample shapes."""
    flow = fresh_flow(name, dim, device)
    x = torch.randn(10, dim, device=device, dtype=torch.float64)
    y = flow._call(x)
    x_back = flow._inverse(y)
    assert (x_back - x).abs().max() < 1e-6
    assert (
        flow.log_abs_det_jacobian(x, y) - flow.log_abs_det_jacobian(x_back, y)
    ).abs().max() < 1e-6
    eps = 1e-5
    point = x[:1]
    jacobian = torch.stack(
        [
            (flow._call(point + eps / 2 * e) - flow._call(point - eps / 2 * e))[0] / eps
            for e in torch.eye(dim, device=device, dtype=torch.float64)
        ]
    )
    numeric = torch.linalg.slogdet(jacobian)[1]
    assert (flow.log_abs_det_jacobian(point, flow._call(point))[0] - numeric).abs() < 1e-4
    for batch in [(3,), (3, 4), (3, 4, 5)]:
        zeros = torch.zeros(*batch, dim, device=device, dtype=torch.float64)
        base = dist.Normal(zeros, torch.ones_like(zeros))
        assert dist.TransformedDistribution(base, [flow]).sample().shape == (*batch, dim)


def test_inverse_given_the_input_has_the_inverse_jacobian(name, device):
    """The inverse told its answer: that value, and the derivatives of the exact inverse."""
    flow = make_flow(name, 3, device)
    if flow.inverse_method == "unavailable":
        pytest.skip(f"{name} states its inverse as unavailable (checked by test_methods)")
    x = torch.randn(4, 3, device=device, dtype=torch.float64)
    y, ladj = flow.forward_and_log_det(x)
    x_given, ladj_given = flow.inverse_and_log_det_given(y, x)
    torch.testing.assert_close(x_given, x)
    torch.testing.assert_close(ladj_given, -ladj)
    for row in range(len(x)):  # d x / d y is the inverse of the forward Jacobian, by math
        forward_jac = torch.autograd.functional.jacobian(
            lambda v: flow.forward_and_log_det(v)[0], x[row]
        )
        given_jac = torch.autograd.functional.jacobian(
            lambda v, row=row: flow.inverse_and_log_det_given(v, x[row])[0], y[row].detach()
        )
        torch.testing.assert_close(given_jac, torch.linalg.inv(forward_jac))
    # and the parameter gradients of the exact inverse (the implicit function theorem)
    params = [p for p in flow.parameters() if p.requires_grad]
    weights = torch.randn(4, 4, device=device, dtype=torch.float64)
    y = y.detach()

    def gradient(x_out, ladj_out):
        loss = (weights[:, :3] * x_out).sum() + (weights[:, 3] * ladj_out).sum()
        return torch.autograd.grad(loss, params, allow_unused=True)

    exact = gradient(*flow.inverse_and_log_det(y))
    given = gradient(*flow.inverse_and_log_det_given(y, x))
    for e, g in zip(exact, given, strict=True):
        assert (e is None) == (g is None)
        if e is not None:
            torch.testing.assert_close(g, e)


def test_forward_and_grad_is_the_gradient_of_the_log_density(name, device):
    """The gradient of log p0 pushed through the flow equals autograd's gradient of log q."""
    flow = make_flow(name, 3, device)
    if flow.inverse_method == "unavailable":
        pytest.skip(f"{name} states its inverse as unavailable (checked by test_methods)")
    base = standard_normal(3, device)
    q = FlowDistribution(base, flow)
    x = torch.randn(5, 3, device=device, dtype=torch.float64)
    y, grad = flow.forward_and_grad(x, -x)  # the standard normal's gradient of log p
    torch.testing.assert_close(y, flow.forward_and_log_det(x)[0])
    y = y.detach().requires_grad_(True)
    (expected,) = torch.autograd.grad(q.log_prob(y).sum(), y)
    torch.testing.assert_close(grad, expected)
    assert not grad.requires_grad


def test_torch_transform_api_agrees_with_primitives(name, device):
    flow = make_flow(name, 3, device)
    x = torch.randn(6, 3, device=device, dtype=torch.float64)
    y, ladj = flow.forward_and_log_det(x)
    torch.testing.assert_close(flow(x), y)
    torch.testing.assert_close(flow.log_abs_det_jacobian(x, y), ladj)
    torch.testing.assert_close(flow.inv(y), x)
    torch.testing.assert_close(flow.inv.log_abs_det_jacobian(y, x), -ladj)


def test_flow_distribution_log_prob_is_base_plus_log_det(name, device):
    dim = 3
    flow = make_flow(name, dim, device)
    base = standard_normal(dim, device)
    q = FlowDistribution(base, flow)
    x = torch.randn(5, dim, device=device, dtype=torch.float64)
    y = flow(x)
    expected = base.log_prob(x) - autograd_log_det(flow.forward_and_log_det, x)
    torch.testing.assert_close(q.log_prob(y), expected)
    torch.testing.assert_close(dist.TransformedDistribution(base, [flow]).log_prob(y), expected)
    samples, log_q = q.rsample_and_log_prob((7,))
    torch.testing.assert_close(log_q, q.log_prob(samples))


def test_works_inside_pyro_compose_transform_module(name, device):
    dim = 3
    first, second = make_flow(name, dim, device), make_flow(name, dim, device, seed=1)
    composed = dist.transforms.ComposeTransformModule([first, second])
    assert {id(p) for p in composed.parameters()} == {
        id(p) for p in [*first.parameters(), *second.parameters()]
    }
    base = standard_normal(dim, device)
    x = torch.randn(5, dim, device=device, dtype=torch.float64)
    y = composed(x)
    expected = base.log_prob(x) - autograd_log_det(lambda v: (composed(v), None), x)
    torch.testing.assert_close(
        dist.TransformedDistribution(base, [composed]).log_prob(y), expected
    )


@pytest.mark.parametrize("batch_shape", [(), (3,), (3, 4)], ids=["scalar", "3", "3x4"])
def test_batch_shapes(name, batch_shape, device):
    dim = 3
    flow = make_flow(name, dim, device)
    x = torch.randn(*batch_shape, dim, device=device, dtype=torch.float64)
    flat = x.reshape(-1, dim)
    for _, primitive, method in directions(flow):
        if method == "unavailable":
            continue
        out, ladj = primitive(x)
        assert out.shape == x.shape and ladj.shape == batch_shape
        out_flat, ladj_flat = primitive(flat)
        torch.testing.assert_close(out, out_flat.reshape(x.shape))
        torch.testing.assert_close(ladj, ladj_flat.reshape(batch_shape))
    q = FlowDistribution(standard_normal(dim, device), flow)
    assert q.log_prob(x).shape == batch_shape
    assert q.rsample_and_log_prob(batch_shape)[1].shape == batch_shape


def test_gradients_reach_every_parameter(name, device):
    dim = 3
    flow = make_flow(name, dim, device)
    q = FlowDistribution(standard_normal(dim, device), flow)
    data = torch.randn(16, dim, device=device, dtype=torch.float64) * 2
    loss = -q.log_prob(data).sum() + q.rsample_and_log_prob((16,))[1].sum()
    loss.backward()
    for pname, p in flow.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().max() > 0, pname


def test_float32_agrees_with_float64(name, device):
    dim = 3
    flow64 = make_flow(name, dim, device)
    flow32 = copy.deepcopy(flow64).float()
    x = torch.randn(8, dim, device=device, dtype=torch.float64)
    for (_, p64, method), (_, p32, _) in zip(directions(flow64), directions(flow32)):
        if method == "unavailable":
            continue
        out64, ladj64 = p64(x)
        out32, ladj32 = p32(x.float())
        assert out32.dtype == ladj32.dtype == torch.float32
        torch.testing.assert_close(out32, out64.float(), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ladj32, ladj64.float(), rtol=1e-4, atol=1e-4)


def test_state_dict_round_trip(name, device):
    dim = 3
    flow = make_flow(name, dim, device)
    buffer = io.BytesIO()
    torch.save(flow.state_dict(), buffer)
    buffer.seek(0)
    fresh = build(name, dim).to(device=device, dtype=torch.float64)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    y = torch.randn(8, dim, device=device, dtype=torch.float64)
    for (_, original, method), (_, loaded, _) in zip(directions(flow), directions(fresh)):
        if method == "unavailable":
            continue
        for a, b in zip(original(y), loaded(y)):
            assert torch.equal(a, b)


def test_plain_modules_deepcopy_and_pyro_module(name, device):
    """Every parameter is an nn.Parameter of a submodule: a deep copy is the same function
    with its own tensors, and pyro.module registers each parameter under its own name."""
    flow = make_flow(name, 3, device)
    twin = copy.deepcopy(flow)
    y = torch.randn(5, 3, device=device, dtype=torch.float64)
    torch.testing.assert_close(twin.inverse_and_log_det(y), flow.inverse_and_log_det(y))
    assert not {id(p) for p in twin.parameters()} & {id(p) for p in flow.parameters()}
    assert len(flow.state_dict()) == len(dict(flow.named_parameters())) + len(
        dict(flow.named_buffers())
    )
    pyro.clear_param_store()
    pyro.module("f", flow)
    names = {n.removeprefix("f$$$") for n in pyro.get_param_store().keys()}
    assert names == {n for n, _ in flow.named_parameters()}


def test_to_device_and_dtype_move_everything(name, device):
    flow = build(name, 3).to(device=device, dtype=torch.float64)
    for tname, tensor in [*flow.named_parameters(), *flow.named_buffers()]:
        assert tensor.device.type == device.type, tname
        if tensor.is_floating_point():
            assert tensor.dtype == torch.float64, tname
    x = torch.randn(4, 3, device=device, dtype=torch.float64)
    y, ladj = flow.forward_and_log_det(x)
    assert y.device.type == ladj.device.type == device.type
    assert y.dtype == ladj.dtype == torch.float64


def test_no_stale_values_after_an_optimiser_step(name, device):
    dim = 3
    flow = make_flow(name, dim, device)
    base = standard_normal(dim, device)
    y = flow(torch.randn(8, dim, device=device, dtype=torch.float64)).detach()
    pyro_dist = dist.TransformedDistribution(base, [flow])
    before = pyro_dist.log_prob(y)
    optimiser = torch.optim.SGD(flow.parameters(), lr=0.05)
    (-before.sum()).backward()
    optimiser.step()
    reference = copy.deepcopy(flow)
    after = pyro_dist.log_prob(y)
    torch.testing.assert_close(after, FlowDistribution(base, reference).log_prob(y.clone()))
    assert not torch.allclose(after, before)


@pytest.mark.parametrize("name", TRAINED)
def test_svi_with_pyro_module_lowers_the_loss(name, device):
    dim = 2
    torch.manual_seed(0)
    flow = build(name, dim).to(device=device, dtype=torch.float64)
    data = torch.randn(256, dim, device=device, dtype=torch.float64) * torch.tensor(
        [0.5, 2.0], device=device, dtype=torch.float64
    ) + torch.tensor([1.0, -1.0], device=device, dtype=torch.float64)
    base = standard_normal(dim, device)

    def model(data):
        pyro.module("flow", flow)
        with pyro.plate("rows", len(data)):
            pyro.sample("obs", FlowDistribution(base, flow), obs=data)

    def guide(data):
        """No latent sites: SVI with this guide maximises the likelihood."""

    # Every family starts at the identity (actnorm jumps to the data's moments on its first
    # inverse pass), so the loss to beat is the data's negative log-density under the base.
    identity_loss = -base.log_prob(data).sum().item()
    svi = SVI(model, guide, Adam({"lr": 0.02}), Trace_ELBO())
    losses = [svi.step(data) for _ in range(40)]
    assert sum(losses[-5:]) / 5 < 0.9 * identity_loss, losses
    assert losses[-1] <= min(losses[:5]) + 1e-6, losses


def test_usable_in_pyro_autonormalizingflow(name, device):
    y = torch.tensor([0.5, 1.5, 2.0], device=device, dtype=torch.float64)

    def model():
        loc = pyro.sample(
            "loc", dist.Normal(torch.zeros((), device=device, dtype=torch.float64), 3.0)
        )
        scale = pyro.sample(
            "scale", dist.LogNormal(torch.zeros((), device=device, dtype=torch.float64), 1.0)
        )
        with pyro.plate("data", 3):
            pyro.sample("y", dist.Normal(loc, scale), obs=y)

    guide = AutoNormalizingFlow(
        model, lambda d: pyroflows.build(name, d).to(device=device, dtype=torch.float64)
    )
    svi = SVI(model, guide, Adam({"lr": 0.01}), Trace_ELBO())
    losses = [svi.step() for _ in range(5)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert set(guide().keys()) == {"loc", "scale"}
