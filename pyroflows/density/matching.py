r"""Flow matching: train a continuous flow's vector field by regression, with no ODE solve.

With :math:`x_0` drawn from the base and :math:`x_1` a data row, the conditional
optimal-transport path of Lipman et al. (2022) with :math:`\sigma_{\min} = 0` (the
straight line of Liu et al.'s rectified flow) is :math:`x_t = (1 - t) x_0 + t x_1`, whose
velocity is :math:`x_1 - x_0`; the loss

.. math:: \mathcal{L}(\theta) = \mathbb{E}_{t \sim U(0, 1),\, x_0,\, x_1}
    \big\lVert v_\theta(x_t, t) - (x_1 - x_0) \big\rVert^2

has the same gradient as the regression on the marginal field that carries the base to
the data, so its minimiser's ODE transports one to the other. Each step costs one field
evaluation and its gradient, where maximum likelihood back-propagates through a whole
solve with a trace. ``coupling="ot"`` pairs each minibatch's base draws and rows by the
assignment that minimises the total squared distance (minibatch optimal transport, Tong
et al. 2023), which straightens the paths (fewer solver steps when sampling and scoring).

References:
    Flow Matching for Generative Modeling (Lipman, Chen, Ben-Hamu, Nickel & Le, 2022)
    https://arxiv.org/abs/2210.02747

    Improving and Generalizing Flow-Based Generative Models with Minibatch Optimal
    Transport (Tong, Fatras, Malkin, Huguet, Zhang, Rector-Brooks, Wolf & Bengio, 2023)
    https://arxiv.org/abs/2302.00482

    Flow Straight and Fast (Liu, Gong & Liu, 2022) https://arxiv.org/abs/2209.03003
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from pyroflows.transforms import CNF, Flow, FlowStack

#: the couplings of base draws and rows :func:`flow_matching_loss` offers
COUPLINGS = ("independent", "ot")


def matched_field(flow: Flow) -> CNF:
    """The one :class:`~pyroflows.transforms.CNF` of ``flow`` (a CNF or a stack of one),
    whose field flow matching trains; else raise naming what it is.

    Example:
        >>> import pyroflows
        >>> type(matched_field(pyroflows.build("cnf", 2))).__name__
        'CNF'
    """
    layers = list(flow) if isinstance(flow, FlowStack) else [flow]
    if len(layers) != 1 or not isinstance(layers[0], CNF):
        names = ", ".join(type(layer).__name__ for layer in layers)
        raise ValueError(
            f"flow matching trains one continuous flow (family 'cnf' with layers=1); "
            f"this flow is {names}"
        )
    return layers[0]


def flow_matching_loss(
    field: CNF,
    x0: Tensor,
    x1: Tensor,
    context: Tensor | None = None,
    coupling: str = "independent",
) -> Tensor:
    r"""The mean flow-matching loss (module doc) of ``field`` on base draws ``x0`` and rows
    ``x1`` (both ``(n, dim)``; ``context`` one row per row of ``x1``), at times drawn
    uniformly.

    Example:
        >>> import pyroflows
        >>> field = matched_field(pyroflows.build("cnf", 2))
        >>> x0, x1 = torch.randn(64, 2), torch.randn(64, 2) + 3.0
        >>> loss = flow_matching_loss(field, x0, x1)  # the field starts at 0: E|x1 - x0|^2
        >>> bool(abs(loss - ((x1 - x0) ** 2).sum(-1).mean()) < 1e-5)
        True
    """
    if coupling == "ot":
        x0 = x0[ot_pairing(x0, x1)]
    elif coupling != "independent":
        raise ValueError(f"coupling must be one of {COUPLINGS}, got {coupling!r}")
    t = torch.rand(len(x1), 1, device=x1.device, dtype=x1.dtype)
    xt = (1 - t) * x0 + t * x1
    residual = field.velocity(xt, t, context) - (x1 - x0)
    return (residual * residual).sum(-1).mean()


def ot_pairing(x0: Tensor, x1: Tensor) -> Tensor:
    """The permutation ``p`` that minimises :math:`\\sum_i \\lVert x_0[p_i] - x_1[i]
    \\rVert^2` (the Hungarian algorithm, scipy's ``linear_sum_assignment``, on the CPU).

    Example:
        >>> x0 = torch.tensor([[0.0], [10.0]])
        >>> ot_pairing(x0, torch.tensor([[9.0], [1.0]])).tolist()
        [1, 0]
    """
    from scipy.optimize import linear_sum_assignment  # scipy comes with arviz

    cost = torch.cdist(x1.detach(), x0.detach()).square().cpu().numpy()
    rows, columns = linear_sum_assignment(cost)
    order = np.empty_like(columns)
    order[rows] = columns
    return torch.as_tensor(order, device=x0.device)


class MatchingObjective(nn.Module):
    """The flow-matching loss of a :class:`~pyroflows.density.latent.FlowDensity`-based
    table model: rows mapped to the standardised space (fresh dequantisation noise for
    discrete columns), base draws from the density's base, then :func:`flow_matching_loss`.
    Called as ``objective(rows, context)``, like a negative log-likelihood."""

    def __init__(self, model: nn.Module, coupling: str = "independent") -> None:
        super().__init__()
        self.model = model
        self.field = matched_field(model.density.flow)
        self.coupling = coupling

    def forward(self, rows: Tensor, context: Tensor | None = None) -> Tensor:
        u, scaled = self.model.standardised(rows, context)
        x0 = self.model.density.base.sample(len(u))
        return flow_matching_loss(self.field, x0, u, scaled, self.coupling)
