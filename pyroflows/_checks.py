"""Validation of user-supplied options: each check names the argument it rejects."""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any


def check_positive_int(name: str, value: Any) -> int:
    """Return ``value`` if it is a positive integer, else raise naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive integer, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def check_positive_float(name: str, value: Any) -> float:
    """Return ``value`` as a float if it is a finite positive real number, else raise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a positive number, got {value!r}")
    if not 0 < value < float("inf"):
        raise ValueError(f"{name} must be a finite positive number, got {value!r}")
    return float(value)


def check_non_negative_float(name: str, value: Any) -> float:
    """Return ``value`` as a float if it is a finite real number >= 0, else raise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number >= 0, got {value!r}")
    if not 0 <= value < float("inf"):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def check_widths(name: str, value: Any) -> tuple[int, ...]:
    """Return ``value`` as a tuple of positive layer widths, e.g. ``(64, 64)``."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be a sequence of widths such as (64, 64), got {value!r}")
    return tuple(check_positive_int(f"{name}[{i}]", width) for i, width in enumerate(value))


def check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    """Return ``value`` if it is one of ``choices``, else raise listing them."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value
