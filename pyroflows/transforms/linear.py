r"""An invertible linear layer parametrised by its LU decomposition (Glow's 1x1 convolution)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pyroflows.registry import register_flow
from pyroflows.transforms.base import Flow, FlowStack


class LULinear(Flow):
    r"""The map :math:`y = W x + b` with :math:`W = L U` factored for a cheap log-det and inverse.

    :math:`L` is unit lower-triangular and :math:`U` upper-triangular with a positive
    diagonal :math:`e^{s}`, so :math:`\log|\det W| = \sum_i s_i` costs :math:`O(d)` and the
    inverse is two triangular solves, :math:`O(d^2)` per vector. Every such :math:`W` has a
    positive determinant; it starts at the identity. (Glow also fixes a permutation in front
    of :math:`L`; here the coupling layers' alternating partitions do that job.)

    References:
        Glow: Generative Flow with Invertible 1x1 Convolutions (Kingma & Dhariwal, 2018)
        https://arxiv.org/abs/1807.03039

    Example:
        >>> import torch
        >>> layer = LULinear(3)
        >>> with torch.no_grad():
        ...     _ = layer.lower.normal_()
        >>> x = torch.randn(4, 3)
        >>> torch.allclose(layer.inv(layer(x)), x, atol=1e-5)
        True
    """

    def __init__(self, dim: int) -> None:
        super().__init__(dim)
        self.lower = nn.Parameter(torch.zeros(dim, dim))
        self.upper = nn.Parameter(torch.zeros(dim, dim))
        self.log_diag = nn.Parameter(torch.zeros(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def _factors(self) -> tuple[Tensor, Tensor]:
        eye = torch.eye(self.dim, dtype=self.lower.dtype, device=self.lower.device)
        lower = self.lower.tril(-1) + eye
        upper = self.upper.triu(1) + torch.diag(self.log_diag.exp())
        return lower, upper

    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        lower, upper = self._factors()
        y = x @ (lower @ upper).T + self.bias
        return y, self.log_diag.sum().expand(x.shape[:-1])

    def inverse_and_log_det(self, y: Tensor) -> tuple[Tensor, Tensor]:
        lower, upper = self._factors()
        rows = (y - self.bias).reshape(-1, self.dim)
        # Row vectors: x W^T = y - b with W^T = U^T L^T; solve against L^T, then U^T.
        solve = torch.linalg.solve_triangular
        z = solve(lower.T, rows, upper=True, left=False, unitriangular=True)
        x = solve(upper.T, z, upper=False, left=False)
        return x.reshape(y.shape), (-self.log_diag.sum()).expand(y.shape[:-1])


@register_flow("linear")
def linear(dim: int) -> FlowStack:
    """A single :class:`LULinear` layer: a learned invertible affine map.

    Example:
        >>> import pyroflows
        >>> len(pyroflows.build("linear", 3))
        1
    """
    return FlowStack([LULinear(dim)])


class CholeskyAffine(Flow):
    r"""The map :math:`y = D L x + b`: a Gaussian's Cholesky factor, scale-free parametrised.

    :math:`L` is unit lower-triangular and :math:`D = \mathrm{diag}(e^{s})`, so :math:`DL`
    ranges over every lower-triangular matrix with a positive diagonal (every Cholesky
    factor) exactly once, :math:`\log|\det| = \sum_i s_i` and the inverse is one triangular
    solve. Row :math:`i` of :math:`DL` is :math:`e^{s_i}` times a scale-free row, so an
    optimiser's step moves each output in units of its own scale: this is the
    parametrisation of Pyro's ``AutoMultivariateNormal``, which makes a variational
    Gaussian fit posteriors whose scales differ by orders of magnitude (Glow's
    :class:`LULinear` has absolute upper-triangular entries and does not). Starts at the
    identity.

    Example:
        >>> import torch
        >>> layer = CholeskyAffine(3)
        >>> with torch.no_grad():
        ...     _ = layer.lower.normal_()
        >>> x = torch.randn(4, 3)
        >>> torch.allclose(layer.inv(layer(x)), x, atol=1e-5)
        True
    """

    def __init__(self, dim: int) -> None:
        super().__init__(dim)
        self.lower = nn.Parameter(torch.zeros(dim, dim))
        self.log_scale = nn.Parameter(torch.zeros(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def scale_tril(self) -> Tensor:
        """The lower-triangular factor :math:`DL`."""
        eye = torch.eye(self.dim, dtype=self.lower.dtype, device=self.lower.device)
        return self.log_scale.exp().unsqueeze(-1) * (self.lower.tril(-1) + eye)

    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        y = x @ self.scale_tril().T + self.bias
        return y, self.log_scale.sum().expand(x.shape[:-1])

    def inverse_and_log_det(self, y: Tensor) -> tuple[Tensor, Tensor]:
        rows = (y - self.bias).reshape(-1, self.dim)
        # Row vectors: x (DL)^T = y - b, an upper-triangular system from the right.
        x = torch.linalg.solve_triangular(self.scale_tril().T, rows, upper=True, left=False)
        return x.reshape(y.shape), (-self.log_scale.sum()).expand(y.shape[:-1])
