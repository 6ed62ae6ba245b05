"""FlowDistribution as a Pyro distribution."""

from __future__ import annotations

import copy

import pyro
import pyro.distributions as dist
import pytest
import torch

import pyroflows
from pyroflows import FlowDistribution, FlowStack
from pyroflows.inference.vi import posterior_flow


def normal(dim, device):
    return dist.Normal(torch.zeros(dim, device=device), torch.ones(dim, device=device)).to_event(1)


def test_identity_flow_gives_the_base_density(device):
    q = FlowDistribution(normal(3, device), pyroflows.build("realnvp", 3).to(device))
    y = torch.randn(10, 3, device=device)
    torch.testing.assert_close(q.log_prob(y), normal(3, device).log_prob(y))


def test_a_known_affine_flow_gives_the_known_gaussian(device):
    # actnorm with shift m and log-scale s pushes N(0, I) to N(m, diag(e^{2s})).
    flow = pyroflows.build("actnorm", 2).to(device).eval()  # eval: no data-dependent start
    with torch.no_grad():
        flow[0].shift.copy_(torch.tensor([1.0, -2.0]))
        flow[0].log_scale.copy_(torch.tensor([0.5, -1.0]))
    q = FlowDistribution(normal(2, device), flow)
    target = dist.Normal(
        torch.tensor([1.0, -2.0], device=device), torch.tensor([0.5, -1.0], device=device).exp()
    ).to_event(1)
    y = torch.randn(20, 2, device=device) * 3
    torch.testing.assert_close(q.log_prob(y), target.log_prob(y))


def test_sample_has_no_grad_and_rsample_does(device):
    q = FlowDistribution(normal(2, device), pyroflows.build("realnvp", 2).to(device))
    assert not q.sample((3,)).requires_grad
    assert q.rsample((3,)).requires_grad
    assert q.sample((3, 4)).shape == (3, 4, 2)


def test_expand_gives_batch_shape_inside_a_plate(device):
    flow = pyroflows.build("planar", 2).to(device)
    data = torch.randn(7, 2, device=device)

    def model():
        with pyro.plate("rows", 7):
            return pyro.sample("y", FlowDistribution(normal(2, device), flow), obs=data)

    trace = pyro.poutine.trace(model).get_trace()
    site = trace.nodes["y"]
    assert site["fn"].batch_shape == (7,)
    assert site["fn"].log_prob(data).shape == (7,)
    trace.compute_log_prob()
    assert site["log_prob"].shape == (7,)


def test_validation_rejects_nan(device):
    q = FlowDistribution(normal(2, device), pyroflows.build("realnvp", 2).to(device))
    with pytest.raises(ValueError, match="support"):
        q.log_prob(torch.tensor([float("nan"), 0.0], device=device))


def test_mismatched_event_shape_is_refused():
    with pytest.raises(
        ValueError, match=r"base event_shape \(3,\) does not match the flow's dim 2"
    ):
        FlowDistribution(normal(3, "cpu"), pyroflows.build("realnvp", 2))


def test_scalar_base_is_refused():
    with pytest.raises(ValueError, match="to_event"):
        FlowDistribution(dist.Normal(0.0, 1.0), pyroflows.build("realnvp", 1))


def test_non_flow_transform_is_refused():
    with pytest.raises(TypeError, match=r"transform must be a pyroflows\.Flow"):
        FlowDistribution(normal(2, "cpu"), dist.transforms.ExpTransform())


def test_log_prob_of_a_draw_runs_the_inverse_and_keeps_nothing(device):
    """No draw is remembered: log_prob of the very tensor just drawn runs the inverse, and
    after an optimiser step it is the new density of that point."""
    torch.manual_seed(0)
    flow = pyroflows.build("planar", 3).to(device)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.5 * torch.randn_like(p))
    q = FlowDistribution(normal(3, device), flow)
    state = dict(vars(q))
    y, log_q = q.rsample_and_log_prob((5,))
    assert vars(q) == state  # nothing kept between calls
    scored = q.log_prob(y)
    assert scored is not log_q
    torch.testing.assert_close(scored, log_q, rtol=1e-5, atol=1e-5)
    optimiser = torch.optim.SGD(flow.parameters(), lr=0.5)
    (-scored.sum()).backward()
    optimiser.step()
    after = q.log_prob(y)
    torch.testing.assert_close(
        after, FlowDistribution(normal(3, device), flow).log_prob(y.clone())
    )
    assert not torch.allclose(after, log_q)


@pytest.mark.parametrize("name", ["planar", "realnvp", "sylvester"])
def test_stl_gradient_is_zero_for_every_draw_when_q_is_the_target(name, device):
    """A flow away from the identity, scored against its own frozen copy: the path
    derivative (Roeder et al. 2017) vanishes draw by draw; the plain gradient does not.
    planar pushes the gradient in closed form, the others by autograd through the inverse
    (sylvester's told its input, one Newton step)."""
    torch.manual_seed(0)
    flow = FlowStack(posterior_flow(name, torch.tensor([0.5, -1.0, 2.0]), 0.7))
    flow = flow.to(device=device, dtype=torch.float64)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.3 * torch.randn_like(p))
    zeros = torch.zeros(3, device=device, dtype=torch.float64)
    base = dist.Normal(zeros, 1.0).to_event(1)
    target = FlowDistribution(base, copy.deepcopy(flow).requires_grad_(False))
    params = list(flow.parameters())
    for stl in (False, True):
        q = FlowDistribution(base, flow, stl=stl)
        z, log_q = q.rsample_and_log_prob((16,))
        with torch.no_grad():
            torch.testing.assert_close(log_q, target.log_prob(z))
        for row in range(3):  # one draw at a time
            grads = torch.autograd.grad(
                log_q[row] - target.log_prob(z)[row], params, retain_graph=True
            )
            largest = max(g.abs().max().item() for g in grads)
            assert largest < 1e-9 if stl else largest > 1e-3
