"""The parameter networks."""

from __future__ import annotations

import pytest
import torch

from pyroflows.transforms.nn import ACTIVATIONS, GROUP_MAJOR_MAX, MLP, MaskedMLP


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


def assert_same_values_and_gradients(got, expected, inputs):
    """``got`` equals ``expected``, and so do the gradients of a random weighting of both
    with respect to ``inputs``."""
    torch.testing.assert_close(got, expected)
    weights = torch.randn_like(expected)
    for a, b in zip(
        torch.autograd.grad((got * weights).sum(), inputs, retain_graph=True),
        torch.autograd.grad((expected * weights).sum(), inputs, retain_graph=True),
        strict=True,
    ):
        torch.testing.assert_close(a, b)


def textbook_mlp(net, x, act):
    """``g * (W_last act(... act(W_0 x + b_0) ...) + b_last)`` from ``net``'s weights."""
    *hidden, (weight, bias) = net.weights()
    for w, b in hidden:
        x = act(x @ w.T + b)
    return net.gain * (x @ weight.T + bias)


def textbook_made(net, x, residual=False):
    """The same for a MADE: masked weights, ReLU, a residual sum after the first layer."""
    *hidden, last = net.layers
    for i, layer in enumerate(hidden):
        out = torch.relu(x @ (layer.weight * layer.mask).T + layer.bias)
        x = x + out if residual and i > 0 else out
    out = net.gain * (x @ (last.weight * last.mask).T + last.bias)
    return out.unflatten(-1, (net.features, net.out_per_input))


def randomised(net):
    """``net`` in float64 with a random gain (it starts at 0, hiding every other weight)."""
    net = net.double()
    with torch.no_grad():
        net.gain.normal_()
    return net


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_mlp_equals_the_textbook_network_with_its_gradients(activation):
    # The forward pass overwrites ReLU's input and folds the gain into the last weights;
    # values and gradients must stay those of g * (W2 act(W1 act(W0 x + b0) + b1) + b2).
    torch.manual_seed(0)
    net = randomised(MLP(3, 2, hidden=(5, 4), activation=activation))
    x = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    expected = textbook_mlp(net, x, ACTIVATIONS[activation]())
    assert_same_values_and_gradients(net(x), expected, [x, net.params])
    assert torch.autograd.gradgradcheck(lambda v: net(v), (x,))


@pytest.mark.parametrize("residual", [False, True])
def test_masked_mlp_equals_the_textbook_network(residual):
    torch.manual_seed(1)
    net = randomised(MaskedMLP(4, 2, hidden=(6, 6), residual=residual))
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    expected = textbook_made(net, x, residual)
    assert_same_values_and_gradients(net(x), expected, [x, *net.parameters()])


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("groups", [2, 5])
@pytest.mark.parametrize("net", ["mlp", "made"])
def test_grouped_outputs_are_the_same_numbers_group_major_when_compiled(net, groups, compiled):
    """Compiled, an affine layer's two parameters lie group-major (one parameter of every
    entry contiguous); a spline's many lie entry-major (one entry's contiguous), as in
    eager mode; the numbers and their gradients are the textbook network's in all cases."""
    torch.manual_seed(2)
    if net == "mlp":
        module = randomised(MLP(3, 4 * groups, hidden=(6,)))
        x = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
        expected = textbook_mlp(module, x, torch.relu).unflatten(-1, (4, groups))
        got = run(module, compiled)(x, groups=groups)
    else:
        module = randomised(MaskedMLP(4, groups, hidden=(6,)))
        x = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
        expected, got = textbook_made(module, x), run(module, compiled)(x)
    major = compiled and groups <= GROUP_MAJOR_MAX
    assert got.stride()[-2:] == ((1, 4) if major else (groups, 1))
    assert_same_values_and_gradients(got, expected, [x, *module.parameters()])


def run(module: torch.nn.Module, compiled: bool):
    """``module``, or its graph as dynamo traces it (run by the eager backend: the layout
    of the traced operations, no code generation)."""
    return torch.compile(module, backend="eager", fullgraph=True) if compiled else module
