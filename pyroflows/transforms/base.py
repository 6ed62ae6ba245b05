r"""The flow contract: a layer is two primitives, one per direction.

A flow layer is an invertible map :math:`f` on :math:`\mathbb{R}^d`. Each layer implements

* ``forward_and_log_det(x) -> (y, log|det J_f(x)|)``
* ``inverse_and_log_det(y) -> (x, log|det J_{f^{-1}}(y)|)`` with :math:`x = f^{-1}(y)`,

so that :math:`\log|\det J_{f^{-1}}(y)| = -\log|\det J_f(x)|`, and declares how each
direction is computed (``forward_method``, ``inverse_method``): ``"analytic"`` (closed
form, one pass), ``"sequential"`` (closed form, one pass per dimension), ``"numerical"``
(root finding, exact to the solver's tolerance), ``"integrated"`` (an ODE solve, exact to
the solver's tolerance) or ``"unavailable"``. Everything torch's
:class:`~torch.distributions.Transform` API asks for (``_call``, ``_inverse``,
``log_abs_det_jacobian``) derives from the two primitives, and nothing is cached: a result
never outlives the parameters that produced it (Pyro's built-in flows cache the last
``(x, y)`` pair by tensor identity).

A flow is one fixed function of its parameters and buffers, whichever method is called
first: a data-dependent start (actnorm) happens only in the explicit call
``flow.initialize(data)``.

Conditional layers (``context_features > 0``) also take ``context=``, a tensor of shape
``(..., context_features)`` whose batch shape broadcasts against the input's; they feed it
to their parameter networks, so the map is :math:`f(\cdot\,; c)`. ``flow.condition(c)``
fixes the context and returns an ordinary flow.

Two more methods have correct defaults that a layer may replace by something faster:
:meth:`Flow.forward_and_grad` and :meth:`Flow.inverse_and_log_det_given`, which the
path-derivative gradient uses.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Literal

import torch
from pyro.distributions import TransformModule
from torch import Tensor
from torch.distributions import constraints

Method = Literal["analytic", "sequential", "numerical", "integrated", "unavailable"]
METHODS: tuple[Method, ...] = ("analytic", "sequential", "numerical", "integrated", "unavailable")


class NotInvertibleError(RuntimeError):
    """Raised when a layer is asked for a direction whose method is ``"unavailable"``."""


def least_exact(methods: Iterable[Method]) -> Method:
    """The least exact (or cheap) of ``methods``, in the order of :data:`METHODS`.

    Example:
        >>> least_exact(["analytic", "numerical", "sequential"])
        'numerical'
    """
    return max(methods, key=METHODS.index)


class Flow(TransformModule):
    r"""Base class of every pyroflows layer and stack: an invertible map of ``dim``-vectors.

    Subclasses implement :meth:`forward_and_log_det` and :meth:`inverse_and_log_det` for any
    batch shape ``(..., dim)``, returning the log-det with the batch shape ``(...)``, and
    set the class attributes ``forward_method`` and ``inverse_method`` where a direction is
    not ``"analytic"`` (and ``analytic_grad`` where they write out
    :meth:`forward_and_grad`). A conditional layer sets ``context_features`` and takes
    ``context=`` in both primitives. A flow is a Pyro
    :class:`~pyro.distributions.TransformModule`, so it works in
    :class:`~pyro.distributions.TransformedDistribution`, ``pyro.module`` and Pyro's
    autoguides unchanged.

    Example:
        >>> import torch, pyroflows
        >>> flow = pyroflows.build("realnvp", 3)
        >>> x = torch.randn(5, 3)
        >>> y, ladj = flow.forward_and_log_det(x)
        >>> x2, ladj_inv = flow.inverse_and_log_det(y)
        >>> torch.allclose(x, x2, atol=1e-5), torch.allclose(ladj, -ladj_inv, atol=1e-5)
        (True, True)
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True
    forward_method: Method = "analytic"
    inverse_method: Method = "analytic"
    #: size of the context vector a conditional layer reads (0: not conditional)
    context_features: int = 0
    #: whether :meth:`forward_and_grad` is written out (cheap) rather than autograd's
    analytic_grad: bool = False

    def __init__(self, dim: int) -> None:
        super().__init__(cache_size=0)
        self.dim = dim

    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``y = f(x)`` and ``log|det J_f(x)|``."""
        raise NotInvertibleError(f"{type(self).__name__} has no forward direction")

    def inverse_and_log_det(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``x = f^{-1}(y)`` and ``log|det J_{f^{-1}}(y)|``."""
        raise NotInvertibleError(f"{type(self).__name__} has no inverse direction")

    @torch.no_grad()
    def initialize(self, y: Tensor, context: Tensor | None = None) -> None:
        """Start from data: set any data-dependent parameters from the rows ``y`` (the
        density side of the flow, shape ``(n, dim)``). Most layers have none; actnorm
        standardises its output. Nothing else ever changes a flow's function."""

    def inverse_and_log_det_given(
        self, y: Tensor, x: Tensor, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        r""":meth:`inverse_and_log_det` of ``y`` when its value ``x`` is already known.

        ``x`` must equal :math:`f^{-1}(y)` to rounding, e.g. the input of the forward pass
        that made ``y``; it is read without gradient. The result has the value of ``x`` and
        the derivatives of the inverse (with respect to ``y`` and the parameters). Layers
        with a numerical inverse use ``x`` to skip their root search: one Newton step from
        the root gives the exact value and, by the implicit function theorem, the exact
        derivatives. By default ``x`` is ignored.
        """
        return call_with_context(self.inverse_and_log_det, y, context, self.context_features)

    def forward_and_grad(
        self, x: Tensor, grad: Tensor, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        r"""``y = f(x)`` and :math:`\nabla_y \log q_Y(y)`, the gradient of the pushed-forward
        log-density, without a graph.

        If :math:`X` has density :math:`q_X` with :math:`s = \nabla \log q_X(x)` (``grad``),
        then :math:`Y = f(X)` has

        .. math:: \nabla \log q_Y(y) = J_f(x)^{-\top}\big(s - \nabla_x \log|\det J_f(x)|\big).

        Pushed through a whole flow from the base density's, this is :math:`\nabla_y \log
        q(y)` at a draw, all in the sampling direction: what the path-derivative gradient
        needs (:class:`~pyroflows.FlowDistribution` with ``stl=True``). Planar layers and
        :class:`~pyroflows.transforms.CholeskyAffine` write it out; by default it is the
        gradient in ``y`` of :math:`s^\top f^{-1}(y) + \log|\det J_{f^{-1}}(y)|`, by autograd
        through :meth:`inverse_and_log_det_given`.
        """
        with torch.no_grad():
            y = call_with_context(self.forward_and_log_det, x, context, self.context_features)[0]
        with torch.enable_grad():
            y_ = y.detach().requires_grad_(True)
            x_, ladj = self.inverse_and_log_det_given(y_, x, context)
            (pushed,) = torch.autograd.grad((grad * x_).sum() + ladj.sum(), y_)
        return y, pushed

    # torch's Transform API, derived from the two primitives.
    def _call(self, x: Tensor) -> Tensor:
        return self.forward_and_log_det(x)[0]

    def _inverse(self, y: Tensor) -> Tensor:
        return self.inverse_and_log_det(y)[0]

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        return self.forward_and_log_det(x)[1]

    def condition(self, context: Tensor) -> Conditioned:
        """This conditional flow with its context fixed to ``context``: an ordinary flow.

        Example:
            >>> import torch, pyroflows
            >>> flow = pyroflows.build("realnvp", 2, context=3)
            >>> flow.condition(torch.randn(5, 3)).forward_and_log_det(torch.randn(5, 2))[0].shape
            torch.Size([5, 2])
        """
        return Conditioned(self, context)

    def with_cache(self, cache_size: int = 1) -> Flow:
        """Return ``self``: pyroflows never caches, so every cache size behaves as 0."""
        return self

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class FlowStack(Flow):
    r"""The composition :math:`f = f_K \circ \dots \circ f_1` of flow layers.

    ``layers[0]`` acts first in the forward (sampling) direction and last in the inverse
    (density) direction; log-dets add up. A stack's method per direction is the least exact
    of its layers'.

    Example:
        >>> import torch, pyroflows
        >>> from pyroflows.transforms import FlowStack, Planar
        >>> stack = FlowStack([Planar(2), Planar(2)])
        >>> stack.forward_and_log_det(torch.zeros(4, 2))[0].shape
        torch.Size([4, 2])
    """

    def __init__(self, layers: Iterable[Flow]) -> None:
        layers = list(layers)
        if not layers:
            raise ValueError("a FlowStack needs at least one layer")
        for layer in layers:
            if not isinstance(layer, Flow):
                raise TypeError(
                    f"FlowStack layers must be pyroflows.Flow, got {type(layer).__name__}"
                )
        dims = {layer.dim for layer in layers}
        if len(dims) != 1:
            raise ValueError(f"FlowStack layers must share one dim, got {sorted(dims)}")
        contexts = {layer.context_features for layer in layers} - {0}
        if len(contexts) > 1:
            raise ValueError(f"FlowStack layers must share one context size, got {contexts}")
        super().__init__(dims.pop())
        self.layers = torch.nn.ModuleList(layers)
        self.context_features = contexts.pop() if contexts else 0
        self.forward_method = least_exact(layer.forward_method for layer in layers)
        self.inverse_method = least_exact(layer.inverse_method for layer in layers)
        self.analytic_grad = all(layer.analytic_grad for layer in layers)

    def forward_and_log_det(
        self, x: Tensor, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        total = torch.zeros((), dtype=x.dtype, device=x.device)
        for layer in self.layers:
            x, ladj = call_with_context(
                layer.forward_and_log_det, x, context, layer.context_features
            )
            total = total + ladj
        return x, total.expand(x.shape[:-1])

    def inverse_and_log_det(
        self, y: Tensor, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        total = torch.zeros((), dtype=y.dtype, device=y.device)
        for layer in reversed(self.layers):
            y, ladj = call_with_context(
                layer.inverse_and_log_det, y, context, layer.context_features
            )
            total = total + ladj
        return y, total.expand(y.shape[:-1])

    @torch.no_grad()
    def initialize(self, y: Tensor, context: Tensor | None = None) -> None:
        """Start each layer from the data as it reaches it in the density direction (last
        layer first), so that e.g. an actnorm between couplings sees that coupling's output.
        """
        for layer in reversed(self.layers):
            layer.initialize(y, context)
            y = call_with_context(layer.inverse_and_log_det, y, context, layer.context_features)[0]

    def inverse_and_log_det_given(
        self, y: Tensor, x: Tensor, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Each layer's inverse given its input, recomputed from ``x`` without gradient.

        A stack whose layers all invert in closed form just inverts.
        """
        if self.inverse_method in ("analytic", "sequential"):
            return self.inverse_and_log_det(y, context)
        inputs = [x.detach()]
        with torch.no_grad():
            for layer in self.layers[:-1]:
                inputs.append(
                    call_with_context(
                        layer.forward_and_log_det, inputs[-1], context, layer.context_features
                    )[0]
                )
        total = torch.zeros((), dtype=y.dtype, device=y.device)
        for layer, known in zip(reversed(self.layers), reversed(inputs), strict=True):
            y, ladj = layer.inverse_and_log_det_given(y, known, context)
            total = total + ladj
        return y, total.expand(y.shape[:-1])

    def forward_and_grad(
        self, x: Tensor, grad: Tensor, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        for layer in self.layers:
            x, grad = layer.forward_and_grad(x, grad, context)
        return x, grad

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, index: int) -> Flow:
        return self.layers[index]


class Conditioned(Flow):
    """A conditional flow with its context fixed: ``flow.condition(context)``.

    The context is held as given (not copied, so gradients reach whatever produced it, e.g.
    an encoder); its batch shape broadcasts against the inputs'.
    """

    def __init__(self, flow: Flow, context: Tensor) -> None:
        if not flow.context_features:
            raise ValueError(
                f"{type(flow).__name__} is not conditional; build a conditional family "
                "with a context size, e.g. pyroflows.build('realnvp', dim, context=k)"
            )
        if not isinstance(context, Tensor) or context.dim() == 0:
            raise ValueError("context must be a tensor of shape (..., context_features)")
        if context.shape[-1] != flow.context_features:
            raise ValueError(
                f"context has {context.shape[-1]} features in its last dimension; "
                f"the flow was built for {flow.context_features}"
            )
        super().__init__(flow.dim)
        self.flow = flow
        self.context = context
        self.forward_method, self.inverse_method = flow.forward_method, flow.inverse_method
        self.analytic_grad = flow.analytic_grad

    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.flow.forward_and_log_det(x, context=self.context)

    def inverse_and_log_det(self, y: Tensor) -> tuple[Tensor, Tensor]:
        return self.flow.inverse_and_log_det(y, context=self.context)

    def initialize(self, y: Tensor, context: Tensor | None = None) -> None:
        self.flow.initialize(y, self.context)

    def inverse_and_log_det_given(
        self, y: Tensor, x: Tensor, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        return self.flow.inverse_and_log_det_given(y, x, self.context)

    def forward_and_grad(
        self, x: Tensor, grad: Tensor, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        return self.flow.forward_and_grad(x, grad, self.context)


def call_with_context(
    method: Callable[..., tuple[Tensor, Tensor]],
    value: Tensor,
    context: Tensor | None,
    conditional: int,
) -> tuple[Tensor, Tensor]:
    """``method(value, context=context)`` for a conditional layer, else ``method(value)``
    (an unconditional layer's primitives take no context)."""
    return method(value, context=context) if conditional else method(value)


def broadcast_context(
    x: Tensor, context: Tensor | None, features: int
) -> tuple[Tensor, Tensor | None]:
    """Broadcast ``x`` and the ``context`` of a layer reading ``features`` context entries
    to one batch shape (``context`` is ``None`` for an unconditional layer, ``features == 0``).

    Example:
        >>> import torch
        >>> x, context = broadcast_context(torch.zeros(4, 2), torch.ones(3, 1, 5), 5)
        >>> x.shape, context.shape
        (torch.Size([3, 4, 2]), torch.Size([3, 4, 5]))
    """
    if not features:
        return x, None
    if context is None:
        raise ValueError(
            "this layer is conditional: pass context=..., or use flow.condition(context)"
        )
    if context.shape[-1] != features:
        raise ValueError(f"context has {context.shape[-1]} features; the layer reads {features}")
    batch = torch.broadcast_shapes(x.shape[:-1], context.shape[:-1])
    return x.expand(*batch, x.shape[-1]), context.expand(*batch, features)
