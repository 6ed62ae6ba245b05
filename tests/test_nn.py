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
    grad = net.params.grad
    last = 5 * 8  # the last weight (5 x 8), then its bias (5), then the gain (5)
    assert grad[-5:].abs().min() > 0  # the gain learns first, then the weights
    assert grad[-(5 + 5 + last) : -10].abs().sum() == 0
    assert grad[: -(5 + 5 + last)].abs().sum() == 0


def test_mlp_is_one_parameter_vector_of_linear_layers():
    torch.manual_seed(0)
    net = MLP(3, 2, hidden=(4,), activation="tanh")
    assert [name for name, _ in net.named_parameters()] == ["params"]
    with torch.no_grad():
        net.gain.fill_(1.0)
    (w0, b0), (w1, b1) = net.weights()
    x = torch.randn(6, 3)
    expected = torch.tanh(x @ w0.T + b0) @ w1.T + b1
    torch.testing.assert_close(net(x), expected)
    assert net.params.numel() == 4 * 3 + 4 + 2 * 4 + 2 + 2


def test_mlp_with_no_inputs_is_a_learned_constant():
    net = MLP(0, 3)
    out = net(torch.zeros(4, 2, 0))
    assert out.shape == (4, 2, 3)
    out.sum().backward()
    torch.testing.assert_close(net.params.grad, torch.full((3,), 8.0))


def test_mlp_widths():
    net = MLP(3, 2, hidden=(16, 32, 8))
    shapes = [w.shape for w, _ in net.weights()]
    assert shapes == [(16, 3), (32, 16), (8, 32), (2, 8)]


def test_mlp_bad_activation_lists_choices():
    with pytest.raises(ValueError, match="activation must be one of 'relu'"):
        MLP(2, 2, activation="swish")
