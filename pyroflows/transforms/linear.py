r"""An invertible linear layer parametrised by its LU decomposition (Glow's 1x1 convolution)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from pyroflows.transforms.base import Flow, FlowStack, broadcast_context
from pyroflows.transforms.nn import Hypernet
from pyroflows.transforms.registry import register_flow


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

    def __init__(self, dim: int, context: int = 0, hidden: Sequence[int] = (64, 64)) -> None:
        super().__init__(dim)
        self.lower = nn.Parameter(torch.zeros(dim, dim))
        self.upper = nn.Parameter(torch.zeros(dim, dim))
        self.log_diag = nn.Parameter(torch.zeros(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.context_features = context
        if context:
            shapes = {"lower": (dim, dim), "upper": (dim, dim), "log_diag": (dim,), "bias": (dim,)}
            self.hyper = Hypernet(shapes, context, hidden)

    def _factors(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, ...]:
        """``x`` broadcast against the context, :math:`L`, :math:`U`, :math:`s` and :math:`b`
        (per context row, with a batch of matrices, for a conditional layer)."""
        x, context = broadcast_context(x, context, self.context_features)
        lower, upper, log_diag, bias = self.lower, self.upper, self.log_diag, self.bias
        if context is not None:
            lower, upper, log_diag, bias = self.hyper.shifted(
                context, lower=lower, upper=upper, log_diag=log_diag, bias=bias
            )
        eye = torch.eye(self.dim, dtype=x.dtype, device=x.device)
        lower = lower.tril(-1) + eye
        upper = upper.triu(1) + torch.diag_embed(log_diag.exp())
        return x, lower, upper, log_diag, bias

    def forward_and_log_det(
        self, x: Tensor, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        x, lower, upper, log_diag, bias = self._factors(x, context)
        weight = lower @ upper
        if weight.dim() == 2:
            y = x @ weight.T + bias
        else:
            y = (weight @ x.unsqueeze(-1)).squeeze(-1) + bias
        return y, log_diag.sum(-1).expand(x.shape[:-1])

    def inverse_and_log_det(
        self, y: Tensor, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        y, lower, upper, log_diag, bias = self._factors(y, context)
        solve = torch.linalg.solve_triangular
        if lower.dim() == 2:
            rows = (y - bias).reshape(-1, self.dim)
            # Row vectors: x W^T = y - b with W^T = U^T L^T; solve against L^T, then U^T.
            z = solve(lower.T, rows, upper=True, left=False, unitriangular=True)
            x = solve(upper.T, z, upper=False, left=False).reshape(y.shape)
        else:  # one matrix per row: L z = y - b, then U x = z
            z = solve(lower, (y - bias).unsqueeze(-1), upper=False, unitriangular=True)
            x = solve(upper, z, upper=True).squeeze(-1)
        return x, (-log_diag.sum(-1)).expand(y.shape[:-1])


@register_flow("linear")
def linear(dim: int, *, context: int = 0, hidden: Sequence[int] = (64, 64)) -> FlowStack:
    """A single :class:`LULinear` layer: a learned invertible affine map (conditional with
    ``context=k``: a hypernetwork of ``hidden`` units offsets :math:`L, U, s, b` per row).

    Example:
        >>> import pyroflows
        >>> len(pyroflows.build("linear", 3))
        1
    """
    return FlowStack([LULinear(dim, context, hidden)])


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
    identity. With ``trainable=False`` its values are a buffer: a fixed whitening, e.g.
    the Gaussian a variational posterior starts from, so that an optimiser's steps on the
    layers before it are in units of that Gaussian's scales.

    Example:
        >>> import torch
        >>> layer = CholeskyAffine(3)
        >>> with torch.no_grad():
        ...     _ = layer.lower.normal_()
        >>> x = torch.randn(4, 3)
        >>> torch.allclose(layer.inv(layer(x)), x, atol=1e-5)
        True
    """

    analytic_grad = True

    def __init__(self, dim: int, trainable: bool = True) -> None:
        super().__init__(dim)
        #: :math:`b`, :math:`s` and :math:`L` (its strict lower triangle is read) in one
        #: vector (Pyro's optimisers step tensor by tensor); a buffer if not ``trainable``
        #: (a fixed whitening, set by :meth:`set`)
        params = torch.zeros(dim * (dim + 2))
        if trainable:
            self.params = nn.Parameter(params)
        else:
            self.register_buffer("params", params)

    @property
    def bias(self) -> Tensor:
        return self.params[: self.dim]

    @property
    def log_scale(self) -> Tensor:
        return self.params[self.dim : 2 * self.dim]

    @property
    def lower(self) -> Tensor:
        return self.params[2 * self.dim :].view(self.dim, self.dim)

    @torch.no_grad()
    def set(self, bias: Tensor, scale_tril: Tensor) -> None:
        """Set :math:`b` and the factor :math:`DL` (lower-triangular, positive diagonal).

        Example:
            >>> import torch
            >>> layer = CholeskyAffine(2)
            >>> tril = torch.tensor([[2.0, 0.0], [1.0, 0.5]])
            >>> layer.set(torch.tensor([1.0, -1.0]), tril)
            >>> torch.equal(layer.scale_tril(), tril), layer.bias.tolist()
            (True, [1.0, -1.0])
        """
        if scale_tril.shape != (self.dim, self.dim) or bias.shape != (self.dim,):
            raise ValueError(
                f"bias and scale_tril must have shapes ({self.dim},) and ({self.dim}, "
                f"{self.dim}), got {tuple(bias.shape)} and {tuple(scale_tril.shape)}"
            )
        diagonal = scale_tril.diagonal()
        if not bool((diagonal > 0).all()) or bool(scale_tril.triu(1).ne(0).any()):
            raise ValueError("scale_tril must be lower-triangular with a positive diagonal")
        self.bias.copy_(bias)
        self.log_scale.copy_(diagonal.log())
        self.lower.copy_(scale_tril / diagonal.unsqueeze(-1))

    def scale_tril(self) -> Tensor:
        """The lower-triangular factor :math:`DL`."""
        eye = torch.eye(self.dim, dtype=self.lower.dtype, device=self.lower.device)
        return self.log_scale.exp().unsqueeze(-1) * (self.lower.tril(-1) + eye)

    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        y = x @ self.scale_tril().T + self.bias
        return y, self.log_scale.sum().expand(x.shape[:-1])

    def forward_and_grad(
        self, x: Tensor, grad: Tensor, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        r"""The gradient maps to :math:`(DL)^{-\top} s`: one triangular solve."""
        with torch.no_grad():
            tril = self.scale_tril()
            rows = grad.expand(x.shape).reshape(-1, self.dim)
            # Row vectors: s_y^T = s^T (DL)^{-1}, a lower-triangular system from the right.
            pushed = torch.linalg.solve_triangular(tril, rows, upper=False, left=False)
            return x @ tril.T + self.bias, pushed.reshape(x.shape)

    def inverse_and_log_det(self, y: Tensor) -> tuple[Tensor, Tensor]:
        rows = (y - self.bias).reshape(-1, self.dim)
        # Row vectors: x (DL)^T = y - b, an upper-triangular system from the right.
        x = torch.linalg.solve_triangular(self.scale_tril().T, rows, upper=True, left=False)
        return x.reshape(y.shape), (-self.log_scale.sum()).expand(y.shape[:-1])
