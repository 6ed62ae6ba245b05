"""Networks that predict the parameters of flow layers."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from pyroflows._checks import check_choice, check_widths

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "elu": nn.ELU,
    "silu": nn.SiLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
}


class MLP(nn.Module):
    r"""A multi-layer perceptron whose output starts at zero: :math:`g \odot \mathrm{net}(x)`.

    Flow layers read their parameters from its output and are built so that zero parameters
    give the identity map, so every network-driven layer starts as the identity. The output
    is the usual network scaled by a learned per-output gain :math:`g` that starts at 0
    (ReZero, Bachlechner et al. 2020) rather than a last layer that starts at zero: with
    Adam every weight moves by about the learning rate per step, so a zero last layer of
    fan-in :math:`h` can move an output by about :math:`h` times the learning rate per step,
    which throws flow guides off at the learning rates variational inference uses; a gain
    moves it by about the learning rate. With no inputs (``in_features=0``) the network is
    a learned constant vector. ``net(x, groups=k)`` returns the outputs as
    ``(..., out_features // k, k)``, entry :math:`i`'s ``k`` outputs in row :math:`i`, held
    in group-major memory when compiled (:func:`grouped_linear`).

    All weights, biases and the gain are one parameter vector, ``params`` (layer by layer:
    weight, then bias; the gain last), read through views (:meth:`weights`, :attr:`gain`):
    Pyro's optimisers step tensor by tensor and ``pyro.module`` registers each one per
    call, so a flow guide of dozens of small tensors would spend most of an SVI step in
    that bookkeeping. Weights and biases start as :class:`torch.nn.Linear`'s, uniform in
    :math:`\pm 1/\sqrt{\text{fan-in}}`.

    References:
        ReZero is All You Need: Fast Convergence at Large Depth (Bachlechner et al., 2020)
        https://arxiv.org/abs/2003.04887

    Example:
        >>> import torch
        >>> net = MLP(3, 4, hidden=(16, 16))
        >>> net(torch.randn(5, 3)).abs().max().item()
        0.0
        >>> [tuple(w.shape) for w, _ in net.weights()]
        [(16, 3), (16, 16), (4, 16)]
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        hidden: Sequence[int] = (64, 64),
        activation: str = "relu",
    ) -> None:
        super().__init__()
        hidden = check_widths("hidden", hidden)
        self.act = ACTIVATIONS[check_choice("activation", activation, list(ACTIVATIONS))]()
        self.out_features = out_features
        widths = (in_features, *hidden, out_features) if in_features else (out_features,)
        self.shapes = [((b, a), (b,)) for a, b in itertools.pairwise(widths)]
        self.sizes = [*(math.prod(s) for pair in self.shapes for s in pair), out_features]
        parts = []
        for (fan_out, fan_in), _ in self.shapes:
            bound = 1 / math.sqrt(fan_in)
            parts.append(torch.empty(fan_out * (fan_in + 1)).uniform_(-bound, bound))
        self.params = nn.Parameter(torch.cat([*parts, torch.zeros(out_features)]))

    @property
    def gain(self) -> Tensor:
        """The output gain :math:`g` (with no inputs: the constant output itself)."""
        return self.params[-self.out_features :]

    def weights(self) -> list[tuple[Tensor, Tensor]]:
        """``(weight, bias)`` of each linear layer, as views of :attr:`params`."""
        return self._views()[0]

    def _views(self) -> tuple[list[tuple[Tensor, Tensor]], Tensor]:
        """The layers' ``(weight, bias)`` and the gain, by one split of :attr:`params`."""
        *parts, gain = self.params.split(self.sizes)
        layers = [
            (weight.view(shape), bias)
            for weight, bias, (shape, _) in zip(parts[::2], parts[1::2], self.shapes, strict=True)
        ]
        return layers, gain

    def forward(self, x: Tensor, groups: int | None = None) -> Tensor:
        layers, gain = self._views()
        if not layers:
            out = gain.expand(*x.shape[:-1], self.out_features)
            return out if groups is None else out.unflatten(-1, (-1, groups))
        for weight, bias in layers[:-1]:
            x = activate(self.act, nn.functional.linear(x, weight, bias))
        if groups is None:
            return scaled_linear(x, *layers[-1], gain)
        return grouped_linear(x, *layers[-1], gain, groups)


def activate(act: nn.Module, h: Tensor) -> Tensor:
    """``act(h)`` for ``h`` a linear layer's output; a ReLU overwrites ``h`` (its backward
    reads its output, not its input), which saves allocating and filling one
    batch-by-width tensor per layer. Not for one row (``h`` 1-D): torch returns the linear
    map of one row as a view, which a traced graph (Pyro's ``jit_compile``) replays as a
    view of a leaf, where writing is an error."""
    if isinstance(act, nn.ReLU) and h.dim() > 1:
        return torch.relu_(h)
    return act(h)


def scaled_linear(x: Tensor, weight: Tensor, bias: Tensor, gain: Tensor) -> Tensor:
    r""":math:`g \odot (W x + b)`, computed as :math:`(g \odot W) x + g \odot b`: the gain
    scales the (small) weights, not the batch-by-outputs product, in both passes."""
    return nn.functional.linear(x, gain.unsqueeze(-1) * weight, gain * bias)


#: the most groups per entry that :func:`grouped_linear` lays out group-major when compiled
GROUP_MAJOR_MAX = 2


def grouped_linear(x: Tensor, weight: Tensor, bias: Tensor, gain: Tensor, groups: int) -> Tensor:
    r""":func:`scaled_linear`'s outputs, ``groups`` per entry (entry-major: entry :math:`i`'s
    ``groups`` outputs are consecutive), as a ``(..., entries, groups)`` tensor.

    Under :func:`torch.compile`, with at most :data:`GROUP_MAJOR_MAX` groups (an affine
    map's scale and shift), the weights' rows are reordered group-major before the product
    (a copy of the small weights, not of the batch-sized output), so that a layer reading
    one parameter of every entry (:meth:`~pyroflows.transforms.elementwise.Affine.forward`'s
    scale, then its shift) reads contiguous memory: inductor vectorises such a kernel on
    the CPU, and not a strided one (10x slower in a profile of ``maf``). Many groups (a
    spline's widths, heights and slopes) are read as one vector per entry, which
    entry-major memory keeps contiguous: reordered, a compiled ``nsf`` step ran 15% slower.
    In eager mode the reordering's extra operations cost more than the strided reads
    save, so the memory stays entry-major there. The values are those of
    ``scaled_linear(...).unflatten(-1, (-1, groups))`` either way.
    """
    if groups > GROUP_MAJOR_MAX or not torch.compiler.is_compiling():
        return scaled_linear(x, weight, bias, gain).unflatten(-1, (-1, groups))

    def major(t: Tensor) -> Tensor:  # rows (entry, group) -> (group, entry)
        return t.unflatten(0, (-1, groups)).transpose(0, 1).flatten(0, 1)

    out = scaled_linear(x, major(weight), major(bias), major(gain))
    return out.unflatten(-1, (groups, -1)).transpose(-1, -2)


class MaskedMLP(nn.Module):
    r"""MADE: an MLP whose output :math:`i` depends only on inputs before :math:`i` in ``order``.

    Each input gets the degree :math:`m(j)` = its position (1 to :math:`d`) in ``order``,
    each hidden unit a degree in :math:`1, \dots, d - 1`, and a weight from a unit of
    degree :math:`a` to one of degree :math:`b` is kept when :math:`b \ge a` (hidden) or
    :math:`b > a` (output), so output :math:`i` sees exactly the inputs of lower degree.
    The ``out_per_input`` outputs of input :math:`i` are ``out[..., i, :]`` (group-major in
    memory when compiled: :func:`grouped_linear`). ``context``
    extra inputs (passed as ``net(x, context)``) get degree 0, so every output may depend
    on them: a conditional MADE. As in
    :class:`MLP`, a learned gain that starts at 0 scales the output, so the layer it feeds
    starts as the identity.

    References:
        MADE: Masked Autoencoder for Distribution Estimation (Germain et al., 2015)
        https://arxiv.org/abs/1502.03509

    Example:
        >>> import torch
        >>> net = MaskedMLP(3, 2, hidden=(8,))
        >>> _ = nn.init.ones_(net.gain)
        >>> x = torch.randn(3, requires_grad=True)
        >>> out = net(x)  # shape (3, 2); out[0] depends on nothing, out[2] on x[0], x[1]
        >>> torch.autograd.grad(out[1].sum(), x)[0].ne(0).tolist()
        [True, False, False]
    """

    def __init__(
        self,
        features: int,
        out_per_input: int,
        hidden: Sequence[int] = (64, 64),
        activation: str = "relu",
        order: Tensor | None = None,
        context: int = 0,
        residual: bool = False,
    ) -> None:
        super().__init__()
        hidden = check_widths("hidden", hidden)
        act = ACTIVATIONS[check_choice("activation", activation, list(ACTIVATIONS))]
        self.residual = bool(residual)
        order = torch.arange(features) if order is None else torch.as_tensor(order)
        if sorted(order.tolist()) != list(range(features)):
            raise ValueError(f"order must be a permutation of 0..{features - 1}, got {order}")
        self.features, self.out_per_input = features, out_per_input
        degrees = [torch.zeros(features + context, dtype=torch.long)]
        degrees[0][order] = torch.arange(1, features + 1)
        for width in hidden:  # with a context, degree-0 units carry it to the first output
            low = 0 if context else 1
            degrees.append(torch.arange(width) % max(1, features - low) + low)
        out_degrees = degrees[0][:features].repeat_interleave(out_per_input)
        self.layers = nn.ModuleList()
        for i, (a, b) in enumerate(itertools.pairwise([*degrees, out_degrees])):
            layer = nn.Linear(len(a), len(b))
            last = i == len(degrees) - 1
            mask = b[:, None] > a[None, :] if last else b[:, None] >= a[None, :]
            layer.register_buffer("mask", mask.to(layer.weight.dtype))
            self.layers.append(layer)
        self.act = act()
        self.gain = nn.Parameter(torch.zeros(features * out_per_input))

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        h = x if context is None else torch.cat([x, context], dim=-1)
        *hidden, last = self.layers
        for i, layer in enumerate(hidden):
            weight = layer.weight * layer.mask
            out = activate(self.act, nn.functional.linear(h, weight, layer.bias))
            # equal widths have equal degrees: the masks still hold across a residual sum
            h = h + out if self.residual and 0 < i and out.shape[-1] == h.shape[-1] else out
        weight = last.weight * last.mask
        return grouped_linear(h, weight, last.bias, self.gain, self.out_per_input)


class Hypernet(nn.Module):
    r"""Context-dependent offsets to a layer's parameters: :math:`\theta(c) = \theta + g(c)`.

    ``shapes`` maps parameter names to shapes; :meth:`forward` returns, for contexts of
    shape ``(..., context)``, a dict of offsets of shapes ``(..., *shape)``, one set per
    context row. The network is an :class:`MLP` whose output starts at zero, so a layer
    made conditional this way starts as its unconditional self.

    Example:
        >>> import torch
        >>> net = Hypernet({"u": (3,), "b": ()}, context=2, hidden=(8,))
        >>> {k: tuple(v.shape) for k, v in net(torch.randn(5, 2)).items()}
        {'u': (5, 3), 'b': (5,)}
    """

    def __init__(
        self, shapes: dict[str, Sequence[int]], context: int, hidden: Sequence[int] = (64, 64)
    ) -> None:
        super().__init__()
        self.shapes = {name: tuple(shape) for name, shape in shapes.items()}
        self.sizes = [math.prod(shape) for shape in self.shapes.values()]
        self.net = MLP(context, sum(self.sizes), hidden)

    def shifted(self, context: Tensor, **params: Tensor) -> tuple[Tensor, ...]:
        """The given parameters plus their offsets at ``context``, in the order given."""
        offsets = self(context)
        return tuple(value + offsets[name] for name, value in params.items())

    def forward(self, context: Tensor) -> dict[str, Tensor]:
        parts = self.net(context).split(self.sizes, dim=-1)
        batch = context.shape[:-1]
        return {
            name: part.reshape((*batch, *shape))
            for (name, shape), part in zip(self.shapes.items(), parts, strict=True)
        }
