"""Networks that predict the parameters of flow layers."""

from __future__ import annotations

import itertools
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
    a learned constant vector.

    References:
        ReZero is All You Need: Fast Convergence at Large Depth (Bachlechner et al., 2020)
        https://arxiv.org/abs/2003.04887

    Example:
        >>> import torch
        >>> net = MLP(3, 4, hidden=(16, 16))
        >>> net(torch.randn(5, 3)).abs().max().item()
        0.0
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
        act = ACTIVATIONS[check_choice("activation", activation, list(ACTIVATIONS))]
        self.out_features = out_features
        if in_features == 0:
            self.net = None
            self.constant = nn.Parameter(torch.zeros(out_features))
            return
        widths = (in_features, *hidden)
        layers: list[nn.Module] = []
        for a, b in itertools.pairwise(widths):
            layers += [nn.Linear(a, b), act()]
        self.net = nn.Sequential(*layers, nn.Linear(widths[-1], out_features))
        self.gain = nn.Parameter(torch.zeros(out_features))

    def forward(self, x: Tensor) -> Tensor:
        if self.net is None:
            return self.constant.expand(*x.shape[:-1], self.out_features)
        return self.gain * self.net(x)
