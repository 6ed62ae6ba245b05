"""Conditional flows: every family with a conditional form, run with a context.

Families are discovered through the registry (those whose builder takes ``context``), so a
new conditional family is tested here with no new test code.
"""

from __future__ import annotations

import pyro.distributions as dist
import pytest
import torch

import pyroflows
from pyroflows import FlowDistribution, build, list_flows
from pyroflows.transforms import Flow, FlowStack, registry
from pyroflows.transforms.registry import family_options

CONDITIONAL = [n for n in list_flows() if "context" in family_options(n)]


class Shift1(Flow):
    """y = x + 1: a layer with nothing to condition."""

    def forward_and_log_det(self, x):
        return x + 1, x.new_zeros(x.shape[:-1])

    def inverse_and_log_det(self, y):
        return y - 1, y.new_zeros(y.shape[:-1])


DIM, CONTEXT = 3, 2


def make_flow(name, device, seed=0):
    torch.manual_seed(seed)
    flow = build(name, DIM, context=CONTEXT).to(device=device, dtype=torch.float64)
    data = torch.randn(64, DIM, device=device, dtype=torch.float64)
    flow.inverse_and_log_det(data, context=torch.randn(64, CONTEXT, device=device).double())
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return flow


def randn(*shape, device):
    return torch.randn(*shape, device=device, dtype=torch.float64)


@pytest.fixture(params=CONDITIONAL)
def name(request):
    return request.param


def test_every_built_in_family_has_a_conditional_form():
    built_in = {"planar", "radial", "sylvester", "nice", "realnvp", "glow", "actnorm", "linear"}
    built_in |= {"maf", "iaf", "nsf", "nsf_ar"}
    assert built_in <= set(CONDITIONAL)


def test_log_det_matches_the_autograd_jacobian_at_a_fixed_context(name, device):
    flow = make_flow(name, device)
    context = randn(CONTEXT, device=device)
    conditioned = flow.condition(context)
    for primitive in (conditioned.forward_and_log_det, conditioned.inverse_and_log_det):
        for point in randn(3, DIM, device=device):
            jac = torch.autograd.functional.jacobian(lambda v, f=primitive: f(v)[0], point)
            torch.testing.assert_close(primitive(point)[1], torch.linalg.slogdet(jac)[1])


def test_round_trip_and_the_context_is_used(name, device):
    flow = make_flow(name, device)
    x, c1 = randn(5, DIM, device=device), randn(5, CONTEXT, device=device)
    c2 = c1 + 1.0
    y, ladj = flow.forward_and_log_det(x, context=c1)
    x_back, ladj_back = flow.inverse_and_log_det(y, context=c1)
    torch.testing.assert_close(x_back, x)
    torch.testing.assert_close(ladj_back, -ladj)
    # told its answer, the inverse has the exact inverse's value and derivatives in y
    y = y.detach().requires_grad_(True)
    weights = randn(5, DIM + 1, device=device)
    grads = []
    for x_out, ladj_out in (
        flow.inverse_and_log_det(y, context=c1),
        flow.inverse_and_log_det_given(y, x, context=c1),
    ):
        loss = (weights[:, :DIM] * x_out).sum() + (weights[:, DIM] * ladj_out).sum()
        grads.append(torch.autograd.grad(loss, y)[0])
    torch.testing.assert_close(flow.inverse_and_log_det_given(y, x, context=c1)[0], x)
    torch.testing.assert_close(grads[1], grads[0])
    assert not torch.allclose(flow.forward_and_log_det(x, context=c2)[0], y)
    # Every output entry depends on the context (the first of an autoregressive order too),
    # and gradients reach it (amortised inference trains an encoder through it).
    context = c1[0].clone().requires_grad_(True)
    jac = torch.autograd.functional.jacobian(
        lambda c: flow.forward_and_log_det(x[0], context=c)[0], context
    )
    assert bool((jac.abs().sum(-1) > 0).all())


@pytest.mark.parametrize(
    "x_shape, context_shape, out_shape",
    [
        ((5,), (5,), (5,)),
        ((), (4,), (4,)),
        ((5,), (), (5,)),
        ((2, 1), (3,), (2, 3)),
        ((2, 3), (1, 3), (2, 3)),
    ],
)
def test_context_batch_shapes_broadcast(name, x_shape, context_shape, out_shape, device):
    flow = make_flow(name, device)
    x = randn(*x_shape, DIM, device=device)
    context = randn(*context_shape, CONTEXT, device=device)
    for primitive in (flow.forward_and_log_det, flow.inverse_and_log_det):
        out, ladj = primitive(x, context=context)
        assert out.shape == (*out_shape, DIM) and ladj.shape == out_shape
    # each row of a batch equals the same row computed alone
    y, _ = flow.forward_and_log_det(x, context=context)
    index = (0,) * len(out_shape)
    alone_x = x.expand(*out_shape, DIM)[index]
    alone_c = context.expand(*out_shape, CONTEXT)[index]
    torch.testing.assert_close(flow.forward_and_log_det(alone_x, context=alone_c)[0], y[index])


def test_flow_distribution_of_a_conditioned_flow(name, device):
    flow = make_flow(name, device)
    context = randn(4, CONTEXT, device=device)
    zeros = torch.zeros(DIM, device=device, dtype=torch.float64)
    base = dist.Normal(zeros, 1.0).to_event(1)
    q = FlowDistribution(base, flow.condition(context))
    assert q.batch_shape == (4,)
    y = q.sample((6,))
    assert y.shape == (6, 4, DIM)
    x, ladj = flow.inverse_and_log_det(y, context=context)
    torch.testing.assert_close(q.log_prob(y), base.log_prob(x) + ladj)
    y, log_q = FlowDistribution(base, flow.condition(context), stl=True).rsample_and_log_prob((6,))
    x, ladj = flow.inverse_and_log_det(y, context=context)
    torch.testing.assert_close(log_q, base.log_prob(x) + ladj)


def test_misuse_is_refused_with_a_clear_error(device, monkeypatch):
    # a family without a conditional form, registered for this test only
    monkeypatch.setattr(registry, "_FAMILIES", dict(registry._FAMILIES))

    @pyroflows.register_flow("test_fixed_shift")
    def fixed_shift(dim):
        return FlowStack([Shift1(dim)])

    with pytest.raises(ValueError, match=r"no conditional form; conditional families: .*realnvp"):
        build("test_fixed_shift", DIM, context=CONTEXT)
    flow = build("realnvp", DIM, context=CONTEXT)
    with pytest.raises(ValueError, match="conditional: pass context"):
        flow.forward_and_log_det(torch.randn(2, DIM))
    with pytest.raises(ValueError, match="context has 5 features"):
        flow.condition(torch.randn(2, 5))
    with pytest.raises(ValueError, match="not conditional"):
        pyroflows.build("realnvp", DIM).condition(torch.randn(2, CONTEXT))


@pytest.mark.parametrize("name", [n for n in CONDITIONAL if "order" in family_options(n)])
def test_one_autoregressive_layer_gives_every_entry_the_context(name, device):
    # The first entry of the order has no earlier entries: only degree-0 hidden units
    # (conditional MADE) bring it the context.
    torch.manual_seed(0)
    flow = build(name, DIM, layers=1, context=CONTEXT).to(device=device, dtype=torch.float64)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.2 * torch.randn_like(p))
    x = randn(DIM, device=device)
    jac = torch.autograd.functional.jacobian(
        lambda c: flow.forward_and_log_det(x, context=c)[0], randn(CONTEXT, device=device)
    )
    assert bool((jac.abs().sum(-1) > 0).all())
