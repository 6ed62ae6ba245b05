"""The registry of flow families: a name maps to a function that builds a flow stack.

A family is a function ``family(dim, *, layers=..., hidden=..., ...) -> Flow``. Registering
one with :func:`register_flow` makes it available to :func:`build`, to the conformance test
suite, and to everything else in pyroflows that takes a flow by name.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from pyroflows._checks import check_positive_int

Family = TypeVar("Family", bound=Callable[..., Any])

_FAMILIES: dict[str, Callable[..., Any]] = {}


def register_flow(name: str) -> Callable[[Family], Family]:
    """Decorator that registers a flow family under ``name``.

    The family is called as ``family(dim, **options)`` and must return a
    :class:`pyroflows.Flow` acting on ``dim``-vectors; its keyword arguments are the options
    that :func:`build` accepts for it.

    Example:
        >>> import pyroflows
        >>> from pyroflows.transforms import FlowStack, Planar
        >>> @pyroflows.register_flow("doc_double_planar")
        ... def double_planar(dim):
        ...     return FlowStack([Planar(dim), Planar(dim)])
        >>> "doc_double_planar" in pyroflows.list_flows()
        True
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"a flow family name must be an identifier string, got {name!r}")

    def decorate(family: Family) -> Family:
        if name in _FAMILIES and _FAMILIES[name] is not family:
            raise ValueError(f"a flow family named {name!r} is already registered")
        if not callable(family):
            raise TypeError(f"register_flow({name!r}) decorates a callable, got {family!r}")
        _FAMILIES[name] = family
        return family

    return decorate


def list_flows() -> list[str]:
    """Names of every registered flow family, sorted.

    Example:
        >>> import pyroflows
        >>> {"planar", "radial", "realnvp"} <= set(pyroflows.list_flows())
        True
    """
    return sorted(_FAMILIES)


def family_options(name: str) -> dict[str, Any]:
    """The options of family ``name`` with their defaults (``inspect.Parameter.empty`` if none)."""
    parameters = list(inspect.signature(_family(name)).parameters.values())[1:]
    return {p.name: p.default for p in parameters if p.kind is not p.VAR_KEYWORD}


def check_options(name: str, options: dict[str, Any]) -> None:
    """Refuse options that family ``name`` does not take, listing the ones it does.

    Example:
        >>> check_options("planar", {"layers": 4})
        >>> check_options("nice", {"bins": 8})
        Traceback (most recent call last):
        ...
        ValueError: flow family 'nice' has no option 'bins'; its options are: ...
    """
    signature = inspect.signature(_family(name))
    if any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values()):
        return
    valid = family_options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(
            f"flow family {name!r} has no option {', '.join(map(repr, unknown))}; "
            f"its options are: {', '.join(valid) or '(none)'}"
        )


def build(name: str, dim: int, **options: Any):
    """Build a ready flow stack of family ``name`` for ``dim``-dimensional vectors.

    The result is a :class:`pyroflows.Flow`, hence a Pyro
    :class:`~pyro.distributions.TransformModule`, usable in :class:`pyroflows.FlowDistribution`,
    Pyro's :class:`~pyro.distributions.TransformedDistribution`, ``pyro.module`` and Pyro's
    ``AutoNormalizingFlow``. Unknown names and options raise a ``ValueError`` that lists the
    valid ones. ``context=k`` builds the conditional form of a family whose parameter
    networks can read a context vector of size ``k`` (see :meth:`pyroflows.Flow.condition`).

    Example:
        >>> import pyroflows
        >>> flow = pyroflows.build("realnvp", 4, layers=2, hidden=(16, 16))
        >>> flow.dim, len(flow)
        (4, 2)
    """
    from pyroflows.transforms.base import Flow

    if "context" in options and "context" not in family_options(name):
        conditional = [n for n in list_flows() if "context" in family_options(n)]
        raise ValueError(
            f"flow family {name!r} has no conditional form; conditional families: "
            f"{', '.join(conditional)}"
        )
    check_options(name, options)
    check_positive_int("dim", dim)
    flow = _family(name)(dim, **options)
    if not isinstance(flow, Flow):
        raise TypeError(
            f"flow family {name!r} returned {type(flow).__name__}, not a pyroflows.Flow"
        )
    if flow.dim != dim:
        raise ValueError(f"flow family {name!r} built a flow of dim {flow.dim}, not {dim}")
    return flow


def _family(name: str) -> Callable[..., Any]:
    if name not in _FAMILIES:
        raise ValueError(f"unknown flow family {name!r}; registered: {', '.join(list_flows())}")
    return _FAMILIES[name]
