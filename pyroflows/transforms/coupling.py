r"""Coupling layers (NICE, RealNVP): any elementwise transformer, conditioned on the other half."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from pyroflows._checks import check_choice, check_positive_int
from pyroflows.transforms.actnorm import ActNorm
from pyroflows.transforms.base import Flow, FlowStack, broadcast_context
from pyroflows.transforms.elementwise import Affine, Elementwise, Shift
from pyroflows.transforms.nn import MLP
from pyroflows.transforms.registry import register_flow

MASKS = ("alternate", "random")


class Coupling(Flow):
    r"""A coupling layer: the entries in ``mask`` are transformed given the others.

    With :math:`B` the masked (transformed) entries and :math:`A` the rest,

    .. math:: y_A = x_A, \qquad y_B = \tau(x_B; \theta(x_A)),

    where :math:`\tau` is the elementwise ``transformer`` and :math:`\theta` an :class:`MLP`.
    The Jacobian is triangular, so the log-det is the sum of the transformer's
    log-derivatives, and both directions cost one network call. The partition is a
    permutation (the conditioning entries first) stored as index buffers, so ``.to(device)``
    moves it and no boolean indexing happens in the hot path; see :func:`permute` for why
    its gradient is a gather too.

    References:
        NICE: Non-linear Independent Components Estimation (Dinh et al., 2014)
        https://arxiv.org/abs/1410.8516

        Density estimation using Real NVP (Dinh et al., 2016)
        https://arxiv.org/abs/1605.08803

    Example:
        >>> import torch
        >>> layer = Coupling(torch.tensor([True, False, True]), Affine(), hidden=(8,))
        >>> layer.forward_and_log_det(torch.randn(2, 3))[1]
        tensor([0., 0.], grad_fn=<SumBackward1>)
    """

    def __init__(
        self,
        mask: Tensor,
        transformer: Elementwise,
        hidden: Sequence[int] = (64, 64),
        activation: str = "relu",
        context: int = 0,
    ) -> None:
        mask = torch.as_tensor(mask, dtype=torch.bool)
        if mask.dim() != 1 or not mask.any():
            raise ValueError("a coupling mask must be a 1-D boolean tensor with a True entry")
        super().__init__(mask.numel())
        self.transformer = transformer
        cond = torch.nonzero(~mask).flatten()
        trans = torch.nonzero(mask).flatten()
        self.register_buffer("cond_index", cond)
        self.register_buffer("trans_index", trans)
        self.register_buffer("order", torch.argsort(torch.cat([cond, trans])))
        self._sizes = [len(cond), len(trans)]
        self.context_features = context
        n_out = len(trans) * transformer.n_params
        self.net = MLP(len(cond) + context, n_out, hidden, activation)

    def _coupled(self, x: Tensor, context: Tensor | None, step: Callable) -> tuple[Tensor, Tensor]:
        """``step`` (a direction of the transformer) on the transformed entries, given the
        network's parameters from the others; the merged result and the log-det."""
        x, context = broadcast_context(x, context, self.context_features)
        split = torch.cat([self.cond_index, self.trans_index])  # the inverse of self.order
        x_cond, x_trans = permute(x, split, self.order).split(self._sizes, -1)
        inputs = x_cond if context is None else torch.cat([x_cond, context], dim=-1)
        y_trans, ladj = step(x_trans, self.net(inputs, groups=self.transformer.n_params))
        return permute(torch.cat([x_cond, y_trans], dim=-1), self.order, split), ladj.sum(-1)

    def forward_and_log_det(
        self, x: Tensor, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        return self._coupled(x, context, self.transformer.forward)

    def inverse_and_log_det(
        self, y: Tensor, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        return self._coupled(y, context, self.transformer.inverse)


def permute(x: Tensor, order: Tensor, inverse: Tensor) -> Tensor:
    """``x[..., order]`` for a permutation ``order`` whose inverse is ``inverse``.

    :meth:`torch.Tensor.index_select`, except under :func:`torch.compile`: there the
    gradient is the gather ``grad[..., inverse]``, where autograd's (knowing no permutation)
    is a scatter-add into zeros, which inductor writes as atomic adds on the CPU. (In eager
    mode the custom function's Python calls would cost more than they save.) Twice
    differentiable either way.

    Example:
        >>> x = torch.tensor([[1.0, 2.0, 3.0]], requires_grad=True)
        >>> y = permute(x, torch.tensor([2, 0, 1]), torch.tensor([1, 2, 0]))
        >>> y.detach(), torch.autograd.grad((y * torch.tensor([10.0, 20.0, 30.0])).sum(), x)[0]
        (tensor([[3., 1., 2.]]), tensor([[20., 30., 10.]]))
    """
    if not torch.compiler.is_compiling():  # eager: autograd's own backward, no Python call
        return x.index_select(-1, order)
    return _Permute.apply(x, order, inverse)


class _Permute(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, order: Tensor, inverse: Tensor) -> Tensor:
        return x.index_select(-1, order)

    @staticmethod
    def setup_context(ctx, inputs: tuple[Tensor, Tensor, Tensor], output: Tensor) -> None:
        ctx.save_for_backward(inputs[1], inputs[2])

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        order, inverse = ctx.saved_tensors
        return _Permute.apply(grad, inverse, order), None, None


def coupling_masks(dim: int, layers: int, kind: str = "alternate") -> list[Tensor]:
    """The transformed-entry masks of ``layers`` coupling layers.

    ``"alternate"`` transforms the even entries, then the odd ones, and so on;
    ``"random"`` transforms a random half (rounded up) in each layer, drawn from torch's
    global generator. In one dimension every layer transforms the one entry (unconditioned).

    Example:
        >>> [m.tolist() for m in coupling_masks(3, 2)]
        [[True, False, True], [False, True, False]]
    """
    check_choice("mask", kind, MASKS)
    masks = []
    for k in range(layers):
        if kind == "alternate":
            mask = torch.arange(dim) % 2 == k % 2
        else:
            mask = torch.zeros(dim, dtype=torch.bool)
            mask[torch.randperm(dim)[: (dim + 1) // 2]] = True
        masks.append(mask if mask.any() else ~mask)
    return masks


@register_flow("realnvp")
def realnvp(
    dim: int,
    *,
    layers: int = 4,
    hidden: Sequence[int] = (64, 64),
    activation: str = "relu",
    mask: str = "alternate",
    clamp: float = 3.0,
    context: int = 0,
) -> FlowStack:
    """RealNVP: ``layers`` affine coupling layers (:class:`Affine`) on alternating partitions.

    ``mask="random"`` draws a random partition per layer instead; ``clamp`` bounds each
    layer's log-scale. Every layer starts at the identity. (Batch normalisation between
    layers, as in Dinh et al., is left out: it makes a density depend on the batch.)

    Example:
        >>> import pyroflows
        >>> len(pyroflows.build("realnvp", 5, layers=6))
        6
    """
    check_positive_int("layers", layers)
    return FlowStack(
        Coupling(m, Affine(clamp), hidden, activation, context)
        for m in coupling_masks(dim, layers, mask)
    )


@register_flow("nice")
def nice(
    dim: int,
    *,
    layers: int = 4,
    hidden: Sequence[int] = (64, 64),
    activation: str = "relu",
    mask: str = "alternate",
    context: int = 0,
) -> FlowStack:
    """NICE: a diagonal scaling (:class:`ActNorm`) then ``layers`` additive coupling layers.

    The coupling layers are volume-preserving; the scaling, which NICE puts at the latent
    end, carries the whole log-det.

    Example:
        >>> import pyroflows
        >>> len(pyroflows.build("nice", 5, layers=4))
        5
    """
    check_positive_int("layers", layers)
    masks = coupling_masks(dim, layers, mask)
    couplings = [Coupling(m, Shift(), hidden, activation, context) for m in masks]
    return FlowStack([ActNorm(dim), *couplings])
