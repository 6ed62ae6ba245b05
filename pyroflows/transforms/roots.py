r"""Batched root finding for increasing scalar functions, differentiable by the implicit function.

To invert :math:`g(a) = t` where :math:`g` is strictly increasing and the root is known to
lie in :math:`[lo, hi]`, a safeguarded Newton iteration (Newton's step when it stays inside
the bracket and at least halves the previous step, bisection otherwise, as ``rtsafe`` in
Press et al., *Numerical Recipes*, 3rd ed., sec. 9.4) runs without gradient tracking until
every step is below rounding (checked every 8 steps on the CPU; on an accelerator all
``iterations`` run, as reading the check would make the device wait for its queue).
One last Newton step is then taken with gradients on,

.. math:: a^* = a_0 - \frac{g(a_0; \theta) - t}{g'(a_0; \theta)},

whose derivative at the root is the implicit-function-theorem derivative
:math:`\partial a / \partial \theta = -(\partial g/\partial \theta) / g'(a)`, and
:math:`\partial a / \partial t = 1 / g'(a)`. When the root is already known (a flow that
has just computed :math:`y = f(x)` knows the preimage of :math:`y`), ``start=`` skips the
search, and that one Newton step alone gives the same value and derivatives.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

ValueAndSlope = Callable[[Tensor], tuple[Tensor, Tensor]]


def solve_increasing(
    fn: ValueAndSlope,
    target: Tensor,
    lo: Tensor,
    hi: Tensor,
    iterations: int = 64,
    *,
    start: Tensor | None = None,
) -> Tensor:
    """Solve ``fn(a)[0] == target`` elementwise for ``a`` in ``[lo, hi]``.

    ``fn`` returns the value and the derivative of a strictly increasing function; its
    parameters may require gradients, which reach the result through the final Newton step.
    ``start``, if given, must be the root already (to rounding): the search is skipped.

    Example:
        >>> import torch
        >>> from pyroflows.transforms.roots import solve_increasing
        >>> cube = lambda a: (a**3 + a, 3 * a**2 + 1)
        >>> t = torch.tensor([2.0, 10.0], dtype=torch.float64)
        >>> a = solve_increasing(cube, t, t.new_full((2,), -10.0), t.new_full((2,), 10.0))
        >>> a
        tensor([1., 2.], dtype=torch.float64)
    """
    a = _search(fn, target, lo, hi, iterations) if start is None else start.detach()
    value, slope = fn(a)
    return a - (value - target) / slope


def _search(fn: ValueAndSlope, target: Tensor, lo: Tensor, hi: Tensor, iterations: int) -> Tensor:
    """The root to rounding, by safeguarded Newton iteration without gradient tracking."""
    with torch.no_grad():
        target_ = target.detach()
        lo, hi = torch.broadcast_tensors(lo.detach(), hi.detach(), target_)[:2]
        a = (lo + hi) / 2
        last_step = hi - lo
        tolerance = 4 * torch.finfo(a.dtype).eps
        check = a.device.type == "cpu"
        for iteration in range(iterations):
            value, slope = fn(a)
            residual = value - target_
            lo = torch.where(residual < 0, a, lo)
            hi = torch.where(residual > 0, a, hi)
            newton = residual / slope
            # Newton's step only if it stays in the bracket and at least halves the last
            # step; else bisect. This breaks the two-cycles Newton falls into near inflections.
            inside = (a - newton >= lo) & (a - newton <= hi)
            fast = newton.abs() * 2 <= last_step.abs()
            step = torch.where(inside & fast, newton, a - (lo + hi) / 2)
            a, last_step = a - step, step
            # Converged everywhere? Asked every 8 steps on the CPU, where it costs nothing;
            # never on an accelerator, which would wait for its queue to answer.
            converged = check and iteration % 8 == 7
            if converged and bool((step.abs() <= tolerance * (1 + a.abs())).all()):
                break
    return a
