"""The parameter networks."""

from __future__ import annotations

import pytest
import torch

from pyroflows.transforms.nn import ACTIVATIONS, MLP


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_mlp_starts_at_zero_and_learns(activation):
    net = MLP(3, 5, hidden=(8, 8), activation=activation)
    x = torch.randn(4, 3)
    assert torch.equal(net(x), torch.zeros(4, 5))
    net(x).sum().backward()
    assert net.gain.grad.abs().min() > 0  # the gain learns first, then the weights
    assert net.net[-1].weight.grad.abs().sum() == 0


def test_mlp_with_no_inputs_is_a_learned_constant():
    net = MLP(0, 3)
    out = net(torch.zeros(4, 2, 0))
    assert out.shape == (4, 2, 3)
    out.sum().backward()
    torch.testing.assert_close(net.constant.grad, torch.full((3,), 8.0))


def test_mlp_widths():
    net = MLP(3, 2, hidden=(16, 32, 8))
    shapes = [m.weight.shape for m in net.net if isinstance(m, torch.nn.Linear)]
    assert shapes == [(16, 3), (32, 16), (8, 32), (2, 8)]


def test_mlp_bad_activation_lists_choices():
    with pytest.raises(ValueError, match="activation must be one of 'relu'"):
        MLP(2, 2, activation="swish")
