"""Packed flows: one parameter tensor, the same map, for every registered family."""

from __future__ import annotations

import io

import pytest
import torch

from pyroflows import build, list_flows
from pyroflows.transforms import Packed


def moved_flow(name, device, dim=3, seed=0):
    torch.manual_seed(seed)
    flow = build(name, dim).to(device=device, dtype=torch.float64)
    flow.inverse_and_log_det(torch.randn(32, dim, device=device, dtype=torch.float64))
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return flow


@pytest.mark.parametrize("name", list_flows())
def test_packed_flow_is_the_same_map_with_the_same_gradients(name, device):
    flow = moved_flow(name, device)
    reference = moved_flow(name, device)  # the same flow, left unpacked
    packed = Packed(flow)
    assert [n for n, _ in packed.named_parameters()] == ["flat"]
    assert packed.flat.numel() == sum(p.numel() for p in reference.parameters())
    assert (packed.forward_method, packed.inverse_method) == (
        reference.forward_method,
        reference.inverse_method,
    )
    x = torch.randn(5, 3, device=device, dtype=torch.float64)
    for got, want in [
        (packed.forward_and_log_det(x), reference.forward_and_log_det(x)),
        (packed.inverse_and_log_det(x), reference.inverse_and_log_det(x)),
    ]:
        torch.testing.assert_close(got, want)
    y, ladj = packed.forward_and_log_det(x)
    (y.square().sum() + ladj.sum()).backward()
    y, ladj = reference.forward_and_log_det(x)
    (y.square().sum() + ladj.sum()).backward()
    expected = torch.cat([p.grad.reshape(-1) for p in reference.parameters()])
    torch.testing.assert_close(packed.flat.grad, expected)


@pytest.mark.parametrize("name", ["realnvp", "planar"])
def test_packed_flow_follows_its_flat_vector_state_dict_and_dtype(name, device):
    packed = Packed(moved_flow(name, device))
    x = torch.randn(5, 3, device=device, dtype=torch.float64)
    before = packed.forward_and_log_det(x)[0]
    with torch.no_grad():
        packed.flat.add_(0.1)  # an optimiser step: no stale views
    assert not torch.allclose(packed.forward_and_log_det(x)[0], before)

    buffer = io.BytesIO()
    torch.save(packed.state_dict(), buffer)
    buffer.seek(0)
    fresh = Packed(moved_flow(name, device, seed=1))
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    torch.testing.assert_close(fresh.forward_and_log_det(x), packed.forward_and_log_det(x))

    single = packed.float()
    assert single.forward_and_log_det(x.float())[0].dtype == torch.float32
